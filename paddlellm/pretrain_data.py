"""Pretraining data: a text corpus -> PaddleNLP's mmap token files, and finding those files again.

    python create_pretraining_data.py --model_name_or_path MODEL --input_path corpus/ --output_prefix data/corpus --append_eos

Writes exactly what PaddleNLP's `llm/tools/preprocess/create_pretraining_data.py` writes, through
paddlenlp's own builder: `PREFIX.bin` (all token ids, uint16 when every id fits, else int32) and
`PREFIX.idx` (header `MMIDIDX`, item sizes, pointers, document index), one item per document, no BOS,
one EOS per document with --append_eos. So files move both ways between PaddleNLP and paddlellm.
`PREFIX.json` (ignored by PaddleNLP) records the tokenizer, so that run_pretrain.py can refuse data
made with another one. The run side reads the older `PREFIX_ids.npy` + `PREFIX_idx.npz` pairs too.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .arguments import UserError, check_can_create, require_at_least

SIDECAR = ".json"  # PREFIX.json: tokenizer identity and corpus statistics (PaddleNLP ignores it)
UINT16_LIMIT = 2**16 - 1  # PaddleNLP stores uint16 when ids are below this (its vocab_size < 65535 rule)


# --------------------------------------------------------------------------- reading the corpus
def collect_inputs(input_path: str) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(files to read in order, [(file, why not read)]) under input_path."""
    if not os.path.exists(input_path):
        raise UserError(f"--input_path {input_path!r}: no such file or folder")
    if os.path.isfile(input_path):
        candidates = [input_path]
    else:
        candidates = []
        for root, dirs, files in os.walk(input_path):
            dirs.sort()
            candidates += [os.path.join(root, f) for f in sorted(files)]
    read, skipped = [], []
    for path in candidates:
        low = path.lower()
        if low.endswith(".zst"):
            try:
                import zstandard  # noqa: F401
                read.append(path)
            except ImportError:
                skipped.append((path, "pip install zstandard to read .zst"))
        elif low.endswith((".jsonl", ".txt")):
            read.append(path)
        else:
            skipped.append((path, "not .jsonl, .jsonl.zst or .txt"))
    return read, skipped


def _binary_lines(path: str):
    if path.lower().endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw:
            yield from io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    else:
        with open(path, "rb") as f:
            yield from f


def _text_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(line number, text without line end) of a UTF-8 file; a bad byte is a UserError naming file and line."""
    for number, raw in enumerate(_binary_lines(path), 1):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8") from None
        yield number, text.rstrip("\r\n")


def read_documents(path: str, json_key: str) -> Iterator[Tuple[str, int, str]]:
    """(file, line, text) of every document of one input file, validated."""
    is_json = not path.lower().endswith(".txt")
    if is_json:
        for number, line in _text_lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise UserError(f"{path}:{number}: no {json_key!r} field (--json_key {json_key})")
            text = obj[json_key]
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: field {json_key!r} must be a string, got {type(text).__name__}")
            yield path, number, text
        return
    # plain text: documents separated by blank lines (PaddleNLP's trans_to_json.py convention)
    start, lines = 0, []
    for number, line in _text_lines(path):
        if line.strip():
            start = start or number
            lines.append(line)
        elif lines:
            yield path, start, "\n".join(lines)
            start, lines = 0, []
    if lines:
        yield path, start, "\n".join(lines)


# --------------------------------------------------------------------------- writing the mmap pair
def choose_dtype(max_id: int):
    """PaddleNLP's rule (uint16 below 65535), applied to the largest id actually seen."""
    return np.uint16 if max_id < UINT16_LIMIT else np.int32


