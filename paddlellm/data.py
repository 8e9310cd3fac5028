"""Data: find, read and validate src/tgt JSONL, and encode it through the family registry.

Reading and validation import nothing heavy, so bad data is reported before paddle loads and
before anything is written. Every problem is a DataError whose message names file, line and field.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from .arguments import UserError

log = logging.getLogger("paddlellm")


class DataError(UserError):
    """Bad data: the message names the file, the line and the field."""


@dataclass
class Record:
    """One validated line: src/tgt as lists of turns (tgt may be one shorter than src, or empty, for prediction)."""

    src: List[str]
    tgt: List[str]
    where: str  # "file:line", for messages
    raw_src: object = None  # src as written in the file (a string or a list), for outputs that echo it


def split_files(dataset_name_or_path: str, split: str, required: bool = True) -> List[str]:
    """The JSONL files of one split: `<dir>/<split>.json` or every `*.json` in `<dir>/<split>/`."""
    root = dataset_name_or_path
    if not root or not os.path.isdir(root):
        raise DataError(f"dataset_name_or_path {root!r} is not a folder; give a folder with train.json and dev.json (or train/ and dev/ folders of *.json)")
    single = os.path.join(root, f"{split}.json")
    folder = os.path.join(root, split)
    if os.path.isfile(single) and os.path.isdir(folder):
        raise DataError(f"{root}: holds both {split}.json and a {split}/ folder; keep one of them (which one is meant is ambiguous)")
    if os.path.isfile(single):
        return [single]
    if os.path.isdir(folder):
        files = sorted(glob.glob(os.path.join(folder, "*.json")))
        if not files:
            raise DataError(f"{folder}: folder holds no *.json files")
        return files
    if required:
        raise DataError(f"{root}: no {split}.json and no {split}/ folder")
    return []


def _turns(value, field: str, where: str) -> List[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, list) and not value:
        raise DataError(f"{where}: field '{field}' is an empty list")
    raise DataError(f"{where}: field '{field}' must be a string or a list of strings, got {type(value).__name__}")


def read_records(path: str, require_tgt: bool = True) -> List[Record]:
    """Read and validate one JSONL file. With require_tgt=False (prediction) tgt may be absent."""
    records: List[Record] = []
    for where, obj in json_objects(path, "'src' and 'tgt'"):
        src = _turns(obj["src"], "src", where)
        if "tgt" not in obj or (obj["tgt"] is None and not require_tgt):
            if require_tgt:
                raise DataError(f"{where}: missing field 'tgt'")
            tgt: List[str] = []
        else:
            tgt = _turns(obj["tgt"], "tgt", where)
        if require_tgt and len(src) != len(tgt):
            raise DataError(f"{where}: fields 'src' and 'tgt' must have equal lengths ({len(src)} != {len(tgt)} turns)")
        if not require_tgt and len(tgt) not in (len(src), len(src) - 1, 0):
            raise DataError(f"{where}: field 'tgt' must have as many turns as 'src' or one fewer ({len(tgt)} vs {len(src)})")
        records.append(Record(src, tgt, where, obj["src"]))
    if not records:
        raise DataError(f"{path}: file holds no examples")
    return records


def json_objects(path: str, fields: str):
    """(where, object) of every non-blank line of a JSONL file, where = "file:line". A line that is not JSON, not an
    object or has no 'src' is a DataError naming it (`fields` says in that message which fields a line holds)."""
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{where}: each line must be a JSON object with {fields}, got {type(obj).__name__}")
        if "src" not in obj:
            raise DataError(f"{where}: missing field 'src'")
        yield where, obj


def _lines(path: str):
    """(line number, text) of a UTF-8 text file; a byte-order mark (as Windows editors write) is skipped,
    and bytes that are not UTF-8 are a DataError naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                                "save the file as UTF-8") from None


def read_split(dataset_name_or_path: str, split: str, required: bool = True) -> List[Record]:
    out: List[Record] = []
    for path in split_files(dataset_name_or_path, split, required):
        out += read_records(path)
    return out


def encode_records(family, tokenizer, records: Sequence[Record], src_length: int, tgt_length: int, name: str = "train"):
    """Encode validated records into the family's Examples; logs how many were truncated or dropped."""
    examples = []
    truncated = dropped = 0
    for r in records:
        ex = family.encode(tokenizer, r.src, r.tgt, src_length, tgt_length)
        if ex is None:
            dropped += 1
            continue
        truncated += ex.truncated
        examples.append(ex)
    msg = f"{name}: {len(records)} examples, {truncated} truncated to src_length={src_length}/tgt_length={tgt_length}, {dropped} dropped (nothing left to supervise)"
    log.info(msg)
    if not examples:
        raise DataError(f"{name}: every example was dropped; raise src_length/tgt_length")
    return examples, {"examples": len(records), "truncated": truncated, "dropped": dropped}


def pack_examples(examples, max_length: int):
    """Pack examples into rows of at most `max_length` tokens by best-fit decreasing.

    Longest examples are placed first, each into the row whose free space fits it most tightly,
    which leaves far less padding than filling rows in file order. Returns (rows, efficiency) where
    efficiency = real tokens / (rows * max_length).
    """
    import bisect

    too_long = [len(e) for e in examples if len(e) > max_length]
    if too_long:
        raise DataError(f"intokens_max_length={max_length} is shorter than an example of {max(too_long)} tokens; "
                        f"raise intokens_max_length or lower src_length/tgt_length")
    rows: List[list] = []
    free: List[Tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i)):
        n = len(examples[i])
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, row = free.pop(k)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(examples[i])
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    real = sum(len(e) for e in examples)
    return rows, real / max(len(rows) * max_length, 1)


class ExampleDataset:
    """A map-style dataset of Examples (paddle's DataLoader accepts any object with __getitem__/__len__)."""

    def __init__(self, examples):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


class Collator:
    """Turns a list of Examples (one per row) into the family's model inputs as paddle tensors."""

    def __init__(self, family, pad_id: int):
        self.family = family
        self.pad_id = pad_id

    def __call__(self, examples):
        import paddle

        rows = [e if isinstance(e, list) else [e] for e in examples]
        batch = {k: paddle.to_tensor(v) for k, v in self.family.build_batch(rows, self.pad_id).items()}
        batch["real_tokens"] = sum(len(e) for row in rows for e in row)  # popped before the model sees it
        return batch
