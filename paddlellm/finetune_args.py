"""The argument groups of finetune_generation.py (PaddleNLP's names), shared by fine-tuning and by
quantization, which PaddleNLP also ran from finetune_generation.py (do_ptq / do_gptq): ModelArgument,
DataArgument, GenerateArgument and QuantArgument."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from .arguments import FALSE, TRUE


@dataclass
class ModelArgument:
    model_name_or_path: str = field(default=None, metadata={"help": "Base model: a folder (e.g. from `paddlellm tiny`) or a PaddleNLP model name."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the model folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2."})
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


TRAINING_DEFAULTS = dict(
    # Defaults that differ from PaddleNLP's because they are what fine-tuning users expect.
    do_train=True,
    save_strategy="epoch",
    evaluation_strategy="epoch",
    logging_steps=10,
    save_total_limit=1,
    report_to=["none"],
)


@dataclass
class QuantArgument:
    """PaddleNLP's QuantArgument (2023 names and defaults), plus gptq_percdamp / gptq_actorder."""

    quant_type: Optional[str] = field(default=None, metadata={"help": "A8W8 (int8 weights and activations), WINT8 or WINT4 (weight-only); also a8w8, weight_only_int8, weight_only_int4. Default: A8W8 for PTQ, WINT4 for GPTQ (PaddleNLP's GPTQ was always 4-bit). GPTQ's bit width follows it; A8W8 with GPTQ is refused."})
    do_qat: bool = field(default=False, metadata={"help": "Quantization-aware training: not supported (needs GPUs; PaddleNLP 2023 had not implemented it either)."})
    do_ptq: bool = field(default=False, metadata={"help": "Post-training quantization with paddle.quantization + paddleslim observers."})
    ptq_step: int = field(default=32, metadata={"help": "Calibration batches for PTQ."})
    shift: bool = field(default=False, metadata={"help": "Shift (Outlier Suppression+, paddleslim) before PTQ; for families that declare their norm -> Linear pairing (llama, bloom, chatglm_v2)."})
    shift_all_linears: bool = field(default=False, metadata={"help": "Shift every Linear layer, not only those after a norm."})
    shift_sampler: str = field(default="ema", metadata={"help": "Sampler of the shift statistics: ema or none."})
    shift_step: int = field(default=32, metadata={"help": "Calibration batches for Shift."})
    smooth: bool = field(default=False, metadata={"help": "Smooth (SmoothQuant-style, paddleslim) before PTQ; for families that declare their norm -> Linear pairing (llama, bloom, chatglm_v2)."})
    smooth_all_linears: bool = field(default=False, metadata={"help": "Smooth every Linear layer, not only those after a norm."})
    smooth_sampler: str = field(default="none", metadata={"help": "Sampler of the smooth statistics: none or multi_step."})
    smooth_step: int = field(default=32, metadata={"help": "Calibration batches for Smooth."})
    smooth_piecewise_search: bool = field(default=False, metadata={"help": "Search the smooth scales piecewise (paddleslim PieceWiseSearch)."})
    smooth_k_piece: Union[int, bool] = field(default=3, metadata={"help": "Pieces of the piecewise search (an integer; PaddleNLP's llama JSON wrote true, read as the default 3)."})
    smooth_search_piece: bool = field(default=False, metadata={"help": "Search the number of pieces too."})
    do_gptq: bool = field(default=False, metadata={"help": "GPTQ weight quantization with paddleslim (bits from quant_type)."})
    gptq_step: int = field(default=8, metadata={"help": "Calibration batches for GPTQ (each Linear layer sees all of them)."})
    gptq_percdamp: float = field(default=0.1, metadata={"help": "(not in PaddleNLP's arguments) GPTQ Hessian damping, as a fraction of its mean diagonal; PaddleNLP used 0.1. A layer whose factorisation fails is retried with 10x, twice."})
    max_length: Optional[int] = field(default=None, metadata={"help": "PaddleNLP's total token limit (its ptq JSONs set it): caps tgt_length at max_length - src_length."})
    gptq_actorder: bool = field(default=True, metadata={"help": "(not in PaddleNLP's arguments) quantize columns in order of decreasing Hessian diagonal, as PaddleNLP did."})

    def __post_init__(self):
        if isinstance(self.smooth_k_piece, str):  # the argument system hands a mixed int/bool field over as text
            text = self.smooth_k_piece.strip().lower()
            if text in TRUE | FALSE:
                self.smooth_k_piece = 3
            elif text.lstrip("-").isdigit():
                self.smooth_k_piece = int(text)
            else:
                raise ValueError(f"smooth_k_piece must be an integer, got {self.smooth_k_piece!r}")
        elif isinstance(self.smooth_k_piece, bool):
            self.smooth_k_piece = 3