def write_mmap(prefix: str, documents: Sequence[Sequence[int]], sidecar: Optional[Dict] = None) -> Dict:
    """Write token-id documents (one item each) as PREFIX.bin/.idx through paddlenlp's builder, atomically.

    Returns {"documents", "tokens", "dtype"}. `documents` may be any iterable; it is streamed once into
    a temporary int32 file, then the dtype is chosen from the largest id and paddlenlp's builder writes
    the final pair under temporary names, which are renamed into place (.idx last) only when complete.
    """
    from paddlenlp.data import indexed_dataset

    tmp = f".tmp{os.getpid()}"
    raw_path, bin_tmp, idx_tmp, side_tmp = prefix + ".raw" + tmp, prefix + ".bin" + tmp, prefix + ".idx" + tmp, prefix + SIDECAR + tmp
    sizes: List[int] = []
    max_id = -1
    try:
        with open(raw_path, "wb") as raw:
            for ids in documents:
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
                    raise UserError(f"token id {int(arr.min() if arr.min() < 0 else arr.max())} can't be stored (PaddleNLP's files hold int32 at most)")
                max_id = max(max_id, int(arr.max()) if arr.size else -1)
                raw.write(arr.astype(np.int32).tobytes())
                sizes.append(int(arr.size))
        if not sizes or not sum(sizes):
            raise UserError("the corpus has no tokens: nothing written")
        dtype = choose_dtype(max_id)
        stream = np.memmap(raw_path, dtype=np.int32, mode="r")
        builder = indexed_dataset.make_builder(bin_tmp, "mmap", dtype)
        offset = 0
        for n in sizes:
            builder.add_item(stream[offset : offset + n])
            builder.end_document()
            offset += n
        del stream
        with contextlib.redirect_stdout(io.StringIO()):  # its own statistics print; we print ours
            builder.finalize(idx_tmp)
        stats = {"documents": len(sizes), "tokens": int(sum(sizes)), "dtype": np.dtype(dtype).name}
        if sidecar is not None:
            with open(side_tmp, "w", encoding="utf-8") as f:
                json.dump({**sidecar, **stats}, f, indent=2, ensure_ascii=False)
                f.write("\n")
            os.replace(side_tmp, prefix + SIDECAR)
        os.replace(bin_tmp, prefix + ".bin")
        os.replace(idx_tmp, prefix + ".idx")  # last: PREFIX "exists" for readers once both files are there
        return stats
    finally:
        for path in (raw_path, bin_tmp, idx_tmp, side_tmp):
            if os.path.exists(path):
                os.unlink(path)


def tokenizer_identity(family, tokenizer, source: str) -> Dict:
    """What identifies the vocabulary data was made with (stored in PREFIX.json, compared by run_pretrain)."""
    vocab = tokenizer.get_vocab()
    digest = hashlib.md5(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        "family": family.name,
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_md5": digest,
        "model_name_or_path": os.path.abspath(source) if os.path.isdir(source) else source,
    }


_WORKER = {}


def _init_worker(family_name: str, path: str) -> None:
    from .families import get_family
    from .runtime import setup_runtime

    setup_runtime(quiet=True)
    family = get_family(family_name)
    _WORKER.update(family=family, tokenizer=family.load_tokenizer(path))


def _encode(text: str) -> List[int]:
    return _WORKER["family"].encode_text(_WORKER["tokenizer"], text)


