"""Fine-tuning (SFT, LoRA, Prefix Tuning) of a causal language model on src/tgt data.

    python finetune_generation.py llm/llama/lora_argument.json [--key value ...]
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .arguments import UserError, check_can_create, dump_args, fail, make_dir, parse_args, require_at_least

log = logging.getLogger("paddlellm")


@dataclass
class ModelArgument:
    model_name_or_path: str = field(default=None, metadata={"help": "Base model: a folder (e.g. from `paddlellm tiny`) or a PaddleNLP model name."})
    family: Optional[str] = field(default=None, metadata={"help": "Model family when it can't be read from the model folder: llama chatglm chatglm_v2 bloom gpt-3 opt glm."})
    dtype: str = field(default="float32", metadata={"help": "Weight dtype: float32, float16 or bfloat16 (use with --fp16/--bf16 on GPUs)."})
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_path: Optional[str] = field(default=None, metadata={"help": "Start from these LoRA adapters (a folder saved by a LoRA run)."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: Optional[int] = field(default=None, metadata={"help": "LoRA alpha (default: 2 * lora_rank)."})
    lora_target_modules: Optional[List[str]] = field(default=None, metadata={"help": "Regexes of the layers to adapt (default: every Linear layer)."})
    prefix_tuning: bool = field(default=False, metadata={"help": "Train prefix tuning (virtual key/value tokens) instead of all weights."})
    prefix_path: Optional[str] = field(default=None, metadata={"help": "Start from this prefix (a folder saved by a prefix tuning run)."})
    num_prefix_tokens: int = field(default=128, metadata={"help": "Number of prefix tokens."})
    prefix_projection: bool = field(default=False, metadata={"help": "Reparametrise the prefix through an MLP."})


@dataclass
class DataArgument:
    dataset_name_or_path: str = field(default=None, metadata={"help": "Folder with train.json and dev.json (JSONL of src/tgt), or train/ and dev/ folders of *.json."})
    task_name: Optional[str] = field(default=None, metadata={"help": "Name of the task, recorded with the results."})
    src_length: int = field(default=1024, metadata={"help": "Maximum tokens of the context (earlier turns + final prompt); oldest turns are dropped first."})
    tgt_length: int = field(default=1024, metadata={"help": "Maximum tokens of the final reply (including its end token); also the generation length in evaluation."})
    eval_with_do_generation: bool = field(default=False, metadata={"help": "Evaluate by generating replies (BLEU-4, ROUGE-1/2/L) instead of loss/ppl/accuracy."})
    save_generation_output: bool = field(default=False, metadata={"help": "With eval_with_do_generation, write generated_output.json to output_dir."})
    intokens: bool = field(default=False, metadata={"help": "Pack several examples into one sequence of up to intokens_max_length tokens."})
    intokens_max_length: int = field(default=2048, metadata={"help": "Token slots of one packed sequence."})


@dataclass
class GenerateArgument:
    top_k: int = field(default=1, metadata={"help": "Top-k sampling in generation evaluation (1 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p (nucleus) sampling in generation evaluation."})


TRAINING_DEFAULTS = dict(
    # Defaults that differ from PaddleNLP's because they are what fine-tuning users expect.
    do_train=True,
    save_strategy="epoch",
    evaluation_strategy="epoch",
    logging_steps=10,
    save_total_limit=1,
    report_to=["none"],
)


def parse(argv=None):
    model_args, data_args, gen_args, training = parse_args(
        [ModelArgument, DataArgument, GenerateArgument], argv, prog="finetune_generation.py",
        description="Fine-tune (SFT, LoRA, Prefix Tuning) a causal LM on src/tgt JSONL data.", training=True)
    if not model_args.model_name_or_path:
        fail("model_name_or_path is required (a model folder or a PaddleNLP model name)")
    if not data_args.dataset_name_or_path:
        fail("dataset_name_or_path is required (a folder with train.json and dev.json)")
    if not training.get("output_dir"):
        fail("output_dir is required: the folder for checkpoints and results")
    if (model_args.lora or model_args.lora_path) and (model_args.prefix_tuning or model_args.prefix_path):
        fail("choose one of LoRA (--lora / --lora_path) and prefix tuning (--prefix_tuning / --prefix_path)")
    try:
        check_ranges(model_args, data_args, gen_args, training)
    except UserError as e:
        fail(str(e))
    for k, v in TRAINING_DEFAULTS.items():
        training.setdefault(k, v)
    # PaddleNLP turns do_eval=True with evaluation_strategy "no" into step-wise evaluation; keep "no" meaning no.
    training.setdefault("do_eval", training["evaluation_strategy"] != "no")
    return model_args, data_args, gen_args, training


def check_ranges(model_args, data_args, gen_args, training: Dict) -> None:
    """Refuse values that can't work before anything loads (paddle would fail later with a traceback)."""
    from .loading import check_adapter_folders

    m, d = model_args, data_args
    require_at_least({
        "src_length": d.src_length, "tgt_length": d.tgt_length,
        "intokens_max_length": d.intokens_max_length if d.intokens else None,
        "lora_rank": m.lora_rank if m.lora and not m.lora_path else None,
        "num_prefix_tokens": m.num_prefix_tokens if m.prefix_tuning and not m.prefix_path else None,
        **{k: training.get(k) for k in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")},
    })
    pp = int(training.get("pipeline_parallel_degree") or 1)
    if pp > 1:
        # PaddleNLP's pipeline parallel needs each family's *Pipe model class (only some have one) and its
        # own batch layout; fine-tuning here uses the standard classes, so refuse instead of failing on GPUs.
        raise UserError(f"--pipeline_parallel_degree {pp}: pipeline parallel is not supported; "
                        "use tensor_parallel_degree (GPUs) and/or data parallel instead")
    if (training.get("learning_rate") or 0) < 0:
        raise UserError(f"--learning_rate must not be negative, got {training['learning_rate']}")
    if training.get("output_dir"):
        check_can_create(training["output_dir"], "output_dir")
    if gen_args.top_k < 0 or not 0.0 < gen_args.top_p <= 1.0:
        raise UserError(f"generation settings out of range: need top_k >= 0 and 0 < top_p <= 1, got top_k={gen_args.top_k} top_p={gen_args.top_p}")
    check_adapter_folders(m.lora_path, m.prefix_path)


def resolve_family(model_args):
    from .families import detect_family

    m = model_args
    return detect_family(m.family, (m.lora_path, m.prefix_path, m.model_name_or_path), m.model_name_or_path)


def check_device(training: Dict) -> None:
    """Refuse what this device can't do, with one clear line (before anything is written)."""
    import paddle

    gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    for key in ("tensor_parallel_degree", "sharding_parallel_degree"):
        if int(training.get(key, 1) or 1) > 1 and not gpu:
            raise UserError(f"--{key} {training[key]}: tensor and sharding parallelism need GPUs (paddlepaddle-gpu); on CPU use data parallel: python -m paddle.distributed.launch --nproc_per_node N ...")
    if (training.get("fp16") or training.get("bf16")) and not gpu:
        raise UserError("--fp16/--bf16 mixed precision needs a GPU here; drop the flag to train in float32 on CPU")


def all_linear_targets(model) -> List[str]:
    """Regexes naming every nn.Linear layer of the model, by its last name component (e.g. '.*q_proj')."""
    import paddle.nn as nn

    suffixes = []
    for name, layer in model.named_sublayers():
        if isinstance(layer, nn.Linear) or type(layer).__name__ in ("ColumnParallelLinear", "RowParallelLinear"):
            last = name.split(".")[-1]
            if last not in ("lm_head",) and last not in suffixes:
                suffixes.append(last)
    return [f".*{s}$" for s in suffixes]


def build_model(family, model_args, training_args, tokenizer):
    """Load the base model and wrap it for LoRA or Prefix Tuning as asked. Returns (model, kind)."""
    tp = max(training_args.tensor_parallel_degree, 1)
    extra = {}
    if tp > 1:
        extra = dict(tensor_parallel_degree=tp, tensor_parallel_rank=training_args.tensor_parallel_rank)
    model = family.load_model(model_args.model_name_or_path, dtype=model_args.dtype, **extra)
    from .cpu_kernels import apply as apply_cpu_kernels
    model = apply_cpu_kernels(family, model)  # cheaper CPU formulations of the same maths (not on GPUs)
    kind = "full"
    if model_args.lora or model_args.lora_path:
        from paddlenlp.peft import LoRAConfig, LoRAModel

        kind = "lora"
        if model_args.lora_path:
            model = LoRAModel.from_pretrained(model, model_args.lora_path)
            model.mark_only_lora_as_trainable()
        else:
            targets = model_args.lora_target_modules or family.lora_target_modules or all_linear_targets(model)
            cfg = LoRAConfig(
                target_modules=targets, r=model_args.lora_rank, lora_alpha=model_args.lora_alpha or 2 * model_args.lora_rank,
                merge_weights=False, tensor_parallel_degree=tp, dtype=model_args.dtype,
                base_model_name_or_path=os.path.abspath(model_args.model_name_or_path) if os.path.isdir(model_args.model_name_or_path) else model_args.model_name_or_path,
            )
            model = LoRAModel(model, cfg)
            model.mark_only_lora_as_trainable()
    elif model_args.prefix_tuning or model_args.prefix_path:
        from paddlenlp.peft import PrefixConfig, PrefixModelForCausalLM

        kind = "prefix"
        try:
            postprocess, pad_mask = family.prefix_hooks()
        except NotImplementedError as e:
            raise UserError(f"--prefix_tuning: {e}") from None
        if model_args.prefix_path:
            model = PrefixModelForCausalLM.from_pretrained(model, model_args.prefix_path, postprocess, pad_mask)
        else:
            cfg = PrefixConfig(num_prefix_tokens=model_args.num_prefix_tokens, prefix_projection=model_args.prefix_projection,
                               tensor_parallel_degree=tp, dtype=model_args.dtype, **family.prefix_config_kwargs(model.config))
            model = PrefixModelForCausalLM(model, cfg, postprocess, pad_mask)
    trainable = sum(int(p.numel()) for p in model.parameters() if not p.stop_gradient)
    total = sum(int(p.numel()) for p in model.parameters())
    if kind == "lora" and not model_args.lora_path and trainable == 0:
        raise UserError(f"--lora_target_modules {' '.join(model_args.lora_target_modules or [])}: no layer of the model matches; "
                        f"its Linear layers are {', '.join(t[2:-1] for t in all_linear_targets(model))}")
    log.info(f"{kind} fine-tuning: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)")
    return model, kind


def write_json(path: str, obj) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def save_outputs(trainer, tokenizer, family, kind, model_args, data_args, gen_args, training_args) -> None:
    """Save the model (or only the adapters), tokenizer, resolved arguments and our metadata."""
    from .families import META_FILE

    out = training_args.output_dir
    trainer.save_model(out)
    if not training_args.should_save:
        return
    tokenizer.save_pretrained(out)
    base = model_args.model_name_or_path
    meta = {
        "family": family.name,
        "kind": kind,
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "src_length": data_args.src_length,
        "tgt_length": data_args.tgt_length,
        "dtype": model_args.dtype,
        "chat_format": family.name,
    }
    if kind == "lora":
        meta["lora_rank"] = model_args.lora_rank
    if kind == "prefix":
        meta["num_prefix_tokens"] = model_args.num_prefix_tokens
    write_json(os.path.join(out, META_FILE), meta)
    write_json(os.path.join(out, "finetune_args.json"), dump_args(model_args, data_args, gen_args, training_args.to_dict()))


def run(argv=None) -> int:
    model_args, data_args, gen_args, training = parse(argv)
    output_dir = training["output_dir"]
    existed = os.path.exists(output_dir)
    try:
        # Validate the data before anything heavy loads or anything is written.
        from .data import read_split

        train_records = read_split(data_args.dataset_name_or_path, "train")
        dev_records = read_split(data_args.dataset_name_or_path, "dev", required=False)
        family = resolve_family(model_args)
        from .runtime import setup_runtime

        setup_runtime()  # before paddle is imported
        check_device(training)
        make_dir(output_dir, "output_dir")
        import paddle

        # Fresh parameter and optimizer-state names in every run (not counters left by earlier runs in
        # this process), so a checkpoint's optimizer state matches the parameters when a run resumes.
        with paddle.utils.unique_name.guard():
            return _train(family, model_args, data_args, gen_args, training, train_records, dev_records)
    except UserError as e:
        _cleanup(output_dir, existed)
        fail(str(e))
    except KeyboardInterrupt:
        _cleanup(output_dir, existed)
        fail("interrupted", status=130)
    except BaseException:
        _cleanup(output_dir, existed)
        raise


def _cleanup(output_dir: str, existed: bool) -> None:
    """After a failure: keep the folder if it holds a complete checkpoint (hours of training are not thrown
    away; rerunning the same command resumes from it), else remove a folder this run created, so that a
    failed run leaves nothing half-written."""
    from .checkpoints import complete_checkpoints

    kept = complete_checkpoints(output_dir)
    if kept:
        print(f"paddlellm: kept {kept[-1]}; rerun the same command to resume from it", file=sys.stderr)
    elif not existed and os.path.isdir(output_dir):
        shutil.rmtree(output_dir, ignore_errors=True)


def _pack(family, data_args, train_examples, dev_examples, prefix: bool = False):
    """Pack train (and dev, for loss evaluation) examples into rows of intokens_max_length tokens."""
    from .data import pack_examples

    if not family.supports.get("intokens", False):
        raise UserError(f"--intokens: packing is not supported for the {family.name} family (see the README's support table)")
    if prefix and not family.supports.get("intokens_prefix", True):
        raise UserError(f"--intokens: prefix tuning of the {family.name} family can't be packed exactly (see llm/{family.name}/README.md); "
                        f"train the prefix with intokens off")
    train_rows, eff = pack_examples(train_examples, data_args.intokens_max_length)
    log.info(f"intokens: packed {len(train_examples)} train examples into {len(train_rows)} rows of "
             f"{data_args.intokens_max_length} tokens; packing efficiency {100 * eff:.1f}% (real tokens / token slots)")
    dev_rows = pack_examples(dev_examples, data_args.intokens_max_length)[0] if dev_examples else []
    return train_rows, dev_rows


def _train(family, model_args, data_args, gen_args, training, train_records, dev_records) -> int:
    from paddlenlp.trainer import TrainingArguments, set_seed

    from .checkpoints import resume_point

    from .data import encode_records
    from .trainer import build_trainer

    try:
        training_args = TrainingArguments(**training)
    except (ValueError, TypeError) as e:
        raise UserError(f"training arguments: {e}") from None
    set_seed(training_args.seed)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO if training_args.local_rank in (-1, 0) else logging.WARNING)
    try:
        tokenizer = family.load_tokenizer(model_args.model_name_or_path)
    except Exception as e:  # a wrong path or name: one line, not paddlenlp's traceback
        raise UserError(f"model_name_or_path {model_args.model_name_or_path!r}: can't load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    train_examples, train_stats = encode_records(family, tokenizer, train_records, data_args.src_length, data_args.tgt_length, "train")
    dev_examples, dev_stats = (encode_records(family, tokenizer, dev_records, data_args.src_length, data_args.tgt_length, "dev")
                               if dev_records else ([], None))
    if data_args.intokens:
        train_examples, dev_examples = _pack(family, data_args, train_examples, dev_examples,
                                             prefix=bool(model_args.prefix_tuning or model_args.prefix_path))
    model, kind = build_model(family, model_args, training_args, tokenizer)

    last = None
    if os.path.isdir(training_args.output_dir) and not training_args.overwrite_output_dir:
        last = resume_point(training_args.output_dir, remove_incomplete=training_args.should_save)
        if last:
            log.info(f"resuming from {last} (pass --overwrite_output_dir to start over)")
    if not dev_examples:
        training_args.evaluation_strategy = training_args.evaluation_strategy.__class__("no")
        training_args.do_eval = False
    trainer = build_trainer(model, tokenizer, family, training_args, train_examples, dev_examples, dev_records, data_args, gen_args)
    train_result = trainer.train(resume_from_checkpoint=last)
    save_outputs(trainer, tokenizer, family, kind, model_args, data_args, gen_args, training_args)
    if training_args.should_save:  # the loss curve, for users and for tests
        write_json(os.path.join(training_args.output_dir, "log_history.json"), trainer.history)
    metrics = dict(train_result.metrics)
    if trainer.total[1]:  # token-weighted mean over the whole run (PaddleNLP's is a mean of batch means)
        metrics["train_loss"] = trainer.total[0] / trainer.total[1]
    metrics.update({f"train_{k}": v for k, v in train_stats.items()})
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if dev_examples:  # the final evaluation always runs when there is dev data
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    return 0


def main(argv=None) -> int:
    return run(argv)
