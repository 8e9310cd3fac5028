"""Run a static-graph export (export_model.py) behind paddlenlp's generate().

The export folder holds ONE "step" program: the model forward taking input ids, mask, positions and a past
cache of any length (prefill = a step with a zero-length past). Generation stays in paddlenlp's generate()
on a 0-layer "shell" of the family's model class (a few MB: config, generation config, the class's
prepare/update hooks), whose forward is answered by a paddle.inference predictor. Everything above the
forward (bucketing, left padding, sampling, stop tokens, streaming) is therefore exactly dynamic mode's.

Format 3 (families with a decode runner and a Family.static_step: LLaMA, Qwen2, GPT, OPT, Bloom, ChatGLM2, ChatGLM, GLM;
families/inplace_step.py) exports an in-place step program instead: the runner's own step code, which writes the
new keys/values into the InPlaceRunner's preallocated cache in place (paddle.inference runs on the fed tensors'
memory) and attends over it as the dynamic decode runner does; the decode loop drives it in place of the model's
forward, and the shell's forward (InPlaceForward) answers from the same program for the paths that keep
generate(). Format-1 folders (prefix-tuning exports, older exports) run as before; format-2 folders (the split-
attention program of earlier versions) are refused with a re-export hint.

Measured pitfalls of paddle.inference on CPU (paddle 3.3.1), handled here:
- oneDNN, on by default, gives wrong values for a residual add + RMSNorm when a sequence dim is fixed to 1:
  oneDNN is turned off (it is also slower here) and every batch/sequence dim is dynamic in the export;
- predictor.run ignores the strides of sliced tensors (generate() feeds input_ids[:, -1:] views): every
  input is made contiguous first;
- the tensors predictor.run returns may live in memory it reuses on the next run: they are copied;
- the executor frees each intermediate tensor through a garbage-collector thread that spins while it waits for the
  next one: on a 2-core machine it took ~1 ms of CPU per decode step from the two math threads, so the static step
  was slower than the dynamic loop. create_predictor makes it free them in batches (GC_BATCH_GB).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from ..arguments import UserError
from ..cpu_kernels import prefill_chunks

FORMAT_VERSION = 1  # the model forward with a concatenated cache (any family; prefix-tuning exports)
INPLACE_VERSION = 3  # families/inplace_step.py's program: writes the runner's preallocated KV cache in place (format 2: split attention, retired)
FORMAT_VERSIONS = (FORMAT_VERSION, INPLACE_VERSION)
KV_GROW = 64  # the in-place cache starts at prompt + this many slots (at most the capacity asked), grows by at least as many
# paddle.inference's executor collects freed intermediates until this many GB, then frees them in one task of its
# garbage-collector thread (FLAGS_eager_delete_tensor_gb; paddle's default 0 hands every tensor to that thread,
# which then spins). A decode step's intermediates are a few MB at most, so a prompt's large ones still go at once.
GC_BATCH_GB = 0.01
META_NAME = "static_meta.json"
PREFIX_DIR = "prefix"  # prefix-tuning parameters of an export, beside the program


# --------------------------------------------------------------------------- nested containers <-> flat lists
def flatten(obj, out: Optional[List] = None) -> List:
    """The tensors of a nested tuple/list/namedtuple, depth first, in order."""
    out = [] if out is None else out
    if isinstance(obj, (tuple, list)):
        for x in obj:
            flatten(x, out)
    else:
        out.append(obj)
    return out


def template_of(obj, counter: Optional[List[int]] = None):
    """A JSON description of a nested container: leaves become their index in flatten(obj)."""
    counter = [0] if counter is None else counter
    if isinstance(obj, (tuple, list)):
        kind = type(obj)
        name = kind.__name__ if kind in (tuple, list) else f"{kind.__module__}:{kind.__qualname__}"
        return {"type": name, "items": [template_of(x, counter) for x in obj]}
    counter[0] += 1
    return counter[0] - 1


def rebuild(template, flat: List, classes: Optional[Dict[str, type]] = None):
    """Inverse of template_of: the nested container of `template` holding the tensors of `flat`.

    Other container types (OPT's MultiHeadAttention.Cache namedtuple) are rebuilt from `classes` when given
    (while tracing, where the model checks them), else as plain tuples (generate() only hands them back)."""
    if isinstance(template, int):
        return flat[template]
    items = [rebuild(t, flat, classes) for t in template["items"]]
    name = template["type"]
    if name == "list":
        return items
    if classes and name in classes:
        return classes[name](*items)
    return tuple(items)


def container_classes(obj, out: Optional[Dict[str, type]] = None) -> Dict[str, type]:
    """template_of's type names -> the container classes found in `obj`."""
    out = {} if out is None else out
    if isinstance(obj, (tuple, list)):
        kind = type(obj)
        if kind not in (tuple, list):
            out[f"{kind.__module__}:{kind.__qualname__}"] = kind
        for x in obj:
            container_classes(x, out)
    return out


# --------------------------------------------------------------------------- folder checks
def is_static_folder(path: Optional[str]) -> bool:
    """Whether `path` is a folder written by export_model.py (cheap: reads paddlellm_meta.json only)."""
    from ..files import read_meta

    return bool(path) and os.path.isdir(path) and read_meta(path).get("kind") == "static"


def refuse_if_static(path: Optional[str]) -> None:
    """UserError for a static export where a model with weights is loaded (training, merging, quantizing):
    the export holds a program, which only predict and serve run."""
    if is_static_folder(path):
        raise UserError(f"model_name_or_path {path!r} is a static-graph export (export_model.py): only predict and serve "
                        f"run it (--mode static); fine-tune, merge or quantize its dynamic source model instead")


def read_static_meta(path: str) -> Dict:
    """static_meta.json of an export, or a UserError saying to re-export when it is missing or of another version."""
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        raise UserError(f"{path!r}: no {META_NAME} (not a complete static export); re-export it with export_model.py")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format_version") not in FORMAT_VERSIONS:
        raise UserError(f"{meta_path}: static export format {meta.get('format_version')!r}, this paddlellm reads formats "
                        f"{', '.join(map(str, FORMAT_VERSIONS))}; re-export it with this version's export_model.py")
    import paddle

    saved_major = str(meta.get("paddle_version", "")).split(".")[0]
    if saved_major != paddle.__version__.split(".")[0]:
        raise UserError(f"{meta_path}: exported with paddle {meta.get('paddle_version')}, running paddle {paddle.__version__}; "
                        f"re-export it with export_model.py")
    return meta


def check_static_request(path: str, mode: Optional[str], lora_path: Optional[str], prefix_path: Optional[str]) -> bool:
    """Whether to load `path` in static mode; UserError for the combinations that cannot work."""
    static = is_static_folder(path)
    if mode == "static" and not static:
        raise UserError(f"--mode static: {path!r} is not a static export; export it first: "
                        f"python export_model.py --model_name_or_path {path} --output_path OUT")
    if not static:
        return False
    if mode == "dynamic":
        raise UserError(f"{path!r} is a static-graph export: it runs only with --mode static (or no --mode)")
    if lora_path or prefix_path:
        flag = "lora_path" if lora_path else "prefix_path"
        raise UserError(f"--{flag} can't be applied to the static export {path!r}; export with --{flag} instead "
                        f"(python export_model.py --model_name_or_path BASE --{flag} ... --output_path OUT)")
    return True


# --------------------------------------------------------------------------- the forward answered by the predictor
def cpu_threads() -> int:
    """The math-thread count our CPU runtime chose (a paddle.inference Config defaults to 1)."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS") or 1))
    except ValueError:
        return 1


def create_predictor(path: str, meta: Dict):
    """A paddle.inference predictor of the step program, oneDNN off (see the module docstring), our thread count."""
    import paddle
    import paddle.inference as paddle_infer

    config = paddle_infer.Config(os.path.join(path, meta["model_prefix"] + ".json"), os.path.join(path, meta["model_prefix"] + ".pdiparams"))
    device = paddle.get_device()
    if device.startswith("gpu"):  # not exercised on the CPU machines this project is tested on
        config.enable_use_gpu(256, int(device.split(":")[1]) if ":" in device else 0)
    else:
        config.disable_gpu()
        config.disable_mkldnn()
        config.set_cpu_math_library_num_threads(cpu_threads())
        _batch_garbage_collection()
    config.switch_ir_optim(True)
    config.disable_glog_info()
    predictor = paddle_infer.create_predictor(config)
    names = list(predictor.get_input_names())
    want = list(meta["input_names"])
    if meta["format_version"] == FORMAT_VERSION:
        want += [f"cache_{i}" for i in range(len(meta["cache_shapes"]))]
    if names != want:
        raise UserError(f"{path!r}: the program's inputs {names} differ from {META_NAME}; re-export it with export_model.py")
    return predictor, config


def _batch_garbage_collection() -> None:
    """Workaround (paddle 3.3 CPU): the executor's garbage collector (new_executor/garbage_collector/
    event_garbage_collector.cc) hands every freed intermediate to a thread that spins between tasks; with paddle's
    default threshold (0) that thread stayed busy through every step, ~1 ms of CPU per GPT decode step (bench
    shape) taken from the two math threads of a 2-core machine, and the in-place static step ran 0.9-1.0x the
    dynamic loop. Batched (GC_BATCH_GB), it wakes every few steps and the same step ran 1.1-1.2x. Only static-graph
    executors read this flag (its threshold is read when a predictor builds its collector); a value the user set in
    the environment is kept."""
    import paddle

    if "FLAGS_eager_delete_tensor_gb" not in os.environ and paddle.get_flags("FLAGS_eager_delete_tensor_gb")["FLAGS_eager_delete_tensor_gb"] == 0.0:
        paddle.set_flags({"FLAGS_eager_delete_tensor_gb": GC_BATCH_GB})


def _restore_math_threads() -> None:
    """Workaround (paddle 3.3 CPU): a paddle.inference predictor's run leaves the calling thread's math library
    on one thread, so every dynamic op after it (the decode loop's logits processing here, and any dynamic model
    in the same process) ran single-threaded: a batch-8 dynamic decode measured 0.41 s after one static run
    against 0.28 s before. Set our CPU runtime's thread count back after each run."""
    import paddle

    paddle.base.core.set_num_threads(cpu_threads())


