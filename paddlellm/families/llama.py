"""LLaMA v1/v2: causal decoder, sentencepiece tokenizer, <s> opens a sequence and </s> ends each reply."""
from .base import Family


class LlamaFamily(Family):
    def fix_tokenizer(self, tokenizer) -> None:
        # LLaMA has no pad token; PaddleNLP's llm scripts pad with <unk> (id 0), never with </s>,
        # so a padded position can't be mistaken for the end of a reply.
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.unk_token

    def prefix_hooks(self):
        from paddlenlp.peft.prefix import llama_postprocess_past_key_value

        return llama_postprocess_past_key_value, None


FAMILY = LlamaFamily(
    name="llama",
    model_types=("llama",),
    config_class="LlamaConfig",
    model_class="LlamaForCausalLM",
    tokenizer_class="LlamaTokenizer",
    tokenizer_kind="sentencepiece",
    tokenizer_files={"vocab_file": "sentencepiece.bpe.model"},
    special_tokens={"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
    tiny_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
    ),
    example_checkpoint="meta-llama/Llama-2-7b",
    name_hints=("llama",),
    supports=dict(pretrain=True, sft=True, lora=True, prefix=True, tensor_parallel=True, intokens=True),
    cpu_patches=("llama_rms_norm", "llama_rotary", "llama_supervised_loss"),
    notes="Pads with <unk> (LLaMA has no pad token). Every reply ends with </s> and is supervised.",
)
