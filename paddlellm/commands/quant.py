"""Compression: PTQ (A8W8, weight-only INT8/INT4) and GPTQ, written as real low-bit checkpoints.

    paddlellm quant llm/llama/gptq_argument.json [--key value ...]
    python finetune_generation.py llm/llama/ptq_argument.json      (PaddleNLP's way: do_ptq / do_gptq)

The input is a model folder, a full fine-tune output or a LoRA output (merged in memory first).
Calibration data: quant.json in the data folder, else train.json, encoded like fine-tuning data.
The output folder holds int8 (or int4, two per byte) weights with their scales in quant_model.safetensors,
quant_config.json, PaddleNLP-format weight_scales.json / act_scales.json, config, tokenizer and
paddlellm_meta.json (kind "quantized"); predict and serve load it (paddlellm.loading). The acceptance
report (float vs quantized on dev.json, sizes, a reload check) is printed and saved as quant_results.json.

Importing this package is cheap: --help and argument errors come before paddle loads.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional

from ..arguments import FALSE, TRUE, UserError, check_can_create, fail, load_json_args, parse_args, require_at_least
from ..finetune_args import QuantArgument  # noqa: F401  (this command's own argument group; finetune's --help lists it too)
from ..formats.quantized import refuse_if_quantized

log = logging.getLogger("paddlellm")

# accepted spelling (lower case) -> (canonical name, weight bits, activations quantized too)
QUANT_TYPES = {
    "a8w8": ("A8W8", 8, True),
    "wint8": ("WINT8", 8, False), "weight_only_int8": ("WINT8", 8, False),
    "wint4": ("WINT4", 4, False), "weight_only_int4": ("WINT4", 4, False),
}


@dataclass
class Plan:
    """What a run will do, resolved from the arguments before anything heavy loads."""

    quant_type: str
    bits: int
    a8: bool
    method: str  # ptq or gptq
    steps: int
    family: object
    base: str
    lora_path: Optional[str]
    meta: Dict
    calibration_file: str


def quant_requested(argv) -> bool:
    """Whether finetune_generation.py's arguments ask for PTQ or GPTQ (then this module runs instead)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    values: Dict = {}
    if argv and argv[0].endswith(".json") and os.path.isfile(argv[0]):
        try:
            values = load_json_args(argv[0])
        except UserError:
            return False  # fine-tuning's parser reports the bad file
    for i, tok in enumerate(argv):
        for key in ("do_ptq", "do_gptq"):
            if tok == f"--{key}":
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                values[key] = not (nxt is not None and nxt.lower() in FALSE)
            elif tok.startswith(f"--{key}="):
                values[key] = tok.split("=", 1)[1].lower() in TRUE
    return any(values.get(k) is True or str(values.get(k)).lower() in TRUE for k in ("do_ptq", "do_gptq"))


def parse(argv=None, prog: str = "paddlellm quant"):
    from ..finetune_args import DataArgument, GenerateArgument, ModelArgument

    model_args, data_args, _gen, quant_args, training = parse_args(
        [ModelArgument, DataArgument, GenerateArgument, QuantArgument], argv, prog=prog,
        description="Quantize a model (PTQ: A8W8 / WINT8 / WINT4; GPTQ: WINT4 / WINT8) into a real low-bit checkpoint.",
        training=True)
    return model_args, data_args, quant_args, training


def check_args(model_args, data_args, q: QuantArgument, training: Dict):
    """Refusals that depend on the arguments alone (one line each). Returns (quant_type, bits, a8, method, steps)."""
    if training.get("do_train"):
        raise UserError("do_ptq/do_gptq cannot run together with do_train (as in PaddleNLP): fine-tune first, then quantize its output_dir")
    if q.do_qat:
        raise UserError("do_qat: quantization-aware training is not supported (it needs GPUs); use do_ptq or do_gptq")
    if q.do_ptq and q.do_gptq:
        raise UserError("do_ptq and do_gptq cannot be used together (as in PaddleNLP): choose one")
    if not (q.do_ptq or q.do_gptq):
        raise UserError("nothing to do: set do_ptq (post-training quantization) or do_gptq (GPTQ)")
    method = "ptq" if q.do_ptq else "gptq"
    spelled = q.quant_type or ("A8W8" if q.do_ptq else "WINT4")
    if spelled.lower() not in QUANT_TYPES:
        raise UserError(f"quant_type {spelled!r} is unknown; choose A8W8, WINT8 or WINT4 (or a8w8, weight_only_int8, weight_only_int4)")
    quant_type, bits, a8 = QUANT_TYPES[spelled.lower()]
    if q.do_gptq and a8:
        raise UserError("quant_type A8W8 with do_gptq: GPTQ quantizes weights only; use quant_type WINT4 or WINT8")
    if (q.shift or q.smooth) and not q.do_ptq:
        raise UserError("shift/smooth prepare activations for PTQ: use them with do_ptq (GPTQ quantizes weights only)")
    if q.shift_sampler not in ("ema", "none") or q.smooth_sampler not in ("none", "multi_step"):
        raise UserError(f"shift_sampler must be ema or none and smooth_sampler none or multi_step, got {q.shift_sampler!r} / {q.smooth_sampler!r}")
    if training.get("fp16") or training.get("bf16") or model_args.dtype in ("float16", "bfloat16"):
        if not _has_gpu():
            raise UserError("fp16/bf16 quantization needs a GPU (paddle's CPU build has no half-precision matmul); "
                            "drop fp16/bf16 and dtype to quantize in float32 on CPU")
    if int(training.get("tensor_parallel_degree") or 1) > 1 or int(training.get("pipeline_parallel_degree") or 1) > 1:
        raise UserError("quantization runs on one process: set tensor_parallel_degree and pipeline_parallel_degree to 1 "
                        "(merge tensor-parallel shards first with merge_tp_params.py)")
    steps = q.ptq_step if q.do_ptq else q.gptq_step
    require_at_least({"ptq_step" if q.do_ptq else "gptq_step": steps, "shift_step": q.shift_step if q.shift else None,
                      "smooth_step": q.smooth_step if q.smooth else None, "smooth_k_piece": q.smooth_k_piece if q.smooth else None, "src_length": data_args.src_length, "tgt_length": data_args.tgt_length,
                      **{k: training.get(k) for k in ("per_device_train_batch_size", "per_device_eval_batch_size")}})
    if q.gptq_percdamp <= 0:
        raise UserError(f"gptq_percdamp must be positive, got {q.gptq_percdamp}")
    if q.max_length is not None:
        if q.max_length <= data_args.src_length:
            raise UserError(f"max_length {q.max_length} must be larger than src_length {data_args.src_length}")
        data_args.tgt_length = min(data_args.tgt_length, q.max_length - data_args.src_length)
    return quant_type, bits, a8, method, steps