def _token_stream(args, files: List[str], family, tokenizer, counts: Dict) -> Iterator[List[int]]:
    """Token ids of every non-empty document (+ EOS), in file order, with a progress bar."""
    from .runtime import progress_bar

    def texts():
        n = 0
        for path in files:
            for _, _, text in read_documents(path, args.json_key):
                if args.max_doc_num is not None and n >= args.max_doc_num:
                    return
                n += 1
                yield text

    eos = [tokenizer.eos_token_id] if args.append_eos else []
    pool = None
    if args.workers > 1:
        import multiprocessing

        # The platform's default start method: fork on Linux, where workers start without re-importing paddle.
        pool = multiprocessing.Pool(args.workers, _init_worker, (family.name, args.model_name_or_path))
        encoded = pool.imap(_encode, texts(), chunksize=64)
    else:
        encoded = (family.encode_text(tokenizer, t) for t in texts())
    bar = progress_bar(None, "tokenizing", "doc")
    start = time.time()
    try:
        for ids in encoded:
            bar.update(1)
            if not ids:
                counts["empty"] += 1
                continue
            counts["documents"] += 1
            counts["tokens"] += len(ids) + len(eos)
            if counts["documents"] % max(args.log_interval, 1) == 0:
                elapsed = max(time.time() - start, 1e-9)
                bar.set_postfix(tok_s=f"{counts['tokens'] / elapsed:.0f}")
            yield list(ids) + eos
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def create(args) -> Dict:
    """Tokenize the corpus and write PREFIX.bin/.idx/.json (args: commands.prepare_pretrain.PreprocessArgument). Raises UserError for bad input (nothing written)."""
    from .families import detect_family

    if not args.model_name_or_path:
        raise UserError("--model_name_or_path is required (the model whose tokenizer makes the ids)")
    if not args.input_path:
        raise UserError("--input_path is required (a .jsonl/.txt file or a folder of them)")
    if not args.output_prefix:
        raise UserError("--output_prefix is required (writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx)")
    if args.data_format.upper() != "JSON":
        raise UserError(f"--data_format {args.data_format}: only JSON is read (with --json_key); .txt files are read as plain text")
    if args.data_impl != "mmap":
        raise UserError(f"--data_impl {args.data_impl}: only mmap files are written (PaddleNLP's default format)")
    require_at_least({"workers": args.workers, "log_interval": args.log_interval, "max_doc_num": args.max_doc_num})
    if os.path.isdir(args.output_prefix) or args.output_prefix.endswith(os.sep):
        raise UserError(f"--output_prefix {args.output_prefix!r} is a folder; give a file prefix such as {os.path.join(args.output_prefix.rstrip(os.sep), 'corpus')}")
    check_can_create(os.path.dirname(os.path.abspath(args.output_prefix)), "--output_prefix folder")
    files, skipped = collect_inputs(args.input_path)
    if skipped:
        print(f"not read ({len(skipped)}): " + "; ".join(f"{p} ({why})" for p, why in skipped), file=sys.stderr)
    if not files:
        raise UserError(f"--input_path {args.input_path!r}: no .jsonl, .jsonl.zst or .txt file to read")
    family = detect_family(args.family, (args.model_name_or_path,), args.model_name_or_path)
    from .runtime import setup_runtime

    setup_runtime(quiet=True)
    try:
        tokenizer = family.load_tokenizer(args.model_name_or_path)
    except Exception as e:  # a wrong path or name: one line, not paddlenlp's traceback
        raise UserError(f"--model_name_or_path {args.model_name_or_path!r}: can't load its tokenizer ({type(e).__name__})") from None
    folder = os.path.dirname(os.path.abspath(args.output_prefix))
    created = folder  # the outermost folder this run creates: removed again if it fails ("nothing written")
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.exists(created) else created
    os.makedirs(folder, exist_ok=True)
    counts = {"documents": 0, "tokens": 0, "empty": 0}
    side = {**tokenizer_identity(family, tokenizer, args.model_name_or_path), "append_eos": args.append_eos,
            "inputs": [os.path.abspath(p) for p in files]}
    try:
        stats = write_mmap(args.output_prefix, _token_stream(args, files, family, tokenizer, counts), side)
    except BaseException:
        if created:
            import shutil

            shutil.rmtree(created, ignore_errors=True)
        raise
    empty = f"; {counts['empty']} empty documents left out" if counts["empty"] else ""
    print(f"wrote {args.output_prefix}.bin/.idx ({stats['dtype']}): {stats['documents']} documents, {stats['tokens']} tokens, "
          f"{stats['tokens'] / stats['documents']:.1f} tokens per document{empty}")
    return stats


# --------------------------------------------------------------------------- the run side
def prefix_exists(prefix: str) -> bool:
    """A PaddleNLP data prefix: PREFIX.bin + PREFIX.idx, or the older PREFIX_ids.npy + PREFIX_idx.npz."""
    return (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")) or (
        os.path.isfile(prefix + "_ids.npy") and os.path.isfile(prefix + "_idx.npz"))


