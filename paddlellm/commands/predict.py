"""Batch generation over a src/tgt JSONL file.

    python predict_generation.py --model_name_or_path DIR --data_file dev.json --output_file out.json [--key value ...]

Each input line gets one output line {"src", "tgt", "output"} in input order: `src` as given, `tgt` the
reference reply (the final tgt turn when tgt has as many turns as src, else null) and `output` the
generated reply. Prompts are built by the model family exactly as fine-tuning builds them (a multi-turn
src uses the family's chat format, with the earlier replies taken from tgt).

Prompts of similar length are generated together (left padding, attention mask, KV cache), so little
compute goes to padding. Finished batches are appended to `<output_file>.partial` (flushed and synced
to disk); the output file itself appears, complete, only at the end (written to a temporary file and
renamed), so an interrupted run never leaves a corrupt output. `--resume true` continues from the
`.partial` file; the settings of a finished output are kept in `<output_file>.settings.json`, so
`--resume true` on it does nothing when they match and refuses changed ones. Under
`python -m paddle.distributed.launch --nproc_per_node N` the batches are shared among the N
processes (data parallel) and only rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..arguments import UserError, check_can_create, check_sampling, fail, make_dir, parse_args, require_at_least
from ..chat_template import check_choice as check_chat_template
from ..files import write_text_atomic
from ..runtime import select_device

DTYPES = ["float32", "float16", "bfloat16"]
DEFAULT_SRC_LENGTH = 1024
DEFAULT_TGT_LENGTH = 1024
JOURNAL_VERSION = 1
SEED_LIMIT = 2**64  # paddle.seed takes an unsigned 64-bit integer
RECORD_SUFFIX = ".settings.json"  # next to a finished output: the journal header it was written with


@dataclass
class PredictArgument:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Model folder (base, full fine-tune or merged), or a PaddleNLP model name. Optional when lora_path/prefix_path records its base model; a LoRA or prefix output folder may be given here directly."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated together. Batches group prompts of similar length, so larger batches waste little on padding."})
    src_length: Optional[int] = field(default=None, metadata={"help": f"Maximum prompt tokens (oldest turns dropped first). Default: the value saved by fine-tuning in the model/adapter folder, else {DEFAULT_SRC_LENGTH}."})
    tgt_length: Optional[int] = field(default=None, metadata={"help": f"Maximum generated tokens per reply. Default: the value saved by fine-tuning, else {DEFAULT_TGT_LENGTH}."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "LoRA adapters (an output folder of finetune_generation.py --lora)."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "Prefix-tuning parameters (an output folder of finetune_generation.py --prefix_tuning)."})
    top_k: int = field(default=1, metadata={"help": "Top-k sampling; 1 = greedy decoding (deterministic), 0 = no top-k limit."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p (nucleus) sampling threshold (used when top_k != 1)."})
    temperature: float = field(default=0.95, metadata={"help": "Sampling temperature (used when top_k != 1); 0 = greedy decoding, as in the server."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty > 1 discourages repeating tokens already in the prompt or reply."})
    seed: int = field(default=42, metadata={"help": "Random seed for sampling, 0 to 2**64 - 1 (each batch is seeded from it, so resumed runs sample the same way)."})
    data_file: Optional[str] = field(default=None, metadata={"help": "Input JSONL: one {\"src\": ..., \"tgt\": ...} object per line; tgt is optional."})
    output_file: str = field(default="output.json", metadata={"help": "Output JSONL: one {\"src\", \"tgt\", \"output\"} line per input line, in input order."})
    device: Optional[str] = field(default=None, metadata={"help": "cpu, gpu or gpu:N (default: gpu when this paddle build has CUDA and a GPU is present, else cpu)."})
    dtype: Optional[str] = field(default=None, metadata={"help": "Weight dtype (default: the dtype saved with the model/adapter, else float32). float16/bfloat16 need a GPU.", "choices": DTYPES})
    gpt: bool = field(default=False, metadata={"help": "PaddleNLP's flag for GPT checkpoints (GPTForCausalLM). The family is read from the model folder, so this only matters when it can't be: it then means --family gpt-3."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family, for a model name or folder that does not record one: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2. A folder that records another family is refused."})
    resume: bool = field(default=False, metadata={"help": "Continue an interrupted run from <output_file>.partial instead of starting over."})
    quant_runtime: str = field(default="float32", metadata={"help": "Quantized folders (paddlellm quant): float32 dequantizes the weights when loading; int8 keeps the integer weights resident and dequantizes each layer during the forward (less memory).", "choices": ["float32", "int8"]})
    mode: Optional[str] = field(default=None, metadata={"help": "dynamic (the default), or static: run a folder written by export_model.py with paddle.inference (chosen by itself for such a folder).", "choices": ["dynamic", "static"]})
    chat_template: Optional[str] = field(default=None, metadata={"help": "Chat template: a Jinja file, or none for the family's own format. Default: the model folder's own (chat_template.jinja or tokenizer_config.json chat_template) if it has one, else the family's format."})
    inference_model: bool = field(default=False, metadata={"help": "PaddleNLP's fused InferenceModel classes: refused (they need the GPU-only paddlenlp_ops); use --mode static."})


def parse(argv=None) -> PredictArgument:
    (args,) = parse_args([PredictArgument], argv, prog="predict_generation.py",
                         description="Generate a reply for every line of a src/tgt JSONL file with a base, merged, LoRA or prefix-tuned model.")
    if args.inference_model:
        fail("--inference_model: PaddleNLP's fused InferenceModel classes need paddlenlp_ops (GPU-only custom ops); "
             "export with export_model.py and use --mode static instead")
    if not args.data_file:
        fail("data_file is required: a JSONL file of {\"src\": ..., \"tgt\": ...} lines")
    if not args.output_file:
        fail("output_file is required")
    if not (args.model_name_or_path or args.lora_path or args.prefix_path):
        fail("model_name_or_path is required (a model folder or a PaddleNLP model name)")
    try:
        require_at_least({name: getattr(args, name) for name in ("batch_size", "src_length", "tgt_length")})
        check_sampling(args.top_k, args.top_p, args.temperature, args.repetition_penalty)
        check_chat_template(args.chat_template)
    except UserError as e:
        fail(str(e))
    if not 0 <= args.seed < SEED_LIMIT:
        fail(f"--seed must be in 0 .. 2**64 - 1, got {args.seed}")
    return args


# --------------------------------------------------------------------------- data
@dataclass
class Item:
    """One input line: what is generated from it and what is written for it."""

    src: object  # as given in the input (string or list)
    reference: Optional[str]  # tgt[-1] when tgt has as many turns as src
    turns: List[str]
    history: List[str]  # earlier replies of a multi-turn src


def read_items(path: str) -> List[Item]:
    from ..data import DataError, read_records

    if os.path.isdir(path):
        raise UserError(f"data_file {path!r} is a folder; give the JSONL file to predict on (e.g. {os.path.join(path, 'dev.json')!r})")
    if not os.path.isfile(path):
        raise UserError(f"data_file {path!r}: no such file")
    items = []
    for r in read_records(path, require_tgt=False):
        if len(r.tgt) < len(r.src) - 1:
            raise DataError(f"{r.where}: field 'tgt' must hold the {len(r.src) - 1} earlier replies of the multi-turn 'src' "
                            f"(and may add the reference reply), got {len(r.tgt)}")
        reference = r.tgt[-1] if len(r.tgt) == len(r.src) else None
        items.append(Item(r.raw_src, reference, r.src, r.tgt[: len(r.src) - 1]))
    return items


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plan_batches(lengths: List[int], batch_size: int, bucket: bool = True) -> List[List[int]]:
    """Indices into `lengths`, batched: by similar length (longest first) when `bucket`, else in input order."""
    from ..generation import length_buckets

    if bucket:
        return length_buckets(lengths, batch_size)
    return [list(range(i, min(i + batch_size, len(lengths)))) for i in range(0, len(lengths), batch_size)]


# --------------------------------------------------------------------------- journal
class Journal:
    """`<output_file>.partial`: a header line naming the run, then one line per finished prediction {"i", "src", "tgt", "output"}.

    Each batch is appended, flushed and fsync'ed, so a crash loses at most the batch in flight; a torn
    last line (a crash mid-write) is dropped when the journal is read back.
    """

    def __init__(self, path: str, header: Dict, record: Optional[str] = None):
        self.path = path
        self.header = header
        self.record = record  # where finish() keeps the header of the finished output
        self.file = None

    @staticmethod
    def read(path: str) -> Tuple[Optional[Dict], Dict[int, Dict]]:
        if not os.path.isfile(path):
            return None, {}
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            return None, {}
        rows = {}
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # only the last line can be torn: everything after it is unwritten
            rows[row.pop("i")] = row
        return header, rows

    def start(self, done: Dict[int, Dict]) -> None:
        """(Re)write the journal with the finished rows `done`, then keep it open for appending."""
        if self.record and os.path.exists(self.record):
            os.remove(self.record)  # it described the output this run replaces
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.header, ensure_ascii=False) + "\n")
            for i in sorted(done):
                f.write(json.dumps(dict(i=i, **done[i]), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def append(self, rows: Dict[int, Dict]) -> None:
        self.file.write("".join(json.dumps(dict(i=i, **row), ensure_ascii=False) + "\n" for i, row in sorted(rows.items())))
        self.file.flush()
        os.fsync(self.file.fileno())

    def finish(self, output_file: str, rows: Dict[int, Dict], count: int) -> None:
        """Write the complete output in input order (atomically) and remove the journal."""
        self.file.close()
        tmp = output_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for i in range(count):
                f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output_file)
        if self.record:
            write_text_atomic(self.record, json.dumps(self.header, ensure_ascii=False, indent=1) + "\n")
        os.remove(self.path)


def journal_header(args: PredictArgument, settings: Dict, data_digest: str, count: int) -> Dict:
    """What must match for a resumed run to continue a journal."""
    return {
        "paddlellm_predict_journal": JOURNAL_VERSION,
        "data_sha256": data_digest,
        "records": count,
        "settings": {k: settings[k] for k in ("model", "lora_path", "prefix_path", "src_length", "tgt_length", "dtype")}
        | {k: getattr(args, k) for k in ("top_k", "top_p", "temperature", "repetition_penalty", "seed", "chat_template")},
    }


def check_same_run(old_header: Dict, header: Dict, what: str, advice: str) -> None:
    """UserError naming what differs when `old_header` (a journal's or a finished output's) is not this run's."""
    if old_header.get("data_sha256") != header["data_sha256"] or old_header.get("records") != header["records"]:
        raise UserError(f"--resume: {what} was written for a different data_file; {advice}")
    old, new = old_header.get("settings", {}), header["settings"]
    changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if changed:
        raise UserError(f"--resume: {what} was written with other settings ({', '.join(changed)}); {advice}")


