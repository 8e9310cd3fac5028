"""Static-graph export: python export_model.py --model_name_or_path DIR --output_path OUT [--lora_path L] [--key value ...]

Writes ONE "step" program (the model forward with an explicit past cache of any length; prefill is a step
with an empty past) and its weights, once, for paddle.inference. Generation is then driven from Python by
paddlenlp's generate() (see formats/static.py), so sampling settings stay run-time options and greedy and
seeded sampling give exactly dynamic mode's tokens. PaddleNLP's own export (the whole generation loop as
one program) fails for top-p and for Bloom/OPT/GLM on CPU and is slower than dynamic mode there.

Families with a Family.static_step (LLaMA, Qwen2, GPT, OPT, Bloom, ChatGLM2, ChatGLM, GLM) export an in-place step program instead (format 3,
families/inplace_step.py): the dynamic decode runner's own step code, which writes the new keys/values into the
runner's preallocated KV cache in place and returns only the last logits; a prefix-tuning export keeps
format 1 (paddlenlp's prefix wrapper hands the prefix to the forward as its past).

How (format 1): generate() is run once on the dynamic model with its forward watched, for two batch shapes, to record
which tensors it passes at prefill and at decode and the layout of the cache; every batch and sequence dim
becomes dynamic in the specs; the step is traced with paddle.jit.to_static and saved; the saved program is
reloaded with paddle.inference and must generate what the dynamic model generates before the folder is
moved into place.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..arguments import UserError, check_can_create, fail, parse_args, require_at_least
from ..files import write_json
from ..formats.static import FORMAT_VERSION, INPLACE_VERSION, META_NAME, PREFIX_DIR, container_classes, flatten, rebuild, template_of

DTYPES = ["float32", "float16", "bfloat16"]
CACHE_KEYS = ("past_key_values", "cache")


@dataclass
class ExportArgument:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Model folder (base, full fine-tune or merged) or PaddleNLP model name. Optional when lora_path records its base model."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapters, merged into the weights before export (with merge_lora_params.py's code)."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "Prefix-tuning parameters: stored beside the program (prefix/), they become the initial cache at every prompt."})
    output_path: Optional[str] = field(default=None, metadata={"help": "Folder to write the static model into (required)."})
    model_prefix: str = field(default="model", metadata={"help": "File name of the program and weights: <model_prefix>.json and <model_prefix>.pdiparams."})
    dtype: Optional[str] = field(default=None, metadata={"help": "Weight dtype (default: float32). float16/bfloat16 need a GPU.", "choices": DTYPES})
    src_length: Optional[int] = field(default=None, metadata={"help": "Default maximum prompt tokens saved for predict/serve (default: the model's saved value)."})
    tgt_length: Optional[int] = field(default=None, metadata={"help": "Default maximum generated tokens saved for predict/serve (default: the model's saved value)."})
    max_length: Optional[int] = field(default=None, metadata={"help": "Same as tgt_length (the name PaddleNLP's 2023 predictor used)."})
    device: str = field(default="cpu", metadata={"help": "Device the export runs and verifies on.", "choices": ["cpu", "gpu"]})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2."})
    inference_model: bool = field(default=False, metadata={"help": "PaddleNLP's fused InferenceModel export: refused (it needs the GPU-only paddlenlp_ops)."})
    verify_tokens: int = field(default=8, metadata={"help": "New tokens generated greedily by both the dynamic model and the export to verify it (0 = no check)."})


def parse(argv=None) -> ExportArgument:
    (args,) = parse_args([ExportArgument], argv, prog="export_model.py",
                         description="Export a model (optionally with LoRA merged) as a static-graph step program for predict/serve --mode static.")
    if args.inference_model:
        fail("--inference_model: PaddleNLP's fused InferenceModel classes need paddlenlp_ops (GPU-only custom ops); "
             "drop --inference_model to export the plain step program")
    if not args.output_path:
        fail("output_path is required: the folder to write the static model into")
    if not (args.model_name_or_path or args.lora_path or args.prefix_path):
        fail("model_name_or_path is required (a model folder or a PaddleNLP model name)")
    if args.max_length and args.tgt_length and args.max_length != args.tgt_length:
        fail("tgt_length and max_length name the same setting; give one")
    args.tgt_length = args.tgt_length or args.max_length
    if args.device == "cpu" and args.dtype not in (None, "float32"):
        fail(f"--dtype {args.dtype}: paddle's CPU kernels have no {args.dtype} matmul; export with --dtype float32 on CPU")
    try:
        require_at_least({"src_length": args.src_length, "tgt_length": args.tgt_length})
        require_at_least({"verify_tokens": args.verify_tokens}, minimum=0)
    except UserError as e:
        fail(str(e))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        from ..loading import resolve_model
        from ..formats.static import is_static_folder

        base, lora_path, prefix_path, family, meta = resolve_model(args.model_name_or_path, args.lora_path, args.prefix_path, args.family)
        if is_static_folder(base):
            raise UserError(f"{base!r} is already a static export; export from the dynamic model folder")
        reason = family.static_export_refusal()
        if reason:
            raise UserError(f"the {family.name} family can't be exported to a static graph: {reason}")
        for src in (base, lora_path, prefix_path):
            if src and os.path.isdir(src) and os.path.abspath(src) == os.path.abspath(args.output_path):
                raise UserError("output_path must differ from the input folders")
        check_can_create(args.output_path, "output_path")
        from ..runtime import setup_runtime

        setup_runtime()
        export(args, base, lora_path, prefix_path, family, meta)
    except UserError as e:
        fail(str(e))
    print(f"export: wrote a static {family.name} model to {args.output_path}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- probe: what generate() passes to forward
def probe(model, tokenizer, family) -> List[Dict]:
    """Run generate() twice (batches of 2 and 3 prompts of different lengths, 3 new tokens) with the forward
    watched. Returns one {"kwargs", "output"} per forward call."""
    import paddle

    from ..generation import _generation_inputs

    calls: List[Dict] = []
    inner = model.forward

    def watched(*args, **kwargs):
        if args:
            kwargs = dict(zip(["input_ids"], args), **kwargs)
        # Containers are copied now: some models (GLM) grow their cache lists in place later.
        seen = {k: _copy_tree(v) for k, v in kwargs.items()}
        out = inner(**kwargs)
        calls.append({"kwargs": seen, "output": _copy_tree(out)})
        return out

    object.__setattr__(model, "forward", watched)
    try:
        texts = [["hello there, my friend"], ["x"], ["spell: 1 2 3"]]
        for batch in (texts[:2], texts):
            prompts = [family.generation_prompt(tokenizer, t, [], 64) for t in batch]
            inputs = {k: paddle.to_tensor(v) for k, v in _generation_inputs(family, tokenizer, prompts, 3).items()}
            with paddle.no_grad():
                model.generate(**inputs, max_new_tokens=3, max_length=3, decode_strategy="greedy_search", eos_token_id=-1,
                               pad_token_id=tokenizer.pad_token_id, use_cache=True)
    finally:
        object.__delattr__(model, "forward")
    return calls


def _copy_tree(obj):
    if isinstance(obj, (tuple, list)):
        items = [_copy_tree(x) for x in obj]
        return items if type(obj) is list else tuple(items) if type(obj) is tuple else type(obj)(*items)
    return obj


def _is_tensor(x) -> bool:
    import paddle

    return isinstance(x, paddle.Tensor)


def describe(calls: List[Dict]) -> Dict:
    """static_meta fields (input names/dtypes/specs, cache layout, output layout, constants) from the probe."""
    has_cache = [any(isinstance(c["kwargs"].get(k), (tuple, list)) for k in CACHE_KEYS) for c in calls]
    prefill = [c for c, h in zip(calls, has_cache) if not h]
    decode = [c for c, h in zip(calls, has_cache) if h]
    if len(prefill) != 2 or len(decode) != 4:
        raise UserError(f"export: generate() made {len(prefill)} prefill and {len(decode)} decode calls, expected 2 and 4 "
                        f"(a model without a key/value cache can't be exported as a step program)")
    cache_key = next(k for k in CACHE_KEYS if isinstance(decode[0]["kwargs"].get(k), (tuple, list)))
    names = [k for k, v in prefill[0]["kwargs"].items() if _is_tensor(v)]
    for c in calls:
        got = [k for k, v in c["kwargs"].items() if _is_tensor(v)]
        if sorted(got) != sorted(names):
            raise UserError(f"export: generate() passes tensors {got} at one step and {names} at another; can't export one step program")
    constants = {}
    for c in prefill + decode:
        for k, v in c["kwargs"].items():
            if k not in CACHE_KEYS and not _is_tensor(v) and (v is None or isinstance(v, (bool, int, float, str))):
                constants[k] = v
    constants.pop("labels", None)

    def spec_shape(shapes):  # fixed only where every call agrees and the size is not 1 (see the formats.static docstring)
        return [s[0] if len(set(s)) == 1 and s[0] != 1 else None for s in zip(*shapes)]

    input_specs = [spec_shape([list(c["kwargs"][n].shape) for c in calls]) for n in names]
    input_dtypes = [str(prefill[0]["kwargs"][n].dtype).replace("paddle.", "") for n in names]
    cache_template = template_of(decode[0]["kwargs"][cache_key])
    classes = container_classes(decode[0]["kwargs"][cache_key])
    cache_shapes = []
    flat_by_call = [[list(t.shape) for t in flatten(c["kwargs"][cache_key])] for c in decode]
    batches = [c["kwargs"][names[0]].shape[0] for c in decode]
    for i in range(len(flat_by_call[0])):
        shape = []
        for axis, sizes in enumerate(zip(*[f[i] for f in flat_by_call])):
            if list(sizes) == batches and len(set(batches)) > 1:
                shape.append("batch")
            elif len(set(sizes)) == 1:
                shape.append(sizes[0])
            elif sizes[0] != sizes[1] and sizes[2] != sizes[3]:  # grows between two steps of the same batch
                shape.append("seq")
            else:
                raise UserError(f"export: cache tensor {i} axis {axis} varies in a way a step program can't express ({sizes})")
        if shape.count("seq") != 1 or shape.count("batch") != 1:
            raise UserError(f"export: cache tensor {i} has no single batch and sequence axis ({shape})")
        cache_shapes.append(shape)
    output = decode[0]["output"]
    out_flat = flatten(output)
    if not all(_is_tensor(t) for t in out_flat):
        raise UserError("export: the forward output holds non-tensors; can't export it as a step program")
    return {"input_names": names, "input_dtypes": input_dtypes, "input_specs": input_specs, "cache_key": cache_key,
            "cache_template": cache_template, "cache_shapes": cache_shapes, "output_template": template_of(output),
            "constants": constants, "classes": classes}


# --------------------------------------------------------------------------- the traced step
def _step_layer(model, desc: Dict, classes: Dict):
    import paddle

    class Step(paddle.nn.Layer):
        """forward([inputs..., cache tensors...]) -> [last-position logits, new cache tensors...]."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, feeds):
            n = len(desc["input_names"])
            kwargs = dict(zip(desc["input_names"], feeds[:n]))
            kwargs[desc["cache_key"]] = _rebuild(desc["cache_template"], feeds[n:], classes)
            kwargs.update(desc["constants"])
            out = _flatten(self.model(**kwargs))
            return [out[0][:, -1:]] + out[1:]

    return Step()