def resolve_input_dir(input_dir: str) -> List[Tuple[float, str]]:
    """[(weight, absolute prefix)] named by input_dir: PaddleNLP's "w1 prefix1 w2 prefix2" blend, a folder
    (every prefix in it, weight 1 each, sorted), or one prefix (PREFIX, PREFIX.bin or PREFIX.idx)."""
    if not input_dir:
        raise UserError("input_dir is required: a data prefix, a folder of them, or \"w1 prefix1 w2 prefix2\"")
    parts = input_dir.split()
    if len(parts) > 1:
        if len(parts) % 2:
            raise UserError(f"input_dir {input_dir!r}: a blend is \"weight1 prefix1 weight2 prefix2 ...\" (pairs)")
        out = []
        for w, p in zip(parts[::2], parts[1::2]):
            try:
                weight = float(w)
            except ValueError:
                raise UserError(f"input_dir: blend weight {w!r} is not a number (\"weight1 prefix1 weight2 prefix2 ...\")") from None
            if weight <= 0:
                raise UserError(f"input_dir: blend weight {w} of {p} must be positive")
            out.append((weight, _one_prefix(p)))
        return out
    if os.path.isdir(input_dir):
        found = set()
        for name in os.listdir(input_dir):
            for suffix in (".idx", "_idx.npz"):
                if name.endswith(suffix):
                    prefix = os.path.join(input_dir, name[: -len(suffix)])
                    if prefix_exists(prefix):
                        found.add(os.path.abspath(prefix))
        if not found:
            raise UserError(f"input_dir {input_dir!r}: no PaddleNLP data files in it (PREFIX.bin + PREFIX.idx, or PREFIX_ids.npy + "
                            f"PREFIX_idx.npz); make them with create_pretraining_data.py")
        return [(1.0, p) for p in sorted(found)]
    return [(1.0, _one_prefix(input_dir))]


def _one_prefix(path: str) -> str:
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix) and not prefix_exists(path):
            path = path[: -len(suffix)]
    if not prefix_exists(path):
        raise UserError(f"input_dir {path!r}: no data there (need {path}.bin + {path}.idx, or {path}_ids.npy + {path}_idx.npz)")
    return os.path.abspath(path)


def open_prefix(prefix: str):
    """paddlenlp's reader of either format (item sizes in .sizes)."""
    from paddlenlp.data import indexed_dataset

    with contextlib.redirect_stdout(io.StringIO()):  # "Using old dataet (.npy & .npz)"
        return indexed_dataset.make_dataset(prefix, "mmap", skip_warmup=True)


def read_sidecar(prefix: str) -> Optional[Dict]:
    path = prefix + SIDECAR
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_tokenizer(prefix: str, identity: Dict, data) -> None:
    """Refuse data made with another tokenizer: by PREFIX.json when there is one, else by the largest id."""
    side = read_sidecar(prefix)
    if side is not None:
        for key in ("tokenizer_class", "vocab_size", "eos_token_id", "vocab_md5"):
            if key in side and side[key] != identity[key]:
                raise UserError(f"{prefix}: made with another tokenizer ({key} {side[key]!r} in {prefix}{SIDECAR}, the model's is "
                                f"{identity[key]!r}; made from {side.get('model_name_or_path')}); rerun create_pretraining_data.py "
                                f"with this model's --model_name_or_path")
        return
    tokens = getattr(data, "_token_ids", None)  # old .npy pair
    if tokens is None:
        tokens = np.memmap(prefix + ".bin", dtype=data._index.dtype, mode="r")
    if tokens.size and int(tokens.max()) >= identity["vocab_size"]:
        raise UserError(f"{prefix}: token id {int(tokens.max())} is outside the model's vocabulary of {identity['vocab_size']}: "
                        f"the data was made with another tokenizer")


def split_bounds(split: str, size: int) -> List[int]:
    """paddlenlp's document boundaries [0, a, b, size] of "train,valid,test" (also "a/b/c"), or a UserError."""
    from paddlenlp.data.causal_dataset import get_train_valid_test_split_

    try:
        parts = [float(s) for s in split.replace("/", ",").split(",")]
        if len(parts) > 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
            raise ValueError
    except ValueError:
        raise UserError(f"--split {split!r}: give up to three non-negative weights train,valid,test such as 949,50,1") from None
    return get_train_valid_test_split_(split, size)