def finished_already(args: PredictArgument, header: Dict) -> bool:
    """--resume on a finished output: True when it was written by this very run (nothing to do);
    UserError when its recorded data or settings differ; False (generate again) when it records none."""
    if not (args.resume and not os.path.exists(args.output_file + ".partial") and _complete(args.output_file, header["records"])):
        return False
    try:
        with open(args.output_file + RECORD_SUFFIX, encoding="utf-8") as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        print(f"predict: --resume: {args.output_file} records no settings to compare ({args.output_file}{RECORD_SUFFIX} is missing); "
              "generating it again", file=sys.stderr)
        return False
    check_same_run(recorded, header, args.output_file, "drop --resume to generate it again")
    return True


def resume_rows(args: PredictArgument, partial: str, header: Dict) -> Dict[int, Dict]:
    """Finished rows to keep from an earlier run's journal ({} when starting over)."""
    old_header, rows = Journal.read(partial)
    if not args.resume:
        if rows:
            print(f"predict: starting over; discarding {len(rows)} finished lines in {partial} (pass --resume true to continue them)", file=sys.stderr)
        return {}
    if old_header is None:
        print(f"predict: --resume: no {partial} to continue; starting from the beginning", file=sys.stderr)
        return {}
    check_same_run(old_header, header, partial, "drop --resume to start over")
    return {i: r for i, r in rows.items() if 0 <= i < header["records"]}


