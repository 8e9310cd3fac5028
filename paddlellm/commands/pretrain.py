"""Pretraining a causal language model on PaddleNLP's token files (PREFIX.bin/.idx), as PaddleNLP's run_pretrain.py.

    python run_pretrain.py llm/llama/pretrain_argument.json [--key value ...]
    python -m paddle.distributed.launch --nproc_per_node 2 run_pretrain.py ARGS.json

Samples come from paddlenlp's own causal_dataset (Megatron-style document/sample/shuffle index): the data
order depends only on the seed and the data settings, paddlenlp's DistributedBatchSampler reads that order
without shuffling, so a resumed run jumps straight to the next unseen sample and ends with exactly the
weights of an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..arguments import UserError, check_can_create, dump_args, fail, make_dir, parse_args, require_at_least

log = logging.getLogger("paddlellm")
SETTINGS_FILE = "pretrain_data_settings.json"  # in output_dir: what fixes the sample order (checked on resume)
GPU_ONLY = ("use_flash_attention", "use_fused_rms_norm", "use_fused_rope", "fuse_attention_qkv", "fuse_attention_ffn", "sequence_parallel")


@dataclass
class ModelArgument:
    model_name_or_path: str = field(default=None, metadata={"help": "Model folder or PaddleNLP name: its config (and weights with continue_training) and tokenizer."})
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer source when it differs from model_name_or_path."})
    config_name: Optional[str] = field(default=None, metadata={"help": "Config source when it differs from model_name_or_path (from-scratch training)."})
    model_type: Optional[str] = field(default=None, metadata={"help": "Accepted for compatibility with PaddleNLP's files; the family comes from the model (or --family)."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the model folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm qwen2."})
    continue_training: bool = field(default=False, metadata={"help": "true: start from the model's weights; false: a fresh random model with its config (seeded)."})
    objective: Optional[str] = field(default=None, metadata={"help": "causal (plain next-token LM) or gmask (GLM / ChatGLM v1 blank infilling); default: the family's own (see llm/<family>/README.md)."})
    dtype: str = field(default="float32", metadata={"help": "Weight dtype: float32, float16 or bfloat16 (use with --fp16/--bf16 on GPUs)."})
    pad_vocab_to_multiple_of: int = field(default=128, metadata={"help": "From scratch, round the embedding rows up to a multiple of this, as PaddleNLP (1 = keep)."})
    use_flash_attention: bool = field(default=False, metadata={"help": "GPU only."})
    use_fused_rms_norm: bool = field(default=False, metadata={"help": "GPU only."})
    use_fused_rope: bool = field(default=False, metadata={"help": "GPU only."})
    fuse_attention_qkv: bool = field(default=False, metadata={"help": "GPU only."})
    fuse_attention_ffn: bool = field(default=False, metadata={"help": "GPU only."})
    sequence_parallel: bool = field(default=False, metadata={"help": "GPU only (with tensor parallel)."})
    virtual_pp_degree: int = field(default=1, metadata={"help": "Pipeline parallel: not supported."})
    recompute_granularity: str = field(default="full", metadata={"help": "Accepted for compatibility (recompute itself is TrainingArguments' --recompute)."})
    no_recompute_layers: Optional[List[int]] = field(default=None, metadata={"help": "Accepted for compatibility."})
    pp_recompute_interval: int = field(default=1, metadata={"help": "Accepted for compatibility."})
    recompute_use_reentrant: bool = field(default=False, metadata={"help": "Accepted for compatibility."})


@dataclass
class DataArgument:
    input_dir: str = field(default=None, metadata={"help": "Data: a prefix (PREFIX.bin/.idx or PREFIX_ids.npy/_idx.npz), a folder of prefixes (each weight 1), or \"w1 prefix1 w2 prefix2\"."})
    split: str = field(default="949,50,1", metadata={"help": "Document shares of train,valid,test."})
    max_seq_length: int = field(default=1024, metadata={"help": "Tokens per training sample."})
    share_folder: bool = field(default=False, metadata={"help": "The data folder is shared by every node: only global rank 0 builds the index cache."})
    data_impl: str = field(default="mmap", metadata={"help": "mmap (also reads the older .npy/.npz pairs) or lazy.", "choices": ["mmap", "lazy"]})
    skip_warmup: bool = field(default=True, metadata={"help": "Don't pre-read the mmap files."})
    data_cache: Optional[str] = field(default=None, metadata={"help": "Folder for the sample index cache when the data folder is read-only (default then: OUTPUT_DIR/index-cache)."})
    eval_samples: int = field(default=80, metadata={"help": "Validation (and test) samples: the same ones at every evaluation, for any batch size or number of processes."})
    data_index_timeout: int = field(default=600, metadata={"help": "Seconds a process waits for another one to build the sample index before giving up."})


TRAINING_DEFAULTS = dict(
    do_train=True,
    lr_scheduler_type="cosine",  # PaddleNLP's pretraining: warm-up then cosine decay to min_learning_rate
    logging_steps=10,
    evaluation_strategy="steps",
    save_strategy="steps",
    report_to=["none"],
)


@dataclass
class PreTrainingExtra:
    min_learning_rate: float = field(default=1e-5, metadata={"help": "Learning rate at the end of the decay."})
    decay_steps: Optional[int] = field(default=None, metadata={"help": "Steps of the decay after warm-up (default: max_steps)."})
    enable_linear_fused_grad_add: bool = field(default=False, metadata={"help": "GPU only."})


def parse(argv=None):
    model_args, data_args, extra, training = parse_args(
        [ModelArgument, DataArgument, PreTrainingExtra], argv, prog="run_pretrain.py",
        description="Pretrain a causal LM (from scratch or continued) on PaddleNLP's PREFIX.bin/.idx token files.", training=True)
    try:
        if not model_args.model_name_or_path:
            raise UserError("model_name_or_path is required (its config, tokenizer and, with continue_training, weights)")
        if not data_args.input_dir:
            raise UserError("input_dir is required: files made by create_pretraining_data.py")
        if not training.get("output_dir"):
            raise UserError("output_dir is required: the folder for checkpoints and the trained model")
        if not training.get("max_steps") or training["max_steps"] <= 0:
            raise UserError("max_steps is required (pretraining counts steps; the samples it needs are drawn from the corpus)")
        require_at_least({"max_seq_length": data_args.max_seq_length, "eval_samples": data_args.eval_samples,
                          "pad_vocab_to_multiple_of": model_args.pad_vocab_to_multiple_of,
                          **{k: training.get(k) for k in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")}})
        if (training.get("learning_rate") or 0) < 0 or extra.min_learning_rate < 0:
            raise UserError("learning rates must not be negative")
        if int(training.get("pipeline_parallel_degree") or 1) > 1 or model_args.virtual_pp_degree > 1:
            raise UserError("pipeline parallel is not supported; use data parallel or tensor parallel")
        check_can_create(training["output_dir"], "output_dir")
    except UserError as e:
        fail(str(e))
    if training.get("do_eval") is False:  # PaddleNLP would turn evaluation back on for a "steps" strategy
        training.setdefault("evaluation_strategy", "no")
    for k, v in TRAINING_DEFAULTS.items():
        training.setdefault(k, v)
    training.setdefault("do_eval", training["evaluation_strategy"] != "no")
    return model_args, data_args, extra, training


def check_device(model_args, extra, training: Dict, family) -> bool:
    """Refuse GPU-only options on CPU in one line; returns whether a GPU is used. Tensor parallel runs on CPU
    processes too, for the families that support it (paddlellm/cpu_parallel.py)."""
    import paddle

    from ..runtime import check_training_device as check_training

    check_training(training, family=family, script="run_pretrain.py")
    gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    for name in GPU_ONLY:
        if getattr(model_args, name) and not gpu:
            raise UserError(f"--{name}: needs a GPU (paddlepaddle-gpu); set it to false to train on CPU")
    if extra.enable_linear_fused_grad_add and not gpu:
        raise UserError("--enable_linear_fused_grad_add: needs a GPU (paddlepaddle-gpu); set it to false to train on CPU")
    return gpu


# --------------------------------------------------------------------------- data
def data_sample_counts(data_args, args) -> List[int]:
    """[train, valid, test] samples to request: PaddleNLP's train count; a fixed number for valid and test."""
    train = args.per_device_train_batch_size * args.dataset_world_size * args.max_steps * args.gradient_accumulation_steps
    return [train, data_args.eval_samples if args.do_eval else 0, data_args.eval_samples if args.do_predict else 0]