class StaticForward:
    """A model forward answered by the step program: same keyword arguments, same (logits, cache) output."""

    def __init__(self, predictor, config, meta: Dict):
        self.predictor = predictor
        self.config = config  # the paddle.inference Config (oneDNN off on CPU)
        self.names = meta["input_names"]
        self.dtypes = meta["input_dtypes"]
        self.cache_key = meta["cache_key"]
        self.cache_shapes = meta["cache_shapes"]  # per cache tensor: shape with "batch" / "seq" for the dynamic axes
        self.cache_dtype = meta["dtype"]
        self.output_template = meta["output_template"]

    def empty_cache(self, batch: int) -> List:
        import paddle

        return [paddle.zeros([batch if d == "batch" else 0 if d == "seq" else d for d in shape], dtype=self.cache_dtype)
                for shape in self.cache_shapes]

    def __call__(self, *args, **kwargs):
        if args:
            kwargs = dict(zip(["input_ids"], args), **kwargs)
        feeds = []
        for name, dtype in zip(self.names, self.dtypes):
            value = kwargs.get(name)
            if value is None:
                raise ValueError(f"static forward: input {name!r} missing")
            # contiguous(): predictor.run reads the raw buffer of a strided view (only row 0 would be right).
            feeds.append(value.astype(dtype).contiguous())
        cache = kwargs.get(self.cache_key)
        flat = flatten(cache) if cache is not None else self.empty_cache(feeds[0].shape[0])
        if len(flat) != len(self.cache_shapes):
            raise ValueError(f"static forward: {len(flat)} cache tensors given, the program takes {len(self.cache_shapes)}")
        outputs = self.predictor.run(feeds + [t.contiguous() for t in flat])
        _restore_math_threads()
        # clone(): the tensors run() returns can share memory the predictor reuses on its next run, and the
        # cache returned now is fed back in then (seen with OPT: its next step read an overwritten cache).
        return rebuild(self.output_template, [t.clone() for t in outputs])