def _rebuild(template, flat, classes):
    import paddle

    return paddle.jit.not_to_static(rebuild)(template, list(flat), classes)


def _flatten(obj):
    import paddle

    return paddle.jit.not_to_static(flatten)(obj)


def input_specs(desc: Dict, dtype: str):
    from paddle.static import InputSpec

    specs = [InputSpec(shape, dt, name) for shape, dt, name in zip(desc["input_specs"], desc["input_dtypes"], desc["input_names"])]
    specs += [InputSpec([None if d in ("batch", "seq") else d for d in shape], dtype, f"cache_{i}") for i, shape in enumerate(desc["cache_shapes"])]
    return specs


def save_inplace(step, family, dtype: str, prefix: str) -> List[str]:
    """Trace and save an in-place step layer (format 3); returns its input names in order."""
    import paddle

    step.eval()
    specs = step.input_specs(dtype)
    with family.static_export_patch():
        static = paddle.jit.to_static(step, input_spec=[specs], full_graph=True)
        paddle.jit.save(static, prefix)
    return [spec.name for spec in specs]


def save_program(model, family, desc: Dict, dtype: str, prefix: str) -> None:
    import paddle

    step = _step_layer(model, desc, desc.pop("classes"))
    step.eval()
    with family.static_export_patch():
        static = paddle.jit.to_static(step, input_spec=[input_specs(desc, dtype)], full_graph=True)
        paddle.jit.save(static, prefix)