def check_splits(prefixes, split: str, needs: List[bool]) -> Dict[str, List[int]]:
    """Documents per split of every prefix; a needed split with no document is one line, before training."""
    from ..pretrain_data import open_prefix, split_bounds

    counts = {}
    for _, prefix in prefixes:
        n = int(open_prefix(prefix).sizes.shape[0])
        b = split_bounds(split, n)
        per = [b[i + 1] - b[i] for i in range(3)]
        counts[prefix] = per
        for name, need, k in zip(("train", "validation", "test"), needs, per):
            if need and k == 0:
                what = {"train": "", "validation": " or turn evaluation off (--do_eval false)", "test": " or drop --do_predict"}[name]
                raise UserError(f"{prefix}: --split {split} leaves the {name} split no document (train/valid/test = {per[0]}/{per[1]}/{per[2]} of {n} "
                                f"documents); use more documents, give it a larger share{what}")
    return counts


class _WaitLimit:
    """Stands in for the `time` module inside paddlenlp.data.causal_dataset while the datasets are built.

    Workaround (paddlenlp 3.0.0b4): a process that does not build the sample index polls for it with
    `while True: time.sleep(3)`, forever if the builder died. Our sleep counts the waiting and raises a
    UserError when it passes the limit.
    """

    def __init__(self, limit: float, where: str):
        self.limit, self.where, self.waited = limit, where, 0.0

    def sleep(self, seconds: float) -> None:
        if self.waited >= self.limit:
            raise UserError(f"waited {self.waited:.0f} s for another process to build the sample index in {self.where}; it did not "
                            f"finish (did rank 0 fail?). Raise --data_index_timeout if building takes longer")
        step = min(seconds, 0.5)
        time.sleep(step)
        self.waited += step

    def __getattr__(self, name):
        return getattr(time, name)


