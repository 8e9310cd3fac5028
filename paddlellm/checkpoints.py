"""Which checkpoints of an output folder are complete, so that resuming never starts from half a save.

PaddleNLP's Trainer writes `checkpoint-N/` in place (weights, then optimizer, scheduler and RNG state)
and its get_last_checkpoint simply takes the highest N: a run killed while saving leaves a folder that
looks newest but cannot be loaded. SFTTrainer therefore writes a marker file into each checkpoint once
everything of it is on disk; resuming takes the newest marked checkpoint and removes newer unmarked
ones (they are what an interrupted save left). A folder without any marker (written by PaddleNLP itself
or by an older paddlellm) is resumed the way PaddleNLP would.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import List, Optional, Tuple

MARKER = "paddlellm_checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

log = logging.getLogger("paddlellm")


def checkpoint_dirs(output_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of every checkpoint-N folder in output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def mark_complete(output_dir: str, step: int) -> None:
    """Record that checkpoint-<step> was written completely (atomically: the marker appears whole or not at all)."""
    folder = os.path.join(output_dir, f"checkpoint-{step}")
    if not os.path.isdir(folder):
        return
    path = os.path.join(folder, MARKER)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"global_step": step}, f)
    os.replace(path + ".tmp", path)


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def complete_checkpoints(output_dir: str) -> List[str]:
    return [path for _, path in checkpoint_dirs(output_dir) if is_complete(path)]


def resume_point(output_dir: str, remove_incomplete: bool = True) -> Optional[str]:
    """The checkpoint to resume from (None: start afresh). With remove_incomplete (the saving process
    only), unmarked checkpoints newer than it are deleted: PaddleNLP orders checkpoints by mtime when it
    rotates them and would otherwise keep the broken one and delete a good one."""
    found = checkpoint_dirs(output_dir)
    marked = [(step, path) for step, path in found if is_complete(path)]
    if not marked:
        return found[-1][1] if found else None  # nothing of ours: PaddleNLP's own rule
    step, path = marked[-1]
    for later_step, later in found:
        if later_step > step and not is_complete(later):
            log.warning(f"{later} was not saved completely (the run stopped while saving it); resuming from {path} instead")
            if remove_incomplete:
                shutil.rmtree(later, ignore_errors=True)
    return path