# --------------------------------------------------------------------------- the command
def export(args: ExportArgument, base: str, lora_path: Optional[str], prefix_path: Optional[str], family, meta: Dict) -> None:
    import paddle

    from ..checkpoints import Staging
    from ..merge import merge_lora, save_tokenizer
    from ..runtime import select_device

    select_device(args.device)
    dtype = args.dtype or "float32"
    tmp = None
    source = base
    if lora_path:  # merged first, with merge_lora_params.py's code, into a scratch folder
        tmp = tempfile.mkdtemp(prefix="paddlellm-export-")
        source = merge_lora(base, lora_path, os.path.join(tmp, "merged"), dtype=dtype, device=args.device, family_name=family.name)
    from ..runtime import progress_bar

    bar = progress_bar(4, "export", "step")  # load + probe, trace + save, write the folder, verify
    try:
        try:
            model = family.static_export_model(source, dtype=dtype)
            tok_from = [f for f in (prefix_path, source) if f and os.path.isfile(os.path.join(f, "tokenizer_config.json"))]
            tokenizer = family.load_tokenizer(tok_from[0] if tok_from else base)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"can't load model {source!r}: {_cause(e)}") from None
        model.eval()
        step = None if prefix_path else family.static_step(model)
        if step is not None:
            from ..cpu_kernels import apply_export

            apply_export(family, model)  # the program computes what the dynamic runner does on CPU (cheaper norms)
        desc = describe(probe(model, tokenizer, family)) if step is None else None
        bar.update()
        with Staging(args.output_path) as stage:
            try:
                if step is not None:
                    names = save_inplace(step, family, dtype, os.path.join(stage, args.model_prefix))
                else:
                    save_program(model, family, desc, dtype, os.path.join(stage, args.model_prefix))
            except Exception as e:  # dy2static's errors are long tracebacks of library code: name the cause in one line
                raise UserError(f"export: paddle could not turn the {family.name} forward into a static program: {_cause(e)}") from None
            bar.update()
            model.config.save_pretrained(stage)
            if os.path.isfile(os.path.join(source, "generation_config.json")):
                shutil.copy(os.path.join(source, "generation_config.json"), stage)
            save_tokenizer(family, [prefix_path, source, base], stage)
            if prefix_path:  # the prefix encoder's parameters, beside the program: they give the initial cache
                os.makedirs(os.path.join(stage, PREFIX_DIR))
                for name in os.listdir(prefix_path):
                    if name == "prefix_config.json" or name.startswith(("prefix_model_state", "peft_model")):
                        shutil.copy(os.path.join(prefix_path, name), os.path.join(stage, PREFIX_DIR))
            static_meta = {
                "format_version": FORMAT_VERSION if step is None else INPLACE_VERSION, "family": family.name,
                "model_prefix": args.model_prefix, "dtype": dtype,
                "paddle_version": paddle.__version__, "paddle_commit": getattr(paddle.version, "commit", None),
            }
            if step is None:
                static_meta.update({
                    "input_names": desc["input_names"], "input_dtypes": desc["input_dtypes"], "input_specs": desc["input_specs"],
                    "cache_key": desc["cache_key"], "cache_template": desc["cache_template"], "cache_shapes": desc["cache_shapes"],
                    "output_template": desc["output_template"], "constants": desc["constants"]})
            else:
                static_meta.update({"input_names": names, "layers": len(step.layers), "kv_heads": step.kv_heads,
                                    "head_dim": step.head_dim, "cache_key": getattr(step, "cache_key", "past_key_values")})
            static_meta.update({
                "prefix": PREFIX_DIR if prefix_path else None,
                "source": {"model": os.path.abspath(base) if os.path.isdir(base) else base,
                           "lora_path": os.path.abspath(lora_path) if lora_path else None,
                           "prefix_path": os.path.abspath(prefix_path) if prefix_path else None},
            })
            write_json(os.path.join(stage, META_NAME), static_meta)
            own = {k: v for k, v in meta.items() if k in ("src_length", "tgt_length", "chat_format", "chat_template")}
            own.update({k: getattr(args, k) for k in ("src_length", "tgt_length") if getattr(args, k)})
            own.update(family=family.name, kind="static", dtype=dtype)
            from ..families import META_FILE

            write_json(os.path.join(stage, META_FILE), own)
            bar.update()
            if args.verify_tokens:
                if prefix_path:
                    from paddlenlp.peft import PrefixModelForCausalLM

                    model = PrefixModelForCausalLM.from_pretrained(model, prefix_path, *family.prefix_hooks())
                    model.eval()
                verify(model, tokenizer, family, stage, args.verify_tokens)
            bar.update()
    finally:
        bar.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def verify(model, tokenizer, family, folder: str, new_tokens: int) -> None:
    """Greedy replies of the export (reloaded with paddle.inference) must equal the dynamic model's."""
    from ..generation import generate_ids
    from ..formats.static import load_static

    static_model, _ = load_static(folder, family)
    prompts = [family.generation_prompt(tokenizer, [t], [], 64) for t in ("spell: 1 2", "hello there, how are you today?", "x")]
    want = generate_ids(model, tokenizer, family, prompts, new_tokens)
    got = generate_ids(static_model, tokenizer, family, prompts, new_tokens)
    if got != want:
        raise UserError(f"export: the exported program generates {got} where the dynamic model generates {want}; "
                        f"nothing was written (please report this with the model's config.json)")


def _cause(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""  # dy2static puts the cause last
    return last if last.startswith(type(e).__name__) else f"{type(e).__name__}: {last}"
