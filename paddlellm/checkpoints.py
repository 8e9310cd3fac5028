"""Which checkpoints of an output folder are complete, so that resuming never starts from half a save.

PaddleNLP's Trainer writes `checkpoint-N/` in place (weights, then optimizer, scheduler and RNG state)
and its get_last_checkpoint simply takes the highest N: a run killed while saving leaves a folder that
looks newest but cannot be loaded. SFTTrainer therefore writes a marker file into each checkpoint once
everything of it is on disk; resuming takes the newest marked checkpoint and removes newer unmarked
ones (they are what an interrupted save left). A folder without any marker (written by PaddleNLP itself
or by an older paddlellm) is resumed the way PaddleNLP would. Either way a checkpoint is checked before
resuming from it (trainer state, optimizer state, the weights of the kind being trained): a broken one
is passed over with a warning, or named in one line when no usable one is left.

Also here: replacing_weights, which every command that saves weights into a folder goes through, so a
folder never keeps an older weight file that loaders would read instead of the new one; and
training_output, around a whole training run, which decides what a failed run leaves behind.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
from typing import List, Optional, Tuple

MARKER = "paddlellm_checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"  # paddlenlp.trainer.trainer.TRAINER_STATE_NAME
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


# --------------------------------------------------------------------------- weight files
# Every weight file a model or adapter folder can hold (PaddleNLP's names; sharded and tensor-parallel
# variants and their index files), plus the adapter configs that say how to read adapter weights.
WEIGHT_FILE = re.compile(r"^(model_state|model|lora_model_state|prefix_model_state|peft_model)([.-].*)?\.(pdparams|safetensors)$"
                         r"|^(model_state|model|lora_model_state|prefix_model_state|peft_model)\.(pdparams|safetensors)\.index(\.[^.]+)?\.json$")
ADAPTER_CONFIG = ("lora_config.json", "prefix_config.json")
_WEIGHTS_OF_KIND = {
    "full": re.compile(r"^(model_state|model)([.-].*)?\.(pdparams|safetensors)$|^(model_state|model)\..*index.*\.json$"),
    "lora": re.compile(r"^(lora_model_state|peft_model)([.-].*)?\.(pdparams|safetensors)$|^peft_model\..*index.*\.json$"),
    "prefix": re.compile(r"^prefix_model_state([.-].*)?\.pdparams$"),
}
_WEIGHT_NAMES = {"full": "model_state.pdparams", "lora": "lora_model_state.pdparams", "prefix": "prefix_model_state.pdparams"}


def _weight_files(folder: str, configs: bool = False) -> List[str]:
    """Names of the weight files in folder (and of the adapter configs with `configs`)."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if (WEIGHT_FILE.search(name) or (configs and name in ADAPTER_CONFIG)) and os.path.isfile(os.path.join(folder, name)))


def remove_weight_files(folder: str, configs: bool = False) -> List[str]:
    """Delete every weight file in folder (and the adapter configs with `configs`); returns the names removed."""
    names = _weight_files(folder, configs)
    for name in names:
        os.remove(os.path.join(folder, name))
    return names


@contextlib.contextmanager
def replacing_weights(folder: str, enabled: bool = True):
    """Around a save into `folder`: the weight files (and adapter configs) already there are set aside
    first, deleted once the save succeeded, and put back (in place of what it wrote) if it fails.

    Why: paddlenlp's from_pretrained prefers model.safetensors to model_state.pdparams, so an older file
    of the other format (a merged or tiny model, an earlier run of another kind) would silently win over
    the weights just saved. A folder must hold one set of weights: the one written last.
    """
    names = _weight_files(folder, configs=True) if enabled else []
    aside = {name: os.path.join(folder, f".{name}.replaced-{os.getpid()}") for name in names}
    for name, path in aside.items():
        os.replace(os.path.join(folder, name), path)
    try:
        yield
    except BaseException:
        remove_weight_files(folder, configs=True)  # what the failed save wrote (possibly half a file)
        for name, path in aside.items():
            os.replace(path, os.path.join(folder, name))
        raise
    for path in aside.values():
        os.remove(path)
    stale = [name for name in names if not os.path.exists(os.path.join(folder, name))]
    if stale:
        log.info(f"{folder}: removed {', '.join(stale)} left by an earlier save (replaced by the weights just saved)")


