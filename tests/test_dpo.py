"""DPO (run_dpo.py / paddlellm dpo) on paddlenlp's DPOTrainer: the loss against the formula by hand, learning a
preference rule on tiny models, data errors, and the output folder in predict and merge_lora_params.py."""
import glob
import json
import os
import sys

import numpy as np
import pytest

from conftest import FAMILIES, ROOT, run_cmd

DPO_DATA = os.path.join(ROOT, "data", "dpo")
PAIRS = [  # the second has an earlier turn; the third lists the chosen reply second (higher sort wins)
    {"src": "spell: 4 0 7", "tgt": [], "response": ["four zero seven", "five one"], "sort": [2, 1]},
    {"src": ["hello", "spell: 1 2"], "tgt": ["hi there"], "response": ["one two", "two three four five"], "sort": [1, 0]},
    {"src": "spell: 9", "response": ["eight eight", "nine"], "sort": [0, 3]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _logps(model, family, tokenizer, ex, start):
    """Sum of log p(label) over an Example's labels from index `start` on, from the model's own unpacked forward."""
    import paddle

    from paddlellm.families import logits_of

    batch = family.build_batch([[ex]], tokenizer.pad_token_id)
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k not in ("labels", "loss_mask")}
    with paddle.no_grad():
        lp = paddle.nn.functional.log_softmax(logits_of(model(**inputs)).astype("float32"), -1).numpy()[0]
    labels = ex.labels[start:]
    return float(sum(lp[start + i, t] for i, t in enumerate(labels))), len(labels)


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def by_hand(loss_type, beta, policy, reference):
    """The DPO losses from the papers, on [(chosen logp, chosen tokens, rejected logp, rejected tokens)] per pair."""
    p, r = np.array(policy, dtype="float64"), np.array(reference, dtype="float64")
    if loss_type == "ipo":  # IPO compares mean token log-probabilities
        pc, pr, rc, rr = p[:, 0] / p[:, 1], p[:, 2] / p[:, 3], r[:, 0] / r[:, 1], r[:, 2] / r[:, 3]
        return float(np.mean(((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2))
    logits = (p[:, 0] - p[:, 2]) - (r[:, 0] - r[:, 2])
    return float(np.mean(-_log_sigmoid(beta * logits)))


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_equals_formula_by_hand(tiny_dir, tmp_path, kind, loss_type):
    """DPOTrainer's loss on one batch (three pairs in one collated batch) = the formula from the policy's and the
    reference's log-probabilities, each reply scored by a separate forward of the model alone. With LoRA the
    reference is the base model loaded afresh (the adapters switched off give exactly its log-probabilities)."""
    import paddle
    from paddlenlp.trainer import TrainingArguments

    from paddlellm.commands.dpo import DPOArgument, reference_model
    from paddlellm.finetune_args import ModelArgument
    from paddlellm.tuning import build_model
    from paddlellm.families import get_family
    from paddlellm.preference_data import PreferenceCollator, encode_pair, read_preference_records
    from paddlellm.preference_trainer import build_preference_trainer

    base = tiny_dir("llama")
    family = get_family("llama")
    tok = family.load_tokenizer(base)
    records = read_preference_records(write_jsonl(tmp_path / "pairs.json", PAIRS))
    assert [(r.chosen, r.rejected) for r in records] == [("four zero seven", "five one"), ("one two", "two three four five"), ("nine", "eight eight")]
    pairs = [encode_pair(family, tok, r, 32, 16) for r in records]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3, report_to=["none"])
    margs = ModelArgument(model_name_or_path=base, lora=kind == "lora", lora_rank=4)
    dpo = DPOArgument(beta=0.5, loss_type=loss_type)
    dpo.lora = kind == "lora"
    paddle.seed(7)
    model, _ = build_model(family, margs, args, tok)
    # Move the policy away from the reference (LoRA starts equal to it: B = 0), so both sides of the formula count.
    with paddle.no_grad():
        for name, p in model.named_parameters():
            if kind == "full" and name.endswith("q_proj.weight") or kind == "lora" and "lora_B" in name:
                p.set_value(p + paddle.randn(p.shape, dtype=p.dtype) * 0.2)
    ref = reference_model(family, margs, args) if kind == "full" else None
    trainer = build_preference_trainer(model, ref, tok, family, args, dpo, pairs, [])
    batch = PreferenceCollator(family, tok.pad_token_id)(pairs)
    model.eval()
    loss = float(trainer.compute_loss(model, batch))

    fresh_base = family.load_model(base)
    fresh_base.eval()
    model.eval()
    policy, reference = [], []
    for pair in pairs:
        policy.append(_logps(model, family, tok, pair.chosen, pair.shared) + _logps(model, family, tok, pair.rejected, pair.shared))
        reference.append(_logps(fresh_base, family, tok, pair.chosen, pair.shared) + _logps(fresh_base, family, tok, pair.rejected, pair.shared))
    assert [(pc, pr) for pc, _, pr, _ in policy] != [(rc, rr) for rc, _, rr, _ in reference]
    expected = by_hand(loss_type, 0.5, policy, reference)
    assert abs(loss - expected) < 1e-4 * max(1.0, abs(expected)), (loss, expected)
    # the logged rewards are beta * (policy - reference) log-ratios of the same numbers
    logged = {k: float(np.mean(v)) for k, v in trainer._stored_metrics["train"].items()}
    avg = loss_type == "ipo"
    chosen = [0.5 * ((p[0] / p[1] if avg else p[0]) - (r[0] / r[1] if avg else r[0])) for p, r in zip(policy, reference)]
    rejected = [0.5 * ((p[2] / p[3] if avg else p[2]) - (r[2] / r[3] if avg else r[2])) for p, r in zip(policy, reference)]
    assert abs(logged["rewards/chosen"] - np.mean(chosen)) < 1e-4
    assert abs(logged["rewards/rejected"] - np.mean(rejected)) < 1e-4
    assert logged["rewards/accuracies"] == pytest.approx(np.mean(np.array(chosen) > np.array(rejected)))


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_context_layout_scores_each_reply_as_alone(tiny_dir, tmp_path, family):
    """Every family: in the DPOTrainer layout (context once, both replies after it, packed or not) each reply's
    log-probability equals that of a separate forward of context + reply (BLOOM through its ALiBi from the mask's
    positions: with paddlenlp's ALiBi from the key index the rejected replies differ)."""
    import paddle

    from paddlellm.families import get_family, logits_of
    from paddlellm.preference_data import build_preference_batch, encode_pair, read_preference_records

    fam = get_family(family)
    path = tiny_dir(family)
    tok, model = fam.load_tokenizer(path), fam.load_model(path)
    model.eval()
    pairs = [encode_pair(fam, tok, r, 32, 16) for r in read_preference_records(write_jsonl(tmp_path / "p.json", PAIRS))]
    expected = np.array([[_logps(model, fam, tok, p.chosen, p.shared)[0], _logps(model, fam, tok, p.rejected, p.shared)[0]] for p in pairs])
    for rows in ([[p] for p in pairs], [pairs[:2], pairs[2:]]):  # one pair per row, and two packed into a row
        b = build_preference_batch(fam, rows, tok.pad_token_id)
        with paddle.no_grad():
            out = model(**{k: paddle.to_tensor(b[k]) for k in ("input_ids", "position_ids", "attention_mask") if k in b})
        lp = paddle.nn.functional.log_softmax(logits_of(out).astype("float32"), -1).numpy()
        labels = b["chosen_labels"] + b["rejected_labels"]
        got = np.array([[sum(lp[r, i, labels[r, i]] for i in range(s, e)) for s, e in ((s0, s1), (s1, end))]
                        for r, s0, s1, end in b["response_indexs"]])
        assert np.abs(got - expected).max() < 1e-4, (got, expected)


# ------------------------------------------------------------------ learning a preference rule
def dpo_cmd(args, check=False, timeout=600):
    return run_cmd([sys.executable, os.path.join(ROOT, "run_dpo.py"), *args], check=check, timeout=timeout)


TRAIN = ["--dataset_name_or_path", DPO_DATA, "--lora", "true", "--lora_rank", "8", "--per_device_train_batch_size", "16",
         "--per_device_eval_batch_size", "20", "--learning_rate", "5e-3", "--beta", "0.1", "--src_length", "32", "--tgt_length", "12",
         "--logging_steps", "10", "--evaluation_strategy", "steps", "--eval_steps", "20", "--save_strategy", "steps", "--save_steps", "20",
         "--save_total_limit", "1", "--disable_tqdm", "true", "--seed", "3", "--warmup_steps", "0"]


STEPS = {"llama": 40, "chatglm_v2": 120, "opt": 160}  # margin: at 80 / 120 steps they sat at exactly 36/40
LR = {"llama": "5e-3", "chatglm_v2": "1e-2", "opt": "5e-3"}


@pytest.fixture(scope="module")
def aligned(tiny_dir, tmp_path_factory):
    """family -> output folder of a LoRA DPO run on the bundled rule set (data/dpo: the chosen reply spells the
    digits right, the rejected one with wrong digit words). Tiny LLaMA learns the rule in 40 steps; the others
    need three to four times as many (each at the learning rate that got there first; measured 38/40 held-out pairs, where fewer steps left them at exactly 36/40)."""
    done = {}

    def get(family):
        if family not in done:
            out = str(tmp_path_factory.mktemp("dpo") / family)
            dpo_cmd(["--model_name_or_path", tiny_dir(family), "--output_dir", out, "--max_steps", str(STEPS[family]), *TRAIN,
                    "--learning_rate", LR[family]], check=True)
            done[family] = out
        return done[family]

    return get


@pytest.mark.parametrize("family", list(STEPS))
def test_dpo_learns_the_preference_rule(aligned, family):
    out = aligned(family)
    with open(os.path.join(out, "log_history.json")) as f:
        history = json.load(f)
    evals = [h for h in history if "eval_loss" in h]
    train = [h for h in history if "loss" in h]
    # before training the policy is the reference: every reward is 0, the loss log(2)
    assert abs(train[0]["loss"] - np.log(2)) < 0.1 and train[-1]["loss"] < train[0]["loss"] - 0.05, train
    with open(os.path.join(out, "eval_results.json")) as f:
        final = json.load(f)
    assert final["eval_rewards/accuracies"] >= 0.9 - 1e-6, final  # (a float32 mean) held-out pairs: data/dpo/dev.json prompts are not in train
    assert final["eval_rewards/margins"] > 0 and final["eval_rewards/chosen"] > final["eval_rewards/rejected"]
    assert final["eval_loss"] < np.log(2) and evals[-1]["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in train[-1] and f"eval_{key}" in evals[-1]
    # save_total_limit 1: only the newest checkpoint stays, marked complete; the adapter and our metadata are there
    last = f"checkpoint-{STEPS[family]}"
    assert sorted(os.path.basename(c) for c in glob.glob(os.path.join(out, "checkpoint-*"))) == [last]
    assert os.path.isfile(os.path.join(out, last, "paddlellm_checkpoint_complete.json"))
    with open(os.path.join(out, "paddlellm_meta.json")) as f:
        meta = json.load(f)
    assert meta["family"] == family and meta["kind"] == "lora" and meta["alignment"]["method"] == "dpo"


def test_resume_continues_from_the_checkpoint(aligned, tmp_path):
    """Rerunning into a finished folder with more steps resumes from its checkpoint (step 40), not from scratch."""
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(aligned("llama"), out)
    proc = dpo_cmd(["--model_name_or_path", json.load(open(os.path.join(out, "paddlellm_meta.json")))["base_model"],
                    "--output_dir", out, "--max_steps", "50", *TRAIN], check=True)
    assert "resuming from" in proc.stdout + proc.stderr and "checkpoint-40" in proc.stdout + proc.stderr
    history = json.load(open(os.path.join(out, "log_history.json")))
    assert [h["step"] for h in history if "loss" in h] == [50]


# ------------------------------------------------------------------ greedy replies follow the rule
YES, NO = "yes, happy to help", "no, not today"  # the chosen and the rejected reply style


def _ask(i):
    return f"help me with {i // 10} {i % 10}"


ASK_HELD = [3, 17, 29, 41, 58, 62, 74, 85, 90, 99]  # prompts seen by neither SFT nor DPO
ASK_TRAIN = [i for i in range(100) if i not in ASK_HELD]
RULE_SHAPE = ["--src_length", "16", "--tgt_length", "12", "--evaluation_strategy", "no", "--save_strategy", "no",
              "--disable_tqdm", "true", "--seed", "1", "--warmup_steps", "0", "--logging_steps", "10", "--per_device_train_batch_size", "16"]
RULE_FAMILIES = ["llama", "chatglm_v2", "opt", "bloom", "gpt-3", "qwen2", "chatglm", "glm"]


@pytest.fixture(scope="module")
def rule_runs(tiny_dir, tmp_path_factory):
    """family -> (greedy replies on the held-out prompts before DPO, after DPO, DPO output folder).

    First SFT (finetune_generation's command, 60 steps, lr 5e-3) on every training prompt answered 2 times in 5 with
    YES and 3 times in 5 with NO, so greedy decoding answers NO; then 20 LoRA DPO steps (lr 1e-3, beta 0.1) on the
    same prompts with YES chosen over NO. Greedy replies come from predict_generation's command. Measured: 10/10 NO
    before, 10/10 YES after for these families (seeds 1-3 for LLaMA; a higher DPO lr or fewer SFT steps left
    LLaMA/OPT replies broken after the first token, e.g. "yy, happy to help")."""
    from paddlellm.commands import dpo, finetune, predict

    root = tmp_path_factory.mktemp("dpo_rule")
    sft_rows = [{"src": _ask(i), "tgt": YES if k < 2 else NO} for i in ASK_TRAIN for k in range(5)]
    pairs = [{"src": _ask(i), "tgt": [], "response": [YES, NO] if n % 2 else [NO, YES], "sort": [1, 0] if n % 2 else [0, 1]}
             for n, i in enumerate(ASK_TRAIN)]
    for name, rows in (("sft", sft_rows), ("pref", pairs)):
        (root / name).mkdir()
        for split in ("train", "dev"):
            write_jsonl(root / name / f"{split}.json", rows)
    held = write_jsonl(root / "held.json", [{"src": _ask(i)} for i in ASK_HELD])
    done = {}

    def greedy(model, name):
        out = str(root / name)
        assert predict.main(["--model_name_or_path", model, "--data_file", held, "--output_file", out, "--batch_size", "10"]) == 0
        return [json.loads(line)["output"] for line in open(out)]

    def get(family):
        if family not in done:
            sft, aligned_out = str(root / f"{family}-sft"), str(root / f"{family}-dpo")
            assert finetune.run(["--model_name_or_path", tiny_dir(family), "--dataset_name_or_path", str(root / "sft"),
                                 "--output_dir", sft, "--max_steps", "60", "--learning_rate", "5e-3", *RULE_SHAPE]) == 0
            before = greedy(sft, f"{family}-before.json")
            assert dpo.run(["--model_name_or_path", sft, "--dataset_name_or_path", str(root / "pref"), "--output_dir", aligned_out,
                            "--lora", "true", "--lora_rank", "8", "--max_steps", "20", "--learning_rate", "1e-3", "--beta", "0.1",
                            *RULE_SHAPE]) == 0
            done[family] = (before, greedy(aligned_out, f"{family}-after.json"), aligned_out)
        return done[family]

    return get


@pytest.mark.parametrize("family", RULE_FAMILIES)
def test_greedy_replies_follow_the_rule(rule_runs, family):
    """The issue's proof: after DPO the model's greedy replies on held-out prompts follow the preference rule
    (0% -> 100% the chosen style), where SFT alone made them all the rejected style."""
    before, after, _ = rule_runs(family)
    assert before == [NO] * len(ASK_HELD), before
    assert after == [YES] * len(ASK_HELD), after


def test_lora_dpo_folder_serves_predicts_reply(rule_runs, tmp_path):
    """flask_server.py on a LoRA DPO output folder alone (it records its base, the SFT folder): /api/chat answers
    200 with predict_generation's greedy reply to the same held-out prompt (the chosen style)."""
    from test_serve import api_server

    _, after, out = rule_runs("llama")
    srv = api_server(out, tmp_path / "server.log", 12)
    try:
        for i, want in list(zip(ASK_HELD, after))[:2]:
            resp = srv.post("/api/chat", {"context": _ask(i)})
            assert resp.status_code == 200, resp.text
            assert resp.json()["result"]["response"]["utterance"] == want == YES
    finally:
        srv.stop()


# ------------------------------------------------------------------ the output folder
def test_output_folder_predicts_and_merges(aligned, tmp_path):
    import paddle

    from paddlellm.families import logits_of
    from paddlellm.loading import load_for_inference
    from paddlellm.commands.predict import main as predict

    out = aligned("llama")
    merged = str(tmp_path / "merged")
    run_cmd([sys.executable, os.path.join(ROOT, "merge_lora_params.py"), "--lora_path", out, "--merge_lora_model_path", merged])
    adapted, tok, fam, meta = load_for_inference(out)
    full, _, _, _ = load_for_inference(merged)
    assert meta["kind"] == "lora"
    batch = fam.build_batch([[fam.encode(tok, ["spell: 3 1"], ["three one"], 32, 12)]], tok.pad_token_id)
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k != "labels"}
    with paddle.no_grad():
        a, m = logits_of(adapted(**inputs)).numpy(), logits_of(full(**inputs)).numpy()
    assert np.abs(a - m).max() < 1e-4
    data = write_jsonl(tmp_path / "q.json", [{"src": "spell: 3 1", "tgt": "three one"}, {"src": "spell: 7", "tgt": "seven"}])
    for model, name in ((out, "a.json"), (merged, "b.json")):
        assert predict(["--model_name_or_path", model, "--data_file", data, "--output_file", str(tmp_path / name)]) == 0
    assert open(tmp_path / "a.json").read() == open(tmp_path / "b.json").read()


def test_full_dpo_output_folder(tiny_dir, tmp_path):
    """Full-parameter DPO (frozen reference copy) writes model.safetensors that predict, export-hf and quant load; hinge loss."""
    from paddlellm.loading import load_for_inference

    out = str(tmp_path / "full")
    dpo_cmd(["--model_name_or_path", tiny_dir("llama"), "--output_dir", out, "--max_steps", "3", "--loss_type", "hinge",
             *[a for a in TRAIN if a not in ("--lora", "true")]], check=True)
    assert os.path.isfile(os.path.join(out, "model.safetensors")) and not glob.glob(os.path.join(out, "lora_*"))
    _, _, fam, meta = load_for_inference(out)
    assert fam.name == "llama" and meta["kind"] == "full" and meta["alignment"]["loss_type"] == "hinge"
    assert json.load(open(os.path.join(out, "finetune_args.json")))["loss_type"] == "hinge"
    # ... and the later stages take it as they take an SFT output: export-hf (same logits read back) and quant
    import paddle

    from paddlellm.cli import run_command
    from paddlellm.families import logits_of

    hf_out, q_out = str(tmp_path / "hf"), str(tmp_path / "q")
    assert run_command("export-hf", ["--model_name_or_path", out, "--output_path", hf_out]) == 0
    ids = paddle.to_tensor(np.array([[1, 5, 9, 13, 17, 21]], dtype="int64"))
    with paddle.no_grad():
        a, b = (logits_of(load_for_inference(f)[0](input_ids=ids)).numpy() for f in (out, hf_out))
    assert np.abs(a - b).max() < 1e-5
    assert run_command("quant", ["--model_name_or_path", out, "--dataset_name_or_path", os.path.join(ROOT, "data"),
                                 "--output_dir", q_out, "--do_ptq", "--quant_type", "WINT8", "--ptq_step", "1",
                                 "--src_length", "32", "--tgt_length", "12"]) == 0
    assert json.load(open(os.path.join(q_out, "paddlellm_meta.json")))["family"] == "llama"


# ------------------------------------------------------------------ data and argument errors
GOOD = {"src": "a", "tgt": [], "response": ["b", "c"], "sort": [1, 0]}
BAD = {
    "missing_response": ({"src": "a", "sort": [1, 0]}, "train.json:2: missing field 'response' (a preference line needs 'src', 'tgt', 'response' and 'sort')"),
    "sort_tie": ({**GOOD, "sort": [1, 1]}, "train.json:2: field 'sort': the two ranks are equal (1 and 1); the higher rank marks the chosen reply, so they must differ"),
    "empty_reply": ({**GOOD, "response": ["b", "  "]}, "train.json:2: field 'response': reply 2 is empty"),
    "unequal_src_tgt": ({**GOOD, "src": ["a", "b"], "tgt": ["x", "y"]},
                        "train.json:2: fields 'src' and 'tgt': 'tgt' holds the earlier replies, one fewer than 'src' (2 src turns need 1 tgt turns, got 2)"),
    "three_replies": ({**GOOD, "response": ["b", "c", "d"]}, "train.json:2: field 'response' must be a list of two strings (the candidate replies), got [\"b\", \"c\", \"d\"]"),
    "sort_not_numbers": ({**GOOD, "sort": ["1", "0"]}, "train.json:2: field 'sort' must be a list of two numbers (the ranks of the two replies), got [\"1\", \"0\"]"),
}


def assert_one_line_error(proc, expected_tail, out):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if not l.startswith("paddlellm: CPU runtime")]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and lines[0].endswith(expected_tail), lines[0]
    assert not os.path.exists(out)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_preference_data(tmp_path, case):
    row, expected = BAD[case]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.json", [GOOD, row])
    out = str(tmp_path / "out")
    assert_one_line_error(dpo_cmd(["--model_name_or_path", "unused-llama", "--dataset_name_or_path", str(tmp_path / "data"),
                                   "--output_dir", out]), expected, out)


@pytest.mark.parametrize("args, expected", [
    (["--loss_type", "kto_pair", "--reference_free", "true"], "--reference_free true: loss_type kto_pair needs the reference model; use sigmoid, hinge, ipo, or or simpo"),
    (["--prefix_tuning", "true"], "use --lora or neither"),
    (["--lora", "true", "--ref_model_update_steps", "10"], "leave it at -1"),
    (["--loss_type", "dpo"], "--loss_type: loss_type must be one of sigmoid, hinge, ipo, kto_pair, sppo_hard, nca_pair, dpop, or, simpo, orpo, got 'dpo'"),
    (["--beta", "0"], "--beta must be > 0, got 0.0"),
])
def test_bad_dpo_arguments(tmp_path, args, expected):
    out = str(tmp_path / "out")
    assert_one_line_error(dpo_cmd(["--model_name_or_path", "m", "--dataset_name_or_path", DPO_DATA, "--output_dir", out, *args]), expected, out)


# ------------------------------------------------------------------ shipped argument files
def test_every_family_ships_a_dpo_argument_file():
    """llm/<family>/dpo_argument.json for every family, parsed by the DPO command's own parser."""
    from paddlellm.commands import dpo
    from paddlellm.families import names

    assert sorted(glob.glob(os.path.join(ROOT, "llm", "*", "dpo_argument.json"))) == sorted(
        os.path.join(ROOT, "llm", f, "dpo_argument.json") for f in names())
    assert sorted(FAMILIES) == sorted(names())
    for fam in names():
        path = os.path.join(ROOT, "llm", fam, "dpo_argument.json")
        model_args, data_args, cfg, training = dpo.parse([path, "--output_dir", "/tmp/unused-dpo-out"])
        raw = json.load(open(path))
        assert cfg.loss_type == raw["loss_type"] and cfg.beta == raw["beta"] and cfg.lora == bool(raw.get("lora"))
        assert data_args.dataset_name_or_path == raw["dataset_name_or_path"] and model_args.model_name_or_path == raw["model_name_or_path"]