def saved_dtype(base: str, lora_path: Optional[str], prefix_path: Optional[str], meta: Dict) -> Optional[str]:
    """The dtype the model/adapter was saved with: our metadata, the adapter config, else the model config."""
    if meta.get("dtype"):
        return meta["dtype"]
    for folder, name in ((lora_path, "lora_config.json"), (prefix_path, "prefix_config.json"), (base, "config.json")):
        path = os.path.join(folder, name) if folder else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                dtype = json.load(f).get("dtype")
            if dtype:
                return dtype
    return None


def resolve_settings(args: PredictArgument) -> Dict:
    """Model, adapters, family, lengths and dtype, each from the arguments, else the saved settings, else defaults."""
    from ..loading import resolve_model

    try:
        base, lora_path, prefix_path, family, meta = resolve_model(args.model_name_or_path, args.lora_path, args.prefix_path, args.family)
    except UserError:
        if not args.gpt or args.family:
            raise
        # PaddleNLP's --gpt loads GPTForCausalLM: here it names the family when the folder or name can't.
        base, lora_path, prefix_path, family, meta = resolve_model(args.model_name_or_path, args.lora_path, args.prefix_path, "gpt-3")
    return {
        "model": os.path.abspath(base) if os.path.isdir(base) else base,
        "lora_path": os.path.abspath(lora_path) if lora_path else None,
        "prefix_path": os.path.abspath(prefix_path) if prefix_path else None,
        "family": family,
        "meta": meta,
        "src_length": args.src_length or meta.get("src_length") or DEFAULT_SRC_LENGTH,
        "tgt_length": args.tgt_length or meta.get("tgt_length") or DEFAULT_TGT_LENGTH,
        "dtype": args.dtype,
    }