@contextlib.contextmanager
def training_output(output_dir: str):
    """Around a training run (finetune, pretrain) that writes `output_dir`: a UserError ends in one
    `error:` line (exit 2), Ctrl-C in `error: interrupted` (exit 130), anything else propagates; in every
    failure case cleanup_after_failure decides what stays in the folder."""
    from .arguments import UserError, fail

    existed = os.path.exists(output_dir)
    try:
        yield
    except UserError as e:
        cleanup_after_failure(output_dir, existed)
        fail(str(e))
    except KeyboardInterrupt:
        cleanup_after_failure(output_dir, existed)
        fail("interrupted", status=130)
    except BaseException:
        cleanup_after_failure(output_dir, existed)
        raise


def cleanup_after_failure(output_dir: str, existed: bool) -> None:
    """After a failure: keep the folder if it holds a complete checkpoint (hours of training are not thrown
    away; rerunning the same command resumes from it), else remove a folder this run created, so that a
    failed run leaves nothing half-written."""
    from .files import META_FILE

    kept = [c for c in complete_checkpoints(output_dir) if checkpoint_problem(c) is None]
    if kept:
        print(f"paddlellm: kept {kept[-1]}; rerun the same command to resume from it", file=sys.stderr)
    elif os.path.isfile(os.path.join(output_dir, META_FILE)):
        pass  # the trained model was saved before the failure (e.g. in the final evaluation): never remove it
    elif not existed and os.path.isdir(output_dir):
        shutil.rmtree(output_dir, ignore_errors=True)


# --------------------------------------------------------------------------- resuming
def checkpoint_problem(folder: str, kind: Optional[str] = None, need_optimizer: bool = True) -> Optional[str]:
    """Why training can't resume from checkpoint `folder` (None: it can). `kind` (full, lora, prefix) is
    what the run trains, whose weights the checkpoint must hold; None accepts any."""
    try:
        names = set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        names = set()
    if TRAINER_STATE not in names:
        return f"no {TRAINER_STATE}"
    try:
        with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as f:
            int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is unreadable"
    if need_optimizer and not any(n.startswith("optimizer") for n in names):
        return "no optimizer state (optimizer.pdopt)"
    kinds = [kind] if kind else list(_WEIGHTS_OF_KIND)
    if not any(_WEIGHTS_OF_KIND[k].search(n) for k in kinds for n in names):
        return f"no {_WEIGHT_NAMES[kind]}" if kind else "no model weights"
    return None


def _looks_half_saved(folder: str) -> bool:
    """An unmarked folder that a save of ours was writing when it stopped: empty, or holding checkpoint files.
    (Anything else, e.g. a user's own checkpoint-99/, is not ours to delete.)"""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:  # being removed by the saving process right now
        return True
    return not names or any(WEIGHT_FILE.search(n) or n.startswith(("optimizer", "scheduler", "rng_state", "trainer_state")) for n in names)


def resume_point(output_dir: str, remove_incomplete: bool = True, kind: Optional[str] = None,
                 need_optimizer: bool = True) -> Optional[str]:
    """The checkpoint to resume from (None: start afresh); see choose_checkpoint."""
    return choose_checkpoint(output_dir, remove_incomplete, kind, need_optimizer)[0]


def choose_checkpoint(output_dir: str, remove_incomplete: bool = True, kind: Optional[str] = None,
                      need_optimizer: bool = True) -> Tuple[Optional[str], List[str]]:
    """(checkpoint to resume from or None to start afresh, checkpoints that can't be resumed from).

    Only checkpoints that hold what resuming needs (trainer state, optimizer state, weights of `kind`)
    are candidates; the newest wins. When our completion markers are present, only marked checkpoints
    count, and unmarked ones newer than the chosen one (what an interrupted save left) are deleted by the
    saving process (remove_incomplete): PaddleNLP's rotation would otherwise keep them and delete a good one.
    Passing over a broken checkpoint is logged; if there are checkpoints but none is usable, UserError
    names the newest and what to do.
    """
    from .arguments import UserError

    found = checkpoint_dirs(output_dir)
    if not found:
        return None, []
    any_marked = any(is_complete(path) for _, path in found)
    chosen, skipped = None, []
    for step, path in reversed(found):
        if any_marked and not is_complete(path):
            if _looks_half_saved(path):
                log.warning(f"{path} was not saved completely (the run stopped while saving it); passing over it")
                if remove_incomplete:
                    shutil.rmtree(path, ignore_errors=True)
                    continue
            else:
                log.warning(f"{path} is not a checkpoint of this run (unknown contents); leaving it alone")
            skipped.append(path)
            continue
        problem = checkpoint_problem(path, kind, need_optimizer)
        if problem is None:
            chosen = path
            break
        log.warning(f"{path} can't be resumed from ({problem}); passing over it")
        skipped.append(path)
    if chosen is None and skipped:
        broken = skipped[0]
        raise UserError(f"{broken} can't be resumed from ({checkpoint_problem(broken, kind, need_optimizer) or 'not saved completely'}) "
                        f"and output_dir holds no usable checkpoint; pass --overwrite_output_dir true to start over, or remove it")
    if chosen and skipped:
        log.warning(f"resuming from the newest usable checkpoint, {chosen}")
    return chosen, skipped


