"""One quantization run: load (merging LoRA in memory), measure the float model, quantize, save, reload, report."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List

import numpy as np

from ..arguments import UserError, dump_args
from ..files import write_json
from . import methods
from ..formats.quantized import CONFIG_FILE, WEIGHTS_FILE, install

log = logging.getLogger("paddlellm")


def load_float_model(plan):
    """The float32 model to quantize: the base folder, or base + LoRA adapters merged in memory (merge.py)."""
    import paddle

    # Fresh generated layer names: paddleslim pairs layers by them.
    with paddle.utils.unique_name.guard():
        if plan.lora_path:
            from ..merge import merged_lora_model

            log.info(f"quant: merging the LoRA adapters of {plan.lora_path} into {plan.base} in memory (float32) before quantizing")
            model = merged_lora_model(plan.base, plan.lora_path, plan.family)
            _plain_linears(model)
        else:
            model = plan.family.load_model(plan.base, dtype="float32")
    from ..cpu_kernels import apply as apply_cpu_kernels

    # as load_for_inference runs the saved folder (the reload check compares the two bit for bit)
    model = apply_cpu_kernels(plan.family, model)
    model.eval()
    return model


def _plain_linears(model) -> None:
    """After a LoRA merge the adapted layers are LoRALinear (their weight already holds W + BA): put plain Linear
    layers with the same weight and bias back, so they are quantized like every other Linear."""
    import paddle

    for name, layer in list(model.named_sublayers()):
        if isinstance(layer, paddle.nn.Linear) and type(layer) is not paddle.nn.Linear:
            in_f, out_f = layer.weight.shape
            plain = paddle.nn.Linear(in_f, out_f, bias_attr=None if layer.bias is not None else False)
            plain.weight.set_value(layer.weight)
            if layer.bias is not None:
                plain.bias.set_value(layer.bias)
            methods.set_sublayer(model, name, plain)


def _folder_bytes(*folders) -> int:
    return sum(os.path.getsize(os.path.join(f, n)) for f in folders if f and os.path.isdir(f)
               for n in os.listdir(f) if os.path.isfile(os.path.join(f, n)))


def quantize(plan, model_args, data_args, q, training: Dict, calib_records, dev_records) -> Dict:
    """Run the whole quantization; returns the acceptance report (also saved as quant_results.json)."""
    import paddle

    from ..data import encode_records
    from ..runtime import progress_bar
    from .report import Evaluator

    started = time.time()
    family = plan.family
    seed = int(training.get("seed", 42))
    paddle.seed(seed)
    tok_src = plan.lora_path if plan.lora_path and os.path.isfile(os.path.join(plan.lora_path, "tokenizer_config.json")) else plan.base
    tokenizer = family.load_tokenizer(tok_src)
    src_len, tgt_len = data_args.src_length, data_args.tgt_length
    calib, _ = encode_records(family, tokenizer, calib_records, src_len, tgt_len, "calibration")
    bs = int(training.get("per_device_train_batch_size") or 8)
    used = min(len(calib), plan.steps * bs)
    log.info(f"quant: calibration data {plan.calibration_file}"
             f"{'' if os.path.basename(plan.calibration_file).startswith('quant') else ' (no quant.json: using the training data)'}: "
             f"{used} of {len(calib)} examples in {min(plan.steps, -(-len(calib) // bs))} batches of {bs}")
    extra = [q.shift_step if q.shift else 0, q.smooth_step if q.smooth else 0]
    batches = methods.calibration_batches(family, calib, tokenizer.pad_token_id, bs, max([plan.steps] + extra), seed)

    model = load_float_model(plan)
    float_state_bytes = sum(int(v.numel()) * 4 for v in model.state_dict().values())
    total_params = sum(int(v.numel()) for v in model.state_dict().values())
    evaluator = None
    do_eval = training.get("do_eval", True) is not False
    if dev_records and do_eval:
        dev_examples, _ = encode_records(family, tokenizer, dev_records, src_len, tgt_len, "dev")
        evaluator = Evaluator(family, tokenizer, dev_records, dev_examples, src_len, tgt_len,
                              int(training.get("per_device_eval_batch_size") or 8))
        log.info("quant: measuring the float model on the dev data")
        evaluator.measure_float(model)

    tick = time.time()
    if q.shift or q.smooth:
        done = " and ".join(n for n, on in (("Shift", q.shift), ("Smooth", q.smooth)) if on)
        log.info(f"quant: {done} (paddleslim) before PTQ")
        methods.shift_smooth(model, family.shift_smooth_pairing, batches, q, on_cpu=not paddle.device.is_compiled_with_cuda())
    wrappers = methods.wrappers_of(model)
    if plan.method == "ptq":
        with progress_bar(min(len(batches), plan.steps), f"quant: PTQ {plan.quant_type} calibration", "batch") as bar:
            result = methods.ptq(model, batches[: plan.steps], plan.bits, plan.a8, bar)
    else:
        n_layers = len(methods.linear_names(model))
        with progress_bar(n_layers, f"quant: GPTQ {plan.bits}-bit", "layer") as bar:
            result = methods.gptq(model, batches[: plan.steps], plan.bits, q.gptq_percdamp, q.gptq_actorder, bar)
    calib_seconds = time.time() - tick
    if not result.layers:
        raise UserError(f"{plan.base}: the model has no Linear layers to quantize")
    tensors = result.full_tensors(model)
    install(model, tensors, result.layers, "float32", wrappers)  # the in-memory quantized model, built as a reload builds it
    model.eval()

    dev = evaluator.compare(model) if evaluator else None

    out = training["output_dir"]
    _write_folder(out, plan, model, tensors, result, wrappers, data_args, q, model_args, training, calib_seconds, len(calib), used,
                  min(len(batches), plan.steps), bs)

    probe = (evaluator.examples if evaluator else calib)[: int(training.get("per_device_eval_batch_size") or 8)]
    reload_check = _reload_check(model, out, family, tokenizer, probe)
    n_q, _ = methods.count_params(result)
    quant_bytes = os.path.getsize(os.path.join(out, WEIGHTS_FILE))
    results = {
        "output_dir": out, "quant_type": plan.quant_type, "method": plan.method, "bits": plan.bits,
        "quantized_layers": len(result.layers),
        "calibration": {"file": plan.calibration_file, "examples": len(calib), "examples_used": used,
                        "batches": len(batches), "batch_size": bs, "seconds": round(calib_seconds, 2)},
        "dev": dev,
        "size": {"float_bytes": float_state_bytes, "quantized_bytes": quant_bytes, "ratio": quant_bytes / float_state_bytes,
                 "float_folder_bytes": _folder_bytes(plan.base, plan.lora_path), "quantized_folder_bytes": None,
                 "quantized_params": n_q, "total_params": total_params},
        "reload_check": reload_check,
        "seconds": round(time.time() - started, 1),
    }
    from .report import warnings_for

    results["warnings"] = warnings_for(dev)
    write_json(os.path.join(out, "quant_results.json"), results)
    results["size"]["quantized_folder_bytes"] = _folder_bytes(out)
    write_json(os.path.join(out, "quant_results.json"), results)
    return results, model


def _write_folder(out, plan, model, tensors, result, wrappers, data_args, q, model_args, training, calib_seconds, n_calib, used, n_batches, bs):
    """Write the quantized folder under a temporary name and move it into place (nothing half-written on failure)."""
    import paddle
    import paddleslim
    from safetensors.numpy import save_file

    from ..families import META_FILE
    from ..checkpoints import Staging
    from ..merge import save_tokenizer

    family = plan.family
    with Staging(out) as stage:
        weights = os.path.join(stage, WEIGHTS_FILE)
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, weights, metadata={"format": "np"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(weights, 0o666 & ~umask)  # safetensors creates it private (0600); the rest of the folder is not
        config = model.config
        config.dtype = "float32"
        config.architectures = [family.model_class]
        config.save_pretrained(stage)
        gen_cfg = os.path.join(plan.base, "generation_config.json")
        if os.path.isfile(gen_cfg):
            with open(gen_cfg, encoding="utf-8") as f:
                write_json(os.path.join(stage, "generation_config.json"), json.load(f))
        save_tokenizer(family, [plan.lora_path, plan.base], stage)
        write_json(os.path.join(stage, CONFIG_FILE), {
            "quant_type": plan.quant_type, "method": plan.method, "bits": plan.bits, "group_size": -1, "symmetric": True,
            "activations": "int8, per-tensor abs-max (AVGObserver), simulated on CPU" if plan.a8 else "float32 (weight-only)",
            "layout": "paddle Linear weight [in, out]; qweight int8 [in, out] or (4 bits) uint8 [ceil(in/2), out] with the even "
                      "input row in the low nibble; weight = qweight * weight_scale[out]",
            "gptq": {"percdamp": q.gptq_percdamp, "actorder": q.gptq_actorder, "group_size": -1} if plan.method == "gptq" else None,
            "calibration": {"file": plan.calibration_file, "examples": n_calib, "examples_used": used, "batches": n_batches,
                            "batch_size": bs, "src_length": data_args.src_length, "tgt_length": data_args.tgt_length,
                            "seconds": round(calib_seconds, 2)},
            "layers": result.layers,
            "shift": bool(q.shift), "smooth": bool(q.smooth),
            "shift_all_linears": bool(q.shift and q.shift_all_linears), "smooth_all_linears": bool(q.smooth and q.smooth_all_linears),
            "smooth_piecewise_search": bool(q.smooth and q.smooth_piecewise_search),
            "wrappers": wrappers,  # paddleslim wrapper layers Shift/Smooth inserted (rebuilt when loading)
            "not_quantized": "embeddings, norms and the LM head (float32), as in PaddleNLP",
            "versions": {"paddle": paddle.__version__, "paddleslim": getattr(paddleslim, "__version__", "?"),
                         "paddlenlp": __import__("paddlenlp").__version__},
        })
        write_json(os.path.join(stage, "weight_scales.json"), result.weight_scales)
        if plan.a8:
            write_json(os.path.join(stage, "act_scales.json"), result.act_scales)
        meta = {k: v for k, v in plan.meta.items() if k in ("chat_format", "chat_template")}
        meta.update(family=family.name, kind="quantized", quant_type=plan.quant_type, method=plan.method, dtype="float32",
                    src_length=plan.meta.get("src_length") or data_args.src_length,
                    tgt_length=plan.meta.get("tgt_length") or data_args.tgt_length,
                    base_model=os.path.abspath(plan.base) if os.path.isdir(plan.base) else plan.base)
        if plan.lora_path:
            meta["lora_path"] = os.path.abspath(plan.lora_path)
        write_json(os.path.join(stage, META_FILE), meta)
        write_json(os.path.join(stage, "quant_args.json"), dump_args(model_args, data_args, q, training))


def _logits(model, family, examples, pad_id) -> np.ndarray:
    import paddle

    from ..families import logits_of

    arrays = family.build_batch([[e] for e in examples], pad_id)
    arrays.pop("labels")
    with paddle.no_grad():
        return logits_of(model(**{k: paddle.to_tensor(v) for k, v in arrays.items()})).numpy()


def _reload_check(model, out: str, family, tokenizer, examples: List) -> Dict:
    """Load the saved folder the way predict does (both runtimes) and compare logits with the in-memory model."""
    from ..loading import load_for_inference

    want = _logits(model, family, examples, tokenizer.pad_token_id)
    diffs = {}
    for runtime in ("float32", "int8"):
        loaded = load_for_inference(out, quant_runtime=runtime)[0]
        diffs[runtime] = float(np.abs(_logits(loaded, family, examples, tokenizer.pad_token_id) - want).max())
        del loaded
    return {"file": WEIGHTS_FILE, "examples": len(examples), "max_abs_diff": diffs["float32"], "int8_runtime_max_abs_diff": diffs["int8"]}
