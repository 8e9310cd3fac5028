"""Preference data (DPO): read and validate src/tgt/response/sort JSONL, encode it through the family
registry, and lay each pair out the way paddlenlp's DPOTrainer and DPOCriterion read it.

The format is PaddleNLP's: one JSON object per line with
    src       the prompts, a string or a list of strings (a list is a dialogue, src[-1] the final prompt)
    tgt       the earlier replies: one fewer than src (absent or [] for a single prompt)
    response  two candidate replies to src[-1]
    sort      their two ranks; the higher one is the chosen reply

Layout (paddlenlp.trl.preference_collate_fn / DPOCriterion.dpo_logps): one row holds the shared context
once and the two replies after it,

    context[:-1] | context[-1] chosen[:-1] | context[-1] rejected[:-1]
                 ^ response_indexs[1]      ^ response_indexs[2]     ^ response_indexs[3]

so that the chosen segment's labels are the chosen reply (with its end token) and the rejected segment's
the rejected reply; each segment repeats the context's last token, whose output predicts the reply's
first token. The rejected segment attends to the context and to itself, never to the chosen reply, and
its positions restart where the chosen ones did: each reply is scored exactly as it would be alone after
the context (tests/test_dpo.py checks this against separate forwards). The mask, positions and input
names come from the family's own encode / make_example / model_inputs hooks, as in fine-tuning.

Reading imports nothing heavy: bad data is reported before paddle loads and before anything is written.
"""
from __future__ import annotations

import json
import logging
import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from .data import DataError, _turns, json_objects, split_files

log = logging.getLogger("paddlellm")

# What paddlenlp's DPOTrainer passes on to the model (get_batch_metrics); other inputs would be dropped.
MODEL_KEYS = ("input_ids", "position_ids", "attention_mask")


@dataclass
class PreferenceRecord:
    """One validated line: the dialogue so far and the two replies, already ordered chosen first."""

    src: List[str]
    tgt: List[str]  # earlier replies, len(src) - 1
    chosen: str
    rejected: str
    where: str  # "file:line", for messages


def _check_responses(obj, where: str):
    """(chosen, rejected) of a line's response/sort fields, or a DataError naming the field."""
    for name in ("response", "sort"):
        if name not in obj:
            raise DataError(f"{where}: missing field '{name}' (a preference line needs 'src', 'tgt', 'response' and 'sort')")
    response, sort = obj["response"], obj["sort"]
    if not isinstance(response, list) or len(response) != 2 or not all(isinstance(r, str) for r in response):
        raise DataError(f"{where}: field 'response' must be a list of two strings (the candidate replies), got "
                        f"{json.dumps(response, ensure_ascii=False)[:80]}")
    for i, r in enumerate(response):
        if not r.strip():
            raise DataError(f"{where}: field 'response': reply {i + 1} is empty")
    if not isinstance(sort, list) or len(sort) != 2 or not all(isinstance(s, numbers.Real) and not isinstance(s, bool) for s in sort):
        raise DataError(f"{where}: field 'sort' must be a list of two numbers (the ranks of the two replies), got "
                        f"{json.dumps(sort)[:80]}")
    if sort[0] == sort[1]:
        raise DataError(f"{where}: field 'sort': the two ranks are equal ({sort[0]} and {sort[1]}); "
                        "the higher rank marks the chosen reply, so they must differ")
    return (response[0], response[1]) if sort[0] > sort[1] else (response[1], response[0])


def read_preference_records(path: str) -> List[PreferenceRecord]:
    """Read and validate one preference JSONL file."""
    records: List[PreferenceRecord] = []
    for where, obj in json_objects(path, "'src', 'tgt', 'response' and 'sort'"):
        src = _turns(obj["src"], "src", where)
        tgt_value = obj.get("tgt")
        if tgt_value is None or tgt_value == []:
            tgt: List[str] = []
        else:
            tgt = _turns(tgt_value, "tgt", where)
        if len(tgt) != len(src) - 1:
            if "tgt" not in obj and len(src) > 1:
                raise DataError(f"{where}: missing field 'tgt' (the {len(src) - 1} earlier replies of the dialogue in 'src')")
            raise DataError(f"{where}: fields 'src' and 'tgt': 'tgt' holds the earlier replies, one fewer than 'src' "
                            f"({len(src)} src turns need {len(src) - 1} tgt turns, got {len(tgt)})")
        chosen, rejected = _check_responses(obj, where)
        records.append(PreferenceRecord(src, tgt, chosen, rejected, where))
    if not records:
        raise DataError(f"{path}: file holds no examples")
    return records


def read_preference_split(dataset_name_or_path: str, split: str, required: bool = True) -> List[PreferenceRecord]:
    """Every record of one split (`<dir>/<split>.json` or `<dir>/<split>/*.json`)."""
    out: List[PreferenceRecord] = []
    for path in split_files(dataset_name_or_path, split, required):
        out += read_preference_records(path)
    return out


# --------------------------------------------------------------------------- encoding
@dataclass
class PreferenceExample:
    """A pair encoded by the family: the two replies as separate fine-tuning Examples after the same context.

    shared: how many leading input tokens the two Examples have in common and store once (the context
    without its last token); every label before it is ignored, every label from it on is the reply.
    """

    chosen: object  # families.Example
    rejected: object
    shared: int
    truncated: bool

    def __len__(self) -> int:  # token slots of the laid-out pair (what packing counts)
        return len(self.chosen) + len(self.rejected) - self.shared