def check(model_args, data_args, q: QuantArgument, training: Dict) -> Plan:
    """Every refusal before the model loads, each as one line; the resolved plan of the run."""
    from ..data import DataError, split_files
    from ..loading import resolve_model

    quant_type, bits, a8, method, steps = check_args(model_args, data_args, q, training)
    if not model_args.model_name_or_path and not model_args.lora_path:
        raise UserError("model_name_or_path is required: the model folder, fine-tune output or LoRA output to quantize")
    if not data_args.dataset_name_or_path:
        raise UserError("dataset_name_or_path is required: a folder with quant.json or train.json (calibration) and dev.json")
    out = training.get("output_dir")
    if not out:
        raise UserError("output_dir is required: the folder to write the quantized model into")
    try:
        files = split_files(data_args.dataset_name_or_path, "quant", required=False) or \
            split_files(data_args.dataset_name_or_path, "train", required=False)
    except DataError as e:
        raise UserError(f"calibration data: {e}") from None
    if not files:
        raise UserError(f"calibration data: {data_args.dataset_name_or_path} has no quant.json (or quant/) and no train.json (or train/)")
    for path in (model_args.model_name_or_path, model_args.lora_path):
        refuse_if_quantized(path)
    base, lora_path, prefix_path, family, meta = resolve_model(model_args.model_name_or_path, model_args.lora_path, model_args.prefix_path, model_args.family)
    if prefix_path:
        raise UserError(f"{prefix_path!r} is a prefix-tuning output: its prefix is not a weight of the model and can't be "
                        f"quantized; quantize its base model {base!r}")
    refuse_if_quantized(base)
    if (q.shift or q.smooth) and family.shift_smooth_pairing is None:
        raise UserError(f"shift/smooth: the norm -> Linear pairing of the {family.name} family is not declared "
                        f"(paddlellm/families/, shift_smooth_pairing); drop shift/smooth for {family.name}")
    check_can_create(out, "output_dir")
    for src in (base, lora_path):
        if src and os.path.isdir(src) and os.path.abspath(src) == os.path.abspath(out):
            raise UserError(f"output_dir must differ from the input folder {src!r}")
    return Plan(quant_type, bits, a8, method, steps, family, base, lora_path, meta, files[0] if len(files) == 1 else os.path.dirname(files[0]))


def _has_gpu() -> bool:
    from importlib import metadata

    try:
        metadata.version("paddlepaddle-gpu")
    except metadata.PackageNotFoundError:
        return False  # the CPU wheel: known without importing paddle (keeps the refusal one line, and fast)
    from ..runtime import setup_runtime

    setup_runtime()
    import paddle

    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def execute(argv=None, prog: str = "paddlellm quant"):
    """Parse, check and quantize; returns (report, in-memory quantized model). Raises UserError."""
    model_args, data_args, q, training = parse(argv, prog)
    plan = check(model_args, data_args, q, training)
    from ..data import read_split

    calib_split = "quant" if os.path.basename(plan.calibration_file).startswith("quant") else "train"
    calib_records = read_split(data_args.dataset_name_or_path, calib_split)
    dev_records = read_split(data_args.dataset_name_or_path, "dev", required=False)
    from ..runtime import setup_runtime

    setup_runtime()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO)
    from ..quant.pipeline import quantize

    return quantize(plan, model_args, data_args, q, training, calib_records, dev_records)


def run(argv=None, prog: str = "paddlellm quant") -> int:
    try:
        results, _ = execute(argv, prog)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", status=130)
    from ..quant.report import format_report, warnings_for

    print(format_report(results))
    for w in warnings_for(results.get("dev")) + ([] if results["reload_check"]["max_abs_diff"] == 0 else
                                                ["the reloaded folder's logits differ from the in-memory quantized model"]):
        print(f"\n!!! WARNING: {w} !!!\n", file=sys.stderr)
    print(f"wrote {results['output_dir']}")
    return 0


def main(argv=None) -> int:
    return run(argv)