def build_datasets(prefixes, data_args, args, output_dir: str):
    """paddlenlp's train/valid/test datasets (index cache next to the data, or in output_dir/index-cache)."""
    import contextlib
    import io

    from paddlenlp.data import causal_dataset

    data_prefix = [prefixes[0][1]] if len(prefixes) == 1 else [str(x) for pair in prefixes for x in pair]
    cache = data_args.data_cache
    if cache is None and not all(os.access(os.path.dirname(p), os.W_OK) for _, p in prefixes):
        cache = os.path.join(output_dir, "index-cache")  # a read-only data folder: keep the index with the run
    counts = data_sample_counts(data_args, args)
    where = cache or os.path.join(os.path.dirname(prefixes[0][1]), "index-cache")
    saved_time, causal_dataset.time = causal_dataset.time, _WaitLimit(data_args.data_index_timeout, where)
    quiet = contextlib.redirect_stdout(io.StringIO()) if args.local_rank > 0 else contextlib.nullcontext()
    try:
        with quiet:
            return causal_dataset.build_train_valid_test_datasets(
                data_prefix=data_prefix, data_impl=data_args.data_impl, splits_string=data_args.split,
                train_val_test_num_samples=counts, seq_length=data_args.max_seq_length, seed=args.seed,
                skip_warmup=data_args.skip_warmup, share_folder=data_args.share_folder, data_cache_path=cache)
    finally:
        causal_dataset.time = saved_time