def relocate_state(checkpoint: str, output_dir: str) -> None:
    """Make the trainer state of `checkpoint` point into `output_dir` as it is now.

    PaddleNLP records best_model_checkpoint as a path (output_dir as given when it was saved); after the
    folder is copied or moved, that path is elsewhere or gone, and the next rotation fails
    ("... is not in list") or load_best_model_at_end would load another run's model.
    """
    path = os.path.join(checkpoint, TRAINER_STATE)
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    best = state.get("best_model_checkpoint")
    if not best:
        return
    here = os.path.join(output_dir, os.path.basename(os.path.normpath(best)))
    new = here if os.path.isdir(here) else None
    if new == best:
        return
    if new is None:
        log.warning(f"{checkpoint}: the best checkpoint it records ({best}) is gone; the best model is tracked afresh")
    state["best_model_checkpoint"] = new
    # Every process of a distributed run does this (each reads the file when it resumes): a temporary
    # name per process, and atomic replacement with the same content, keep them from disturbing each other.
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def prepare_resume(training_args, kind: Optional[str] = None) -> Tuple[Optional[str], List[str]]:
    """Where a Trainer run into training_args.output_dir resumes: (checkpoint or None to start afresh,
    checkpoints to leave out of the rotation). With overwrite_output_dir, the earlier run's checkpoints
    are removed; else the chosen checkpoint's trainer state is pointed at the folder's current place."""
    out = training_args.output_dir
    if not os.path.isdir(out):
        return None, []
    if training_args.overwrite_output_dir:
        # Starting over: checkpoints of the earlier run would be mixed with this run's (same step numbers,
        # their completion markers, and rotation by step number would delete the new ones instead).
        old = checkpoint_dirs(out)
        if old and training_args.should_save:
            ours = [p for _, p in old if is_complete(p)]
            for path in ours:
                shutil.rmtree(path, ignore_errors=True)
            if ours:
                log.info(f"--overwrite_output_dir: removed {len(ours)} checkpoint(s) of the earlier run in {out}")
        # what is left is not ours (no completion marker): leave it alone, also in the rotation
        return None, [p for _, p in checkpoint_dirs(out)] if training_args.should_save else [p for _, p in old]
    need_optimizer = not (training_args.ignore_load_lr_and_optim or training_args.ignore_save_lr_and_optim)
    last, unusable = choose_checkpoint(out, remove_incomplete=training_args.should_save, kind=kind, need_optimizer=need_optimizer)
    if last:
        relocate_state(last, out)
        log.info(f"resuming from {last} (pass --overwrite_output_dir to start over)")
    return last, unusable


class Staging:
    """Build an output folder under a temporary name next to `target`; move it into place on success,
    delete it on failure (so an error leaves no half-written model behind)."""

    def __init__(self, target: str):
        self.target = os.path.abspath(target)
        parent = os.path.dirname(self.target)
        self.path = os.path.join(parent, f".{os.path.basename(self.target)}.merging-{os.getpid()}")

    def __enter__(self) -> str:
        from .arguments import make_dir

        make_dir(os.path.dirname(self.target), "the folder of merge_model_path")
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)
        return self.path

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return False
        if os.path.isdir(self.target) and os.listdir(self.target):
            # An earlier output: replace its weights (stale shards would shadow the new file) and files we write.
            remove_weight_files(self.target, configs=True)
            for name in os.listdir(self.path):
                os.replace(os.path.join(self.path, name), os.path.join(self.target, name))
            os.rmdir(self.path)
        else:
            if os.path.isdir(self.target):
                os.rmdir(self.target)
            os.replace(self.path, self.target)
        return False
