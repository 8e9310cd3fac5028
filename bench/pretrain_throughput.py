"""Pretraining throughput of run_pretrain.py against a plain paddlenlp Trainer loop, in the same run.

A LLaMA-shaped model (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8000, the shape the other
benches use) is pretrained from scratch with max_seq_length 512 and batch 4 on a generated corpus
(PREFIX.bin/.idx written by paddlellm's create_pretraining_data machinery). Two arms, each in a fresh
subprocess (CPU runtime set before paddle loads; peak memory per arm):

  paddlellm  paddlellm.commands.pretrain.run(argv): the code path of `python run_pretrain.py ...`
  plain      PaddleNLP's run_pretrain.py recipe written out: paddlenlp Trainer, paddlenlp's causal_dataset
             on the same files, DistributedBatchSampler(shuffle=False), input_ids/labels collate,
             CosineAnnealingWithWarmupDecay. Same model config, seed, data, batch and CPU runtime settings.

    python bench/pretrain_throughput.py            # 12 steps per arm (2 warm-up): ~3-5 min on 2 cores
    python bench/pretrain_throughput.py --steps 6  # a smoke check

Figures (printed, saved to bench/results/pretrain_throughput.json):
  tokens/s    tokens of steps warmup+1..N / wall time of those steps (every token is real: no padding)
  MFU         tokens/s x model FLOPs per token / measured float32 matmul FLOP/s (1024^3, own subprocess);
              FLOPs per token = 6 N + 12 L h c, N = matmul weights (attention, MLP, lm_head), c = (S+1)/2
  peak RSS    ru_maxrss of the arm's process
  other CPU   share of the machine's cores used by other processes while the arm ran (/proc/stat)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import machine_info, matmul_gflops, save_report  # noqa: E402

MODEL = dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
             num_attention_heads=8, max_position_embeddings=512, rms_norm_eps=1e-6)
SEQ, BATCH, SEED, LR = 512, 4, 1234, 3e-4


def _result(obj) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def _child(args, log: Path) -> dict:
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO))
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed (rc {proc.returncode}); log {log}:\n{text[-3000:]}")
    return json.loads([l for l in text.splitlines() if l.startswith("RESULT ")][-1][7:])


def _busy_cpu_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------ children
def child_prepare(work: str) -> None:
    """Model folder (config + tokenizer) and a corpus of ~400k tokens as PREFIX.bin/.idx/.json."""
    from paddlellm import cpu_runtime

    cpu_runtime.configure(log=False)
    import numpy as np
    from paddlenlp.transformers import LlamaConfig

    from paddlellm.families import META_FILE, get_family
    from paddlellm.pretrain_data import tokenizer_identity, write_mmap
    from paddlellm.commands.tiny import build_tokenizer

    family = get_family("llama")
    model_dir = os.path.join(work, "model")
    os.makedirs(model_dir, exist_ok=True)
    tok = build_tokenizer(family, model_dir, MODEL["vocab_size"])  # ~1.6k learned pieces, the rest reserved (never produced)
    assert len(tok) == MODEL["vocab_size"], len(tok)
    LlamaConfig(**MODEL, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(model_dir)
    with open(os.path.join(model_dir, META_FILE), "w") as f:
        json.dump({"family": "llama", "kind": "base"}, f)
    words = [i for p, i in tok.get_vocab().items() if p.startswith("\u2581") and p[1:].isalpha()]
    rng = random.Random(SEED)
    docs = [[rng.choice(words) for _ in range(max(8, int(rng.lognormvariate(np.log(200), 0.6))))] + [tok.eos_token_id] for _ in range(2000)]
    prefix = os.path.join(work, "data", "corpus")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    stats = write_mmap(prefix, docs, tokenizer_identity(family, tok, model_dir))
    _result({"model_dir": model_dir, "prefix": prefix, **stats})


def child_matmul() -> None:
    from paddlellm import cpu_runtime

    decision = cpu_runtime.configure(log=False)
    _result({"gflops": matmul_gflops(10), "env": decision.env})


def _step_clock(times):
    from paddlenlp.trainer import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    return StepClock()


def child_arm(arm: str, model_dir: str, prefix: str, steps: int, out: str) -> None:
    from paddlellm import cpu_runtime

    cpu_runtime.configure(log=False)
    times = []
    busy0, cpu0, t0 = _busy_cpu_s(), _cpu_s(), time.perf_counter()
    if arm == "paddlellm":
        from paddlellm.commands import pretrain

        make = pretrain.make_trainer_class

        def timed_trainer_class():
            base = make()

            class Timed(base):
                def __init__(self, *a, **k):
                    super().__init__(*a, **k)
                    self.add_callback(_step_clock(times))

            return Timed

        pretrain.make_trainer_class = timed_trainer_class
        code = pretrain.run(["--model_name_or_path", model_dir, "--input_dir", prefix, "--output_dir", out, "--split", "1,0,0",
                             "--max_seq_length", str(SEQ), "--per_device_train_batch_size", str(BATCH), "--max_steps", str(steps),
                             "--learning_rate", str(LR), "--min_learning_rate", str(LR / 10), "--warmup_steps", "2",
                             "--do_eval", "false", "--save_strategy", "no", "--logging_steps", "1000", "--disable_tqdm", "true",
                             "--pad_vocab_to_multiple_of", "1", "--seed", str(SEED)])
        assert code == 0
    else:
        plain_loop(model_dir, prefix, steps, out, times)
    wall = time.perf_counter() - t0
    other = max(_busy_cpu_s() - busy0 - (_cpu_s() - cpu0), 0.0) / max(wall, 1e-9) / os.cpu_count()
    _result({"step_times": [b - a for a, b in zip(times, times[1:])], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "other_cpu_share": other})


def plain_loop(model_dir: str, prefix: str, steps: int, out: str, times) -> None:
    """PaddleNLP's pretraining recipe with nothing of paddlellm's in the loop."""
    import numpy as np
    import paddle
    from paddlenlp.data.causal_dataset import build_train_valid_test_datasets
    from paddlenlp.trainer import Trainer, TrainingArguments, set_seed
    from paddlenlp.transformers import CosineAnnealingWithWarmupDecay, LlamaConfig, LlamaForCausalLM
    from paddlenlp.utils.batch_sampler import DistributedBatchSampler

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR, save_strategy="no",
                             evaluation_strategy="no", logging_steps=1000, disable_tqdm=True, report_to=["none"], seed=SEED)
    train, _, _ = build_train_valid_test_datasets([prefix], "mmap", "1,0,0", [BATCH * steps, 0, 0], SEQ, SEED, True)
    set_seed(SEED)
    model = LlamaForCausalLM.from_config(LlamaConfig.from_pretrained(model_dir))

    def collate(samples):
        t = np.stack([s["text"] for s in samples]).astype("int64")
        return {"input_ids": paddle.to_tensor(t[:, :-1]), "labels": paddle.to_tensor(t[:, 1:])}

    class PretrainingTrainer(Trainer):
        def _get_train_sampler(self):
            return DistributedBatchSampler(self.train_dataset, batch_size=BATCH, shuffle=False, num_replicas=1, rank=0)

    lr = CosineAnnealingWithWarmupDecay(max_lr=LR, min_lr=LR / 10, warmup_step=2, decay_step=steps, last_epoch=0)
    trainer = PretrainingTrainer(model=model, args=args, train_dataset=train, data_collator=collate, optimizers=(None, lr))
    trainer.add_callback(_step_clock(times))
    trainer.train()


# ------------------------------------------------------------------ parent
def flops_per_token() -> float:
    h, i, L, V = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"], MODEL["vocab_size"]
    n = L * (4 * h * h + 3 * h * i) + h * V
    return 6 * n + 12 * L * h * (SEQ + 1) / 2


def load_warning(arms: dict, gflops: float) -> str:
    """A warning to keep with the figures when other processes took a noticeable share of the machine."""
    busy = max(r["other_cpu_share"] for r in arms.values())
    if busy <= 0.10:
        return ""
    return (f"other processes used up to {100 * busy:.0f}% of the machine's cores during the arms (matmul measured "
            f"{gflops:.1f} GFLOP/s under that load): tokens/s, MFU and the ratio are distorted by the load, not figures of the code")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "pretrain_throughput.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pretrain_bench_"))
    print(f"work folder {work}")
    data = _child(["prepare", str(work)], work / "prepare.log")
    mm = _child(["matmul"], work / "matmul.log")
    arms = {}
    for arm in ("plain", "paddlellm"):
        print(f"running {arm} ...", flush=True)
        r = _child(["arm", arm, data["model_dir"], data["prefix"], str(a.steps), str(work / f"out_{arm}")], work / f"{arm}.log")
        timed = r["step_times"][a.warmup:]
        tps = BATCH * SEQ * len(timed) / sum(timed)
        arms[arm] = {"tokens_per_s": round(tps, 1), "mfu": round(tps * flops_per_token() / (mm["gflops"] * 1e9), 4),
                     "s_per_step": round(sum(timed) / len(timed), 3), "peak_rss_mb": round(r["peak_rss_mb"]),
                     "other_cpu_share": round(r["other_cpu_share"], 3), "step_times": [round(t, 3) for t in r["step_times"]]}
    ratio = arms["paddlellm"]["tokens_per_s"] / arms["plain"]["tokens_per_s"]
    report = {"machine": machine_info(), "matmul_gflops": round(mm["gflops"], 1), "cpu_runtime_env": mm["env"],
              "model": MODEL, "max_seq_length": SEQ, "batch": BATCH, "steps": a.steps, "warmup_steps": a.warmup,
              "corpus": {k: data[k] for k in ("documents", "tokens", "dtype")}, "flops_per_token": flops_per_token(),
              "arms": arms, "paddlellm_over_plain": round(ratio, 3)}
    report["warning"] = load_warning(arms, mm["gflops"])
    if report["warning"]:
        print("WARNING: " + report["warning"])
    print(f"\nmatmul {mm['gflops']:.1f} GFLOP/s; LLaMA 512x4 vocab 8000, seq {SEQ}, batch {BATCH}, {a.steps} steps ({a.warmup} warm-up)")
    print(f"{'arm':10} {'tokens/s':>9} {'MFU':>6} {'s/step':>7} {'peak RSS':>9} {'other CPU':>10}")
    for name, r in arms.items():
        print(f"{name:10} {r['tokens_per_s']:9.1f} {100 * r['mfu']:5.1f}% {r['s_per_step']:7.2f} {r['peak_rss_mb']:7d} MB {100 * r['other_cpu_share']:9.0f}%")
    print(f"paddlellm / plain: {ratio:.2f}x")
    print(f"saved {save_report(a.out, report)}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        child_prepare(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "matmul":
        child_matmul()
    elif len(sys.argv) > 1 and sys.argv[1] == "arm":
        child_arm(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        main()