# --------------------------------------------------------------------------- in-place exports (format 3)
class InPlaceProgram:
    """The step program of an in-place export (families/inplace_step.py) and what its runners share.

    run(input_ids [B, L], positions [B, L], mask [B, L, C], slot, caches [B, kv, C, D] per layer key then value) ->
    last logits [B, vocab]; the program writes the L new keys/values into cache slots [slot, slot + L) in place."""

    def __init__(self, predictor, config, meta: Dict):
        self.predictor = predictor
        self.config = config
        self.layers = meta["layers"]
        self.kv_heads = meta["kv_heads"]
        self.head_dim = meta["head_dim"]
        self.dtype = meta["dtype"]
        # a program whose family derives positions from the mask (OPT, Bloom) has no positions input
        self.reads_positions = "positions" in meta.get("input_names", ["positions"])
        self.cache_key = meta.get("cache_key", "past_key_values")
        self._slots: Dict[int, object] = {}  # slot -> its [1] int64 input tensor (_slot)

    def run(self, input_ids, positions, mask, slot: int, caches):
        import paddle

        feeds = [input_ids.astype("int64").contiguous()]
        feeds += [positions.astype("int64").contiguous()] if self.reads_positions else []
        feeds += [mask.contiguous(), self._slot(slot)]
        for t in caches:  # written in place: each must be its own dense buffer (contiguous() of a dense one is itself)
            feeds.append(t.contiguous())
            if feeds[-1] is not t:
                raise ValueError("the in-place static program writes its cache tensors: pass dense ones")
        outputs = self.predictor.run(feeds)
        _restore_math_threads()
        # clone(): run()'s outputs can live in memory the predictor reuses on its next run
        return outputs[0].clone()

    def _slot(self, slot: int):
        """The [1] int64 input holding `slot`, made once per slot: paddle.to_tensor right after a predictor run measured
        0.1-0.3 ms (a decode step of the bench shape is ~5 ms), a cached tensor nothing."""
        import paddle

        tensor = self._slots.get(slot)
        if tensor is None:
            tensor = self._slots[slot] = paddle.to_tensor([slot], dtype="int64")
        return tensor

    def empty_cache(self, batch: int, capacity: int) -> List:
        """Zeroed key/value caches [batch, kv_heads, capacity, head_dim], one buffer per tensor (the program writes them)."""
        import paddle

        return [paddle.zeros([batch, self.kv_heads, capacity, self.head_dim], dtype=self.dtype) for _ in range(2 * self.layers)]