class Samples:
    """The first `limit` samples of a paddlenlp dataset (all when None), each with its index (for per-sample draws)."""

    def __init__(self, dataset, limit: Optional[int] = None):
        self.dataset = dataset
        self.n = len(dataset) if limit is None else min(limit, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict:
        return {"text": self.dataset[i]["text"], "index": i}


def order_fingerprint(dataset) -> str:
    """md5 of the arrays that fix the sample order (GPTDataset indices, and BlendableDataset's choice)."""
    h = hashlib.md5()

    def add(ds):
        if hasattr(ds, "datasets"):  # BlendableDataset
            h.update(np.ascontiguousarray(ds.dataset_index).tobytes())
            h.update(np.ascontiguousarray(ds.dataset_sample_index).tobytes())
            for d in ds.datasets:
                add(d)
        else:
            for name in ("doc_idx", "sample_idx", "shuffle_idx"):
                h.update(np.ascontiguousarray(getattr(ds, name)).tobytes())

    add(dataset)
    return h.hexdigest()


def data_settings(prefixes, data_args, args, objective: str, train_ds) -> Dict:
    return {
        "input": [[w, p] for w, p in prefixes],
        "split": data_args.split,
        "max_seq_length": data_args.max_seq_length,
        "seed": args.seed,
        "objective": objective,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.dataset_world_size,
        "sample_order_md5": order_fingerprint(train_ds),
    }


def check_resume(output_dir: str, checkpoint: str, settings: Dict) -> None:
    """Refuse a resume whose data settings would change the sample order, naming the setting."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        log.warning(f"{path} is missing: can't check that {checkpoint} was trained on the same data order")
        return
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    for key, value in settings.items():
        if key in saved and saved[key] != value:
            if key == "sample_order_md5":
                raise UserError(f"can't resume from {checkpoint}: the sample order changed (max_steps, batch size or the data files "
                                f"changed how many passes over the data are drawn); use a new output_dir or --overwrite_output_dir")
            raise UserError(f"can't resume from {checkpoint}: {key} changed from {json.dumps(saved[key])} to {json.dumps(value)}, "
                            f"which changes the sample order; use the old value, a new output_dir or --overwrite_output_dir")


class PretrainCollator:
    """[B, S + 1] samples -> the family's pretraining inputs (paddle tensors)."""

    def __init__(self, family, tokenizer, objective: str, seed: int):
        self.family, self.tokenizer, self.objective, self.seed = family, tokenizer, objective, seed

    def __call__(self, samples):
        import paddle

        tokens = np.stack([np.asarray(s["text"], dtype="int64") for s in samples])
        # One generator per sample, keyed by (seed, sample index): the same draw in every run, on any rank.
        rngs = [np.random.default_rng([self.seed, int(s["index"])]) for s in samples]
        inputs = self.family.pretrain_inputs(self.tokenizer, tokens, self.objective, rngs)
        batch = {k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in inputs.items()}
        batch["real_tokens"] = int(tokens[:, :-1].size)  # popped before the model sees it
        return batch


# --------------------------------------------------------------------------- training
def build_model(family, model_args, training_args, tokenizer, gpu: bool):
    """A fresh seeded model from the config (continue_training false), or the model's weights (true).

    Under tensor parallel each process builds its shard, as fine-tuning does (tuning.tensor_parallel_overrides).
    From scratch, every process draws its own shards' random values, so the model is not the one a single
    process would draw with the same seed; continued training starts from the same weights as one process."""
    from ..tuning import tensor_parallel_overrides

    path = model_args.model_name_or_path
    overrides = {}
    if gpu:  # PaddleNLP's GPU switches, passed to the config as its run_pretrain.py does
        overrides.update({k: True for k in GPU_ONLY if getattr(model_args, k)})
    if model_args.continue_training:
        overrides.update(tensor_parallel_overrides(family, path, training_args))
        return family.load_model(path, dtype=model_args.dtype, **overrides)
    config_path = model_args.config_name or path
    multiple = model_args.pad_vocab_to_multiple_of
    sizes = {}
    if multiple > 1:
        config = family.paddlenlp_class("config_class").from_pretrained(config_path)
        vocab = max(int(config.vocab_size), len(tokenizer))
        overrides["vocab_size"] = -(-vocab // multiple) * multiple
        sizes["vocab_size"] = (overrides["vocab_size"], f"--pad_vocab_to_multiple_of {multiple} gives")
    overrides.update(tensor_parallel_overrides(family, config_path, training_args, sizes))
    return family.new_model(config_path, dtype=model_args.dtype, **overrides)


def make_trainer_class():
    """PretrainTrainer, defined on first use (trainer.py imports paddle)."""
    from paddlenlp.utils.batch_sampler import DistributedBatchSampler

    from ..trainer import SFTTrainer

    class PretrainTrainer(SFTTrainer):
        """SFTTrainer (token-weighted loss, checkpoint markers, tokens/s) reading samples in their stored order."""

        def _get_train_sampler(self):
            # paddlenlp's sampler without shuffling: the order is the dataset's shuffle index, and on resume
            # the Trainer sets consumed_samples on it, so it starts at the next unseen sample (no replay).
            return DistributedBatchSampler(self.train_dataset, batch_size=self.args.per_device_train_batch_size, shuffle=False,
                                           num_replicas=self.args.dataset_world_size, rank=self.args.dataset_rank,
                                           drop_last=self.args.dataloader_drop_last)

        def token_budget(self) -> float:
            return float(self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.data_args.max_seq_length)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
            """Loss and perplexity over the whole fixed validation set, in every process."""
            start = time.time()
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in self._loss_metrics(eval_dataset or self.eval_dataset).items()}
            metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return PretrainTrainer


def make_scheduler(args, extra):
    """PaddleNLP's pretraining schedule: linear warm-up, then cosine (or linear) decay to min_learning_rate."""
    from paddlenlp.transformers import CosineAnnealingWithWarmupDecay, LinearAnnealingWithWarmupDecay

    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if kind not in ("cosine", "linear"):
        raise UserError(f"--lr_scheduler_type {kind}: pretraining uses cosine or linear (warm-up then decay to min_learning_rate)")
    warmup = args.warmup_steps if args.warmup_steps > 0 else int(args.warmup_ratio * args.max_steps)
    cls = CosineAnnealingWithWarmupDecay if kind == "cosine" else LinearAnnealingWithWarmupDecay
    return cls(max_lr=args.learning_rate, min_lr=extra.min_learning_rate, warmup_step=warmup,
               decay_step=extra.decay_steps or args.max_steps, last_epoch=0)


def run(argv=None) -> int:
    model_args, data_args, extra, training = parse(argv)
    output_dir = training["output_dir"]
    from ..checkpoints import training_output

    with training_output(output_dir):
        from ..families import detect_family
        from ..pretrain_data import resolve_input_dir

        prefixes = resolve_input_dir(data_args.input_dir)
        family = detect_family(model_args.family, (model_args.model_name_or_path,), model_args.model_name_or_path)
        objective = model_args.objective or family.pretrain_objectives[0]
        if objective not in family.pretrain_objectives:
            raise UserError(f"--objective {objective}: the {family.name} family pretrains with {' or '.join(family.pretrain_objectives)}")
        from ..runtime import setup_runtime

        setup_runtime()
        gpu = check_device(model_args, extra, training, family)
        make_dir(output_dir, "output_dir")
        import paddle

        with paddle.utils.unique_name.guard():
            return _train(family, objective, prefixes, model_args, data_args, extra, training, gpu)


def _train(family, objective, prefixes, model_args, data_args, extra, training, gpu) -> int:
    from paddlenlp.trainer import TrainingArguments, set_seed
    from paddlenlp.trainer.trainer_callback import ProgressCallback

    from ..checkpoints import resume_point
    from ..files import write_json
    from ..pretrain_data import check_tokenizer, open_prefix, tokenizer_identity
    from ..trainer import TokensProgressCallback

    try:
        args = TrainingArguments(**training)
    except (ValueError, TypeError) as e:
        raise UserError(f"training arguments: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO if args.local_rank in (-1, 0) else logging.WARNING)
    tok_path = model_args.tokenizer_name_or_path or model_args.model_name_or_path
    try:
        tokenizer = family.load_tokenizer(tok_path)
    except Exception as e:  # a wrong path or name: one line, not paddlenlp's traceback
        which = "tokenizer_name_or_path" if model_args.tokenizer_name_or_path else "model_name_or_path"
        raise UserError(f"{which} {tok_path!r}: can't load its tokenizer ({type(e).__name__})") from None
    identity = tokenizer_identity(family, tokenizer, tok_path)
    for _, prefix in prefixes:
        check_tokenizer(prefix, identity, open_prefix(prefix))
    check_splits(prefixes, data_args.split, [True, args.do_eval, args.do_predict])
    train_ds, valid_ds, test_ds = build_datasets(prefixes, data_args, args, args.output_dir)

    settings = data_settings(prefixes, data_args, args, objective, train_ds)
    last = None
    if os.path.isdir(args.output_dir) and not args.overwrite_output_dir:
        last = resume_point(args.output_dir, remove_incomplete=args.should_save)
        if last:
            check_resume(args.output_dir, last, settings)
            log.info(f"resuming from {last} (pass --overwrite_output_dir to start over)")
    if args.should_save:
        write_json(os.path.join(args.output_dir, SETTINGS_FILE), settings)

    set_seed(args.seed)  # before the model is built: a fresh model's weights come from this seed
    model = build_model(family, model_args, args, tokenizer, gpu)
    from ..cpu_kernels import apply as apply_cpu_kernels

    model = apply_cpu_kernels(family, model)  # cheaper CPU formulations of the same maths (not on GPUs)
    params = sum(int(p.numel()) for p in model.parameters())
    log.info(f"pretraining {family.name} ({params:,} parameters, {'continued' if model_args.continue_training else 'from scratch'}, "
             f"objective {objective}) on {len(train_ds)} samples of {data_args.max_seq_length} tokens")
    if not args.do_eval:
        args.evaluation_strategy = args.evaluation_strategy.__class__("no")
    Trainer = make_trainer_class()
    trainer = Trainer(model=model, args=args, train_dataset=Samples(train_ds),
                      eval_dataset=Samples(valid_ds, data_args.eval_samples) if args.do_eval else None,
                      tokenizer=tokenizer, data_collator=PretrainCollator(family, tokenizer, objective, args.seed),
                      optimizers=(None, make_scheduler(args, extra)), family=family, data_args=data_args)
    if not args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TokensProgressCallback())
    result = trainer.train(resume_from_checkpoint=last)
    save_outputs(trainer, tokenizer, family, objective, model_args, data_args, extra, args)
    metrics = dict(result.metrics)
    if trainer.total[1]:  # token-weighted mean over the whole run (PaddleNLP's is a mean of batch means)
        metrics["train_loss"] = trainer.total[0] / trainer.total[1]
    runtime = metrics.get("train_runtime") or 0
    metrics["train_tokens_per_second"] = round(trainer.real_tokens * max(args.dataset_world_size, 1) / runtime, 1) if runtime else 0.0  # TP ranks share tokens
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if args.do_eval:
        trainer.save_metrics("eval", trainer.evaluate())
    if args.do_predict:
        trainer.save_metrics("test", trainer.evaluate(Samples(test_ds, data_args.eval_samples), metric_key_prefix="test"))
    if args.should_save:  # the loss curve, for users and for tests
        write_json(os.path.join(args.output_dir, "log_history.json"), trainer.history)
    return 0


def save_outputs(trainer, tokenizer, family, objective, model_args, data_args, extra, args) -> None:
    """The output folder is a model folder: weights, config, tokenizer, paddlellm_meta.json, resolved arguments."""
    from ..families import META_FILE
    from ..files import write_json

    out = args.output_dir
    trainer.save_final_model(out, "full")  # model.safetensors, like every other command's output
    if not args.should_save:
        return
    from ..formats.hf import save_tokenizer

    chosen = save_tokenizer(tokenizer, out)  # with its chat template and stop tokens
    base = model_args.model_name_or_path
    write_json(os.path.join(out, META_FILE), {
        "family": family.name,
        "kind": "full",
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "dtype": model_args.dtype,
        "chat_format": family.name,
        "chat_template": chosen,
        "pretrain": {"objective": objective, "max_seq_length": data_args.max_seq_length,
                     "continue_training": model_args.continue_training, "steps": trainer.state.global_step},
    })
    write_json(os.path.join(out, "pretrain_args.json"), dump_args(model_args, data_args, extra, args.to_dict()))


def main(argv=None) -> int:
    return run(argv)
