"""The argument groups of finetune_generation.py (PaddleNLP's names), shared by fine-tuning and by
quantization, which PaddleNLP also ran from finetune_generation.py (do_ptq / do_gptq)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class ModelArgument:
    model_name_or_path: str = field(default=None, metadata={"help": "Base model: a folder (e.g. from `paddlellm tiny`) or a PaddleNLP model name."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the model folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm."})
    dtype: str = field(default="float32", metadata={"help": "Weight dtype: float32, float16 or bfloat16 (use with --fp16/--bf16 on GPUs)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "Start from these LoRA adapters (a folder saved by a LoRA run)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "LoRA alpha (default: 2 * lora_rank)."})
    lora_target_modules: Optional[List[str]] = field(default=None, metadata={"help": "Regexes of the layers to adapt (default: every Linear layer)."})
    prefix_tuning: bool = field(default=False, metadata={"help": "Train prefix tuning (virtual key/value tokens) instead of all weights."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "Start from this prefix (a folder saved by a prefix tuning run)."})
    num_prefix_tokens: int = field(default=128, metadata={"help": "Number of prefix tokens."})
    prefix_projection: bool = field(default=False, metadata={"help": "Reparametrise the prefix through an MLP."})
    chat_template: Optional[str] = field(default=None, metadata={"help": "Chat template: a Jinja file, or none for the family's own format. Default: the model folder's own (chat_template.jinja or tokenizer_config.json chat_template) if it has one, else the family's format."})


@dataclass
class DataArgument:
    dataset_name_or_path: str = field(default=None, metadata={"help": "Folder with train.json and dev.json (JSONL of src/tgt), or train/ and dev/ folders of *.json."})
    task_name: Optional[str] = field(default=None, metadata={"help": "Name of the task, recorded with the results."})
    src_length: int = field(default=1024, metadata={"help": "Maximum tokens of the context (earlier turns + final prompt); oldest turns are dropped first."})
    tgt_length: int = field(default=1024, metadata={"help": "Maximum tokens of the final reply (including its end token); also the generation length in evaluation."})
    eval_with_do_generation: bool = field(default=False, metadata={"help": "Also evaluate by generating replies: BLEU-4 and ROUGE-1/2/L are reported together with loss/ppl/accuracy."})
    save_generation_output: bool = field(default=False, metadata={"help": "With eval_with_do_generation, write generated_output.json to output_dir."})
    intokens: bool = field(default=False, metadata={"help": "Pack several examples into one sequence of up to intokens_max_length tokens."})
    intokens_max_length: int = field(default=2048, metadata={"help": "Token slots of one packed sequence."})


@dataclass
class GenerateArgument:
    top_k: int = field(default=1, metadata={"help": "Top-k sampling in generation evaluation (1 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p (nucleus) sampling in generation evaluation."})