def _additive(allowed):
    """bool -> 0 where allowed, float32 min elsewhere."""
    import paddle

    return paddle.where(allowed, paddle.zeros([1], "float32"), paddle.full([1], paddle.finfo(paddle.float32).min, "float32"))


class InPlaceRules:
    """How a family's generation inputs feed the in-place program (hooks; the defaults are a causal LM's: a [B, L]
    attention mask, [B, L] positions, the last position + 1 per step). A family with other rules (the prefix LMs
    ChatGLM and GLM: a 4-D prompt mask, [B, 2, L] positions) passes a subclass down from Family.static_rules:
    formats/ does not import families/."""

    def prompt(self, inputs, batch: int, length: int):
        """(keep [B, L] bool: the prompt columns its last position attends, which every step attends too (generate()
        extends the mask by one per step); positions as the family holds them)."""
        import paddle

        mask = inputs.get("attention_mask")
        if mask is None:
            mask = paddle.ones([batch, length], dtype="int64")
        if len(mask.shape) != 2:
            raise ValueError("the in-place static runner takes a [batch, length] attention mask")
        positions = inputs.get("position_ids")
        if positions is None:  # as LlamaForCausalLM.prepare_inputs_for_generation
            positions = paddle.arange(length).expand((batch, length))
        return mask.astype("bool"), positions

    def chunk(self, inputs, keep, positions, pick, start: int):
        """(allowed [n, span, L] bool: the prompt columns rows start..L-1 of a prefill chunk attend; the chunk's
        positions as fed); pick(t) gathers the chunk's rows."""
        import paddle

        length = keep.shape[1]
        causal = paddle.arange(length).unsqueeze(0) <= paddle.arange(start, length).unsqueeze(1)  # [span, L]
        return pick(keep)[:, None, :] & causal[None], pick(positions)[:, start:]

    def last(self, positions, length: int):
        """What the steps advance from (length: the prompt's)."""
        return positions[:, -1:]

    def advance(self, state):
        """(the next state, the positions a step feeds)."""
        state = state + 1
        return state, state

    def forward_inputs(self, attention_mask, position_ids, batch: int, done: int, length: int):
        """generate()'s forward arguments -> (allowed [B, L, done + L] bool, positions) for InPlaceForward."""
        import paddle

        if attention_mask is None:
            attention_mask = paddle.ones([batch, done + length], dtype="int64")
        if len(attention_mask.shape) != 2:
            raise ValueError("the in-place static forward takes a [batch, length] attention mask")
        if position_ids is None:
            position_ids = paddle.arange(done, done + length).expand((batch, length))
        causal = paddle.arange(done + length).unsqueeze(0) <= paddle.arange(done, done + length).unsqueeze(1)
        return attention_mask.astype("bool")[:, None, :] & causal[None], position_ids

    def forward_output(self, logits, cache):
        """The model forward's output from the last logits [B, 1, vocab] and the per-layer (key, value) cache."""
        return logits, cache


