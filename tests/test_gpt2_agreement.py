"""GPT against transformers' GPT-2 on the same weights, at a greedy step (issue 25, item 4).

tests/fixtures/gpt2_greedy_step was written by bench/gpt2_peer_replies.py (run by hand with a torch +
transformers venv): the tiny GPT (`paddlellm tiny --family gpt-3`, seed 42, as tiny_dir builds it) exported with
export-hf, greedy replies of both sides at batch 8, and one step's context and logits of both sides. Its kind:
"near_tie", a step where the replies parted, or "closest_call", when none parted, the agreed step whose two
largest logits were closest. No torch here: paddle's logits are recomputed and compared with transformers'.
"""
import json
import os

import numpy as np

from conftest import ROOT
from paddlellm.families import get_family
from test_hf import raw_logits

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "gpt2_greedy_step")


def test_gpt_reads_its_greedy_step_as_transformers_gpt2_does(tiny_dir):
    about = json.load(open(os.path.join(FIXTURE, "made_by.json")))
    assert about["shape"] == {} and about["seed"] == 42  # the tiny model tiny_dir builds
    fam = get_family("gpt-3")
    context = np.load(os.path.join(FIXTURE, "context_ids.npy"))
    theirs = np.load(os.path.join(FIXTURE, "transformers_logits.npy"))
    ours = raw_logits(fam.load_model(tiny_dir("gpt-3")), context[None])[0, -1]
    assert ours.shape == theirs.shape == (600,)
    recorded = np.load(os.path.join(FIXTURE, "paddle_logits.npy"))  # what paddlellm computed there, batched with padding
    assert np.abs(ours - recorded).max() < 1e-5, "not the tiny GPT the fixture was made with: re-run bench/gpt2_peer_replies.py"
    rounding = float(np.abs(ours - theirs).max())
    assert rounding < 1e-5  # the same maths: float32 rounding apart, over the whole vocabulary
    order = np.argsort(-theirs)
    gap = float(theirs[order[0]] - theirs[order[1]])
    assert gap < 1e-3 and theirs[order[1]] - theirs[order[2]] > 0  # a close call among the 600 logits
    if about["kind"] == "near_tie":
        # the replies parted here: the two largest logits are within rounding, so either order is a right answer
        assert gap <= 2 * max(rounding, about["max_abs_logit_difference_at_step"])
        assert set(np.argsort(-ours)[:2]) == set(order[:2])
    else:
        # no reply parted: even the closest call is far wider than the rounding, and both sides pick the same token
        assert gap > 100 * rounding and int(np.argmax(ours)) == int(order[0])