def choose_dtype(args: PredictArgument, settings: Dict, device: str) -> str:
    """The requested dtype, else the saved one; half precision only where paddle has the kernels (not CPU)."""
    if args.dtype:
        if device == "cpu" and args.dtype != "float32":
            raise UserError(f"--dtype {args.dtype}: paddle's CPU kernels have no {args.dtype} matmul; use --dtype float32 on CPU (or a GPU)")
        return args.dtype
    dtype = saved_dtype(settings["model"], settings["lora_path"], settings["prefix_path"], settings["meta"]) or "float32"
    if dtype not in DTYPES:
        dtype = "float32"
    if device == "cpu" and dtype != "float32":
        print(f"predict: the model was saved in {dtype}; running in float32 on CPU", file=sys.stderr)
        dtype = "float32"
    return dtype


def max_positions(model) -> Optional[int]:
    """The longest sequence the model's position embeddings cover (None: no hard limit, e.g. ALiBi)."""
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if config is None and inner is not None:
        config = getattr(inner, "config", None)
    for name in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


class Distributed:
    """Rank/world of a `paddle.distributed.launch` run (world 1 otherwise) and the one collective we need."""

    def __init__(self):
        self.world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1") or 1)
        self.rank = int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)
        if self.world > 1:
            import paddle.distributed as dist

            dist.init_parallel_env()
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        import paddle.distributed as dist

        out: List = []
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import paddle.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# --------------------------------------------------------------------------- main loop
def predict(model, tokenizer, family, prompts: List[List[int]], todo: List[List[int]], batch_ids: List[int], tgt_length: int,
            args: PredictArgument, on_batch, dist: Optional[Distributed] = None) -> None:
    """Generate the batches `todo` (lists of prompt indices; batch_ids[k] seeds batch k), sharing them among
    the processes of `dist`; `on_batch({index: reply ids}, seconds)` is called on rank 0 after each step."""
    import paddle

    from ..generation import generate_ids

    dist = dist or Distributed()
    limit = max_positions(model)
    # temperature 0 means greedy decoding (as in the server), which paddlenlp's sampling can't do (it divides by it).
    top_k = 1 if args.temperature == 0 else args.top_k
    sampling = dict(top_k=top_k, top_p=args.top_p, temperature=args.temperature, repetition_penalty=args.repetition_penalty)
    steps = (len(todo) + dist.world - 1) // dist.world
    for step in range(steps):
        k = step * dist.world + dist.rank
        start = time.time()
        result: Dict[int, List[int]] = {}
        if k < len(todo):
            idx = todo[k]
            batch = [prompts[i] for i in idx]
            new_tokens = tgt_length
            if limit is not None:
                new_tokens = max(1, min(tgt_length, limit - max(len(p) for p in batch)))
            paddle.seed((args.seed + batch_ids[k]) % SEED_LIMIT)
            for i, ids in zip(idx, generate_ids(model, tokenizer, family, batch, new_tokens, **sampling)):
                result[i] = ids
        merged: Dict[int, List[int]] = {}
        for part in dist.gather(result):
            merged.update(part)
        if dist.rank == 0:
            on_batch(merged, time.time() - start)