def encode_pair(family, tokenizer, record: PreferenceRecord, src_length: int, tgt_length: int) -> Optional[PreferenceExample]:
    """Encode one record as fine-tuning would encode its two completed dialogues (same chat format,
    masking and src_length / tgt_length truncation), keeping only the final replies supervised."""
    context = family.generation_prompt(tokenizer, record.src, record.tgt, src_length)
    chosen = family.encode(tokenizer, record.src, record.tgt + [record.chosen], src_length, tgt_length)
    rejected = family.encode(tokenizer, record.src, record.tgt + [record.rejected], src_length, tgt_length)
    if chosen is None or rejected is None:
        return None
    shared = len(context) - 1
    for ex in (chosen, rejected):
        # The family's encode starts with exactly the prompt generation would use; the layout relies on it.
        if ex.input_ids[:shared + 1] != context or len(ex) <= shared:
            raise AssertionError(f"{record.where}: the {family.name} family's encode() does not start with its generation prompt")
        # Tokens before the replies may see at most the context's last token (a bidirectional prompt that
        # ends there): both segments hold that token with the same inputs, so either copy gives the same state.
        if ex.prefix_len > shared + 1:
            raise AssertionError(f"{record.where}: the {family.name} family's bidirectional prefix reaches into the reply")
    if chosen.input_ids[:shared] != rejected.input_ids[:shared] or chosen.positions[:shared + 1] != rejected.positions[:shared + 1]:
        raise AssertionError(f"{record.where}: the two replies got different contexts")
    return PreferenceExample(chosen, rejected, shared, bool(chosen.truncated or rejected.truncated))


def encode_preference_records(family, tokenizer, records: Sequence[PreferenceRecord], src_length: int, tgt_length: int, name: str = "train"):
    """Encode validated records; logs how many were truncated or dropped (like data.encode_records)."""
    examples, truncated, dropped = [], 0, 0
    for r in records:
        ex = encode_pair(family, tokenizer, r, src_length, tgt_length)
        if ex is None:
            dropped += 1
            continue
        truncated += ex.truncated
        examples.append(ex)
    log.info(f"{name}: {len(records)} preference pairs, {truncated} truncated to src_length={src_length}/tgt_length={tgt_length}, {dropped} dropped")
    if not examples:
        raise DataError(f"{name}: every preference pair was dropped; raise src_length/tgt_length")
    return examples, {"examples": len(records), "truncated": truncated, "dropped": dropped}


def _block(ex) -> np.ndarray:
    """The attention block of one Example alone (True = may attend): causal, bidirectional over its prefix."""
    n = len(ex)
    block = np.tril(np.ones([n, n], dtype=bool))
    block[: ex.prefix_len, : ex.prefix_len] = True
    return block


def build_preference_batch(family, rows: List[List[PreferenceExample]], pad_id: int) -> Dict[str, np.ndarray]:
    """Collate rows of pairs (a row holds several pairs when packed with intokens) into DPOTrainer's batch:
    the family's model inputs (input_ids, attention_mask, position_ids where the family uses them) plus
    chosen_labels / rejected_labels (0 where not a reply token, as paddlenlp's collator pads them) and
    response_indexs [pairs, 4] = (row, chosen start, rejected start, end)."""
    lengths = [sum(len(p) for p in row) for row in rows]
    B, S = len(rows), max(lengths)
    input_ids = np.full([B, S], pad_id, dtype="int64")
    positions = np.zeros([B, S], dtype="int64")
    block_positions = np.zeros([B, S], dtype="int64")
    chosen_labels = np.zeros([B, S], dtype="int64")
    rejected_labels = np.zeros([B, S], dtype="int64")
    attend = np.zeros([B, S, S], dtype=bool)
    pad_mask = np.zeros([B, S], dtype="int64")
    response_indexs = []
    for b, row in enumerate(rows):
        off = 0
        for pair in row:
            c, r, k = pair.chosen, pair.rejected, pair.shared
            n0, n1 = len(c), len(r) - k  # chosen example (context included), rejected segment
            # merged index of every token of each example
            idx_c = off + np.arange(n0)
            idx_r = np.concatenate([off + np.arange(k), off + n0 + np.arange(n1)])
            for ex, idx, first_row in ((c, idx_c, 0), (r, idx_r, k)):
                input_ids[b, idx] = ex.input_ids
                positions[b, idx] = ex.positions
                if ex.block_positions is not None:
                    block_positions[b, idx] = ex.block_positions
                # rows of the shared context come from the chosen example only (they are the same tokens)
                attend[b, idx[first_row:, None], idx[None, :]] = _block(ex)[first_row:]
            chosen_labels[b, off + k: off + n0] = c.labels[k:]
            rejected_labels[b, off + n0: off + n0 + n1] = r.labels[k:]
            response_indexs.append([b, off + k, off + n0, off + n0 + n1])
            off += n0 + n1
        pad_mask[b, :off] = 1
    labels = np.full([B, S], -100, dtype="int64")  # the model's own loss is not used
    out = family.model_inputs(input_ids, labels, positions, block_positions, attend, pad_mask, False)
    batch = {k: out[k] for k in MODEL_KEYS if k in out}
    batch.update(chosen_labels=chosen_labels, rejected_labels=rejected_labels,
                 response_indexs=np.array(response_indexs, dtype="int64"))
    return batch


class PreferenceCollator:
    """Pairs (or packed rows of pairs) -> DPOTrainer's batch as paddle tensors."""

    def __init__(self, family, pad_id: int):
        self.family = family
        self.pad_id = pad_id

    def __call__(self, items):
        import paddle

        rows = [it if isinstance(it, list) else [it] for it in items]
        batch = {k: paddle.to_tensor(v) for k, v in build_preference_batch(self.family, rows, self.pad_id).items()}
        # DPOTrainer reads batch["position_ids"]; families without position inputs (ALiBi, learned positions
        # read from the mask) get None, which their forward accepts as "not given".
        batch.setdefault("position_ids", None)
        return batch