class InPlaceRunner:
    """The decode loop's runner over an in-place export (the dynamic DecodeCore runners' API): prefill(inputs,
    capacity) -> [batch, vocab] logits of the prompt's last position; step(tokens [batch, 1]) -> the next.

    It holds the KV cache preallocated as [batch, kv_heads, capacity, head_dim] per layer (the prompt plus KV_GROW
    slots at first, grown by one copy when used up) with an additive mask over it; the program writes each step's
    new keys/values into their slot and attends over the whole capacity, unwritten slots masked. The prompt runs
    in chunks of rows of similar length, each over its own longest prompt (no padding computed)."""

    def __init__(self, program: InPlaceProgram, rules: Optional[InPlaceRules] = None):
        self.program = program
        self.rules = rules or InPlaceRules()  # the family's masks and positions

    def prefill(self, inputs: Dict, capacity: int):
        import numpy as np
        import paddle

        ids = inputs["input_ids"]
        batch, length = ids.shape
        prompt, positions = self.rules.prompt(inputs, batch, length)
        prog = self.program
        self.max_capacity = capacity
        capacity = min(capacity, length + KV_GROW)
        free = paddle.zeros([batch, capacity - length], dtype="bool")
        self.mask = _additive(paddle.concat([prompt, free], axis=1))  # [B, C]: 0 at the kept slots, min at padding and free slots
        self.next_slot, self.capacity = length, capacity
        self.positions = self.rules.last(positions, length)

        real = prompt.numpy()
        first = np.where(real.any(1), real.argmax(1), length)  # first attended column per row (left padding)
        chunks = prefill_chunks(length - first)
        pad = capacity - length
        caches: List[List] = [[] for _ in range(2 * prog.layers)]
        logits = []
        for rows in chunks:
            start = min(int(first[rows].min()), length - 1)
            sel = paddle.to_tensor(rows) if len(chunks) > 1 else None
            pick = (lambda t: paddle.gather(t, sel)) if sel is not None else (lambda t: t)
            n, span = len(rows), length - start
            # the chunk runs on a cache of its own span (written whole: paddle's set_value over a whole tensor is
            # ~4x cheaper than over a slice of one, and attention covers the span only), then gets its slots in the
            # batch's capacity as the dynamic runner's prefill builds them (columns before start: padding in every row)
            allowed, chunk_positions = self.rules.chunk(inputs, prompt, positions, pick, start)  # [n, span, L]
            block = _additive(allowed[:, :, start:length])
            cache = prog.empty_cache(n, span)
            logits.append(prog.run(pick(ids)[:, start:], chunk_positions, block, 0, cache))
            for i, t in enumerate(cache):
                parts = [paddle.zeros([n, prog.kv_heads, start, prog.head_dim], prog.dtype)] if start else []
                parts += [t] + ([paddle.zeros([n, prog.kv_heads, pad, prog.head_dim], prog.dtype)] if pad else [])
                caches[i].append(paddle.concat(parts, axis=2) if len(parts) > 1 else t)
        if len(chunks) > 1:
            back = paddle.to_tensor(np.argsort(np.concatenate(chunks)))
            self.cache = [paddle.gather(paddle.concat(c), back) for c in caches]
            return paddle.gather(paddle.concat(logits), back)
        self.cache = [c[0] for c in caches]
        return logits[0]

    def _grow(self, capacity: int) -> None:
        """Copy the cache and mask into room for `capacity` tokens (new slots masked like padding)."""
        import paddle

        prog, extra, batch = self.program, capacity - self.capacity, self.mask.shape[0]
        self.mask = paddle.concat([self.mask, paddle.full([batch, extra], paddle.finfo(paddle.float32).min, "float32")], axis=1)
        zeros = paddle.zeros([batch, prog.kv_heads, extra, prog.head_dim], prog.dtype)
        self.cache = [paddle.concat([t, zeros], axis=2) for t in self.cache]
        self.capacity = capacity

    def step(self, tokens):
        slot = self.next_slot
        if slot >= self.capacity:
            if self.capacity >= self.max_capacity:
                raise ValueError(f"the KV cache holds {self.max_capacity} tokens; more were fed")
            self._grow(min(self.max_capacity, self.capacity + max(KV_GROW, self.capacity // 2)))
        self.positions, positions = self.rules.advance(self.positions)
        self.mask[:, slot] = 0.0  # the token attends to itself, and every later one to it (generate() extends the mask by one)
        self.next_slot += 1
        return self.program.run(tokens, positions, self.mask.unsqueeze(1), slot, self.cache)


class InPlaceForward:
    """A model forward (generate()'s keyword arguments, (logits [B, L=1, vocab], cache) out) answered by an in-place
    program, for the paths that keep paddlenlp's generate() (settings the decode loop does not reproduce). Its
    cache is per layer (key, value) [B, kv_heads, length, head_dim], grown by concatenation as paddlenlp's is."""

    def __init__(self, program: InPlaceProgram, rules: Optional[InPlaceRules] = None):
        self.program = program
        self.rules = rules or InPlaceRules()
        self.config = program.config  # the paddle.inference Config (oneDNN off on CPU)
        self.cache_key = program.cache_key  # the model's cache argument: past_key_values, or cache (OPT, Bloom)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        import paddle

        prog = self.program
        past_key_values = kwargs.get(self.cache_key)
        batch, length = input_ids.shape
        past = [t for kv in past_key_values for t in kv] if past_key_values else None
        done = past[0].shape[2] if past else 0
        allowed, position_ids = self.rules.forward_inputs(attention_mask, position_ids, batch, done, length)
        block = _additive(allowed)
        room = prog.empty_cache(batch, length)  # the new tokens' slots, written by the program
        cache = [paddle.concat([p, r], axis=2) for p, r in zip(past, room)] if past else room
        last = prog.run(input_ids, position_ids, block, done, cache)
        return self.rules.forward_output(last.unsqueeze(1), tuple((cache[2 * i], cache[2 * i + 1]) for i in range(prog.layers)))


def inplace_runner(model) -> Optional[InPlaceRunner]:
    """The decode loop's runner for the generate() host of an in-place export, or None for any other model."""
    forward = model.__dict__.get("forward")
    return InPlaceRunner(forward.program, forward.rules) if isinstance(forward, InPlaceForward) else None


def build_shell(family, path: str, meta: Dict):
    """A 0-layer model of the family's class: hosts generate() (config, generation config, hooks), no weights to speak of."""
    from paddlenlp.generation import GenerationConfig

    config_class = family.paddlenlp_class("config_class")
    config = config_class.from_pretrained(path)
    for key, value in family.static_shell_overrides(config).items():
        setattr(config, key, value)
    model = family.static_shell_patch(family.paddlenlp_class("model_class")._from_config(config, dtype=meta["dtype"]))
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model


def load_static(path: str, family, tokenizer_path: Optional[str] = None, chat_template: Optional[str] = None):
    """(shell model with the static forward, tokenizer) of an export folder."""
    meta = read_static_meta(path)
    predictor, config = create_predictor(path, meta)
    shell = build_shell(family, path, meta)
    model = shell
    if meta.get("prefix"):
        # paddlenlp's own prefix wrapper: at the prompt it hands the prefix cache to the forward as the past
        # (the step program takes a past of any length) and prefixes the mask. Wrapped before the forward is
        # swapped: it reads the class forward's signature to name the cache argument.
        from paddlenlp.peft import PrefixModelForCausalLM

        model = PrefixModelForCausalLM.from_pretrained(shell, os.path.join(path, meta["prefix"]), *family.prefix_hooks())
        model.eval()
    # object.__setattr__: paddle's Layer.__setattr__ would otherwise wrap or refuse a plain callable.
    if meta["format_version"] == INPLACE_VERSION:
        forward = InPlaceForward(InPlaceProgram(predictor, config, meta), family.static_rules())
    else:
        forward = StaticForward(predictor, config, meta)
    object.__setattr__(shell, "forward", forward)
    tokenizer = family.load_tokenizer(tokenizer_path or path, chat_template=chat_template)
    return model, tokenizer