def run(argv=None) -> int:
    args = parse(argv)
    try:
        # Everything that can be checked cheaply is checked before paddle loads and before anything is written.
        items = read_items(args.data_file)
        settings = resolve_settings(args)
        if os.path.isdir(args.output_file):
            raise UserError(f"output_file {args.output_file!r} is a folder")
        check_can_create(os.path.dirname(os.path.abspath(args.output_file)), "the folder of output_file")
        from ..runtime import setup_runtime

        setup_runtime()
        return _run(args, items, settings)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        partial = args.output_file + ".partial"
        kept = len(Journal.read(partial)[1])
        if kept:
            print(f"predict: {kept} of {len(items)} lines are kept in {partial}; add --resume true to the same command to continue", file=sys.stderr)
        fail("interrupted", status=130)


def _run(args: PredictArgument, items: List[Item], settings: Dict) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.output_file))
    partial = args.output_file + ".partial"
    dist = Distributed()
    device = select_device(args.device)
    settings["dtype"] = choose_dtype(args, settings, device)
    header = journal_header(args, settings, file_digest(args.data_file), len(items))
    if finished_already(args, header):
        print(f"predict: --resume: {args.output_file} is already complete ({len(items)} lines, same data and settings); nothing to do", file=sys.stderr)
        return 0
    done = resume_rows(args, partial, header) if dist.rank == 0 else {}
    done = dist.broadcast(done)

    from ..loading import load_for_inference

    try:
        model, tokenizer, family, _ = load_for_inference(settings["model"], settings["lora_path"], settings["prefix_path"],
                                                         settings["dtype"], family=settings["family"], mode=args.mode,
                                                         quant_runtime=args.quant_runtime, chat_template=args.chat_template)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"can't load model {settings['model']!r}: {type(e).__name__}: {first}") from None
    _cast(model, settings["dtype"])

    prompts = [family.generation_prompt(tokenizer, it.turns, it.history, settings["src_length"]) for it in items]
    batches = plan_batches([len(p) for p in prompts], args.batch_size)
    todo, batch_ids = [], []
    for b, idx in enumerate(batches):
        rest = [i for i in idx if i not in done]
        if rest:
            todo.append(rest)
            batch_ids.append(b)

    rows = dict(done)
    journal = None
    bar = None
    stats = {"tokens": 0, "seconds": 0.0}
    if dist.rank == 0:
        make_dir(out_dir, "the folder of output_file")
        journal = Journal(partial, header, args.output_file + RECORD_SUFFIX)
        journal.start(done)
        from ..runtime import progress_bar

        bar = progress_bar(len(items), "predict", "line", initial=len(done))

    def on_batch(replies: Dict[int, List[int]], seconds: float) -> None:
        from ..generation import decode

        new = {i: {"src": items[i].src, "tgt": items[i].reference, "output": decode(tokenizer, ids)} for i, ids in replies.items()}
        journal.append(new)
        rows.update(new)
        stats["tokens"] += sum(len(ids) for ids in replies.values())
        stats["seconds"] += seconds
        if bar is not None:
            bar.update(len(new))
            bar.set_postfix(tok_s=f"{stats['tokens'] / max(stats['seconds'], 1e-9):.1f}")

    predict(model, tokenizer, family, prompts, todo, batch_ids, settings["tgt_length"], args, on_batch, dist)
    if dist.rank == 0:
        if bar is not None:
            bar.close()
        journal.finish(args.output_file, rows, len(items))
        rate = stats["tokens"] / max(stats["seconds"], 1e-9)
        print(f"predict: wrote {len(items)} lines to {args.output_file} ({len(items) - len(done)} generated now, "
              f"{stats['tokens']} tokens in {stats['seconds']:.1f} s, {rate:.1f} tokens/s)", file=sys.stderr)
    return 0


def _complete(path: str, count: int) -> bool:
    """Whether `path` is a finished output of `count` lines (finished outputs are only ever written whole)."""
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return len(rows) == count and all(isinstance(r, dict) and "output" in r for r in rows)


def _cast(model, dtype: str) -> None:
    """Adapters keep the dtype they were trained in; bring every weight to the dtype the base was loaded in."""
    if any(p.dtype != model.parameters()[0].dtype for p in model.parameters()):
        model.to(dtype=dtype)


def main(argv=None) -> int:
    return run(argv)
