"""Fine-tuning (SFT, LoRA, Prefix Tuning) of a causal language model on src/tgt data.

    python finetune_generation.py llm/llama/lora_argument.json [--key value ...]
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

from ..arguments import UserError, check_can_create, check_sampling, dump_args, fail, make_dir, parse_args, require_at_least
from ..chat_template import check_choice as check_chat_template
from ..files import write_json
from ..formats.hf import save_tokenizer
from ..finetune_args import DataArgument, GenerateArgument, ModelArgument
from ..runtime import check_training_device

log = logging.getLogger("paddlellm")


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
    """(model_args, data_args, gen_args, training kwargs) of a fine-tuning command line."""
    return parse_with_mode(argv)[:4]


def parse_with_mode(argv=None):
    """parse() plus the run's mode: "train" (train, then evaluate when there is dev data: also when neither
    do_train nor do_eval is given), "train_only" (do_eval false) or "eval_only" (do_train false)."""
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
    # PaddleNLP's TrainingArguments give do_train/do_eval defaults, so "not given" is told apart here,
    # where the dict holds only what the JSON file and the command line set.
    do_train, do_eval = training.get("do_train"), training.get("do_eval")
    if do_train is False and do_eval is False:
        fail("--do_train false and --do_eval false: nothing to do; do_train false evaluates a model, do_eval false trains without evaluating")
    mode = "eval_only" if do_train is False else "train_only" if do_eval is False else "train"
    if mode != "eval_only" and model_args.model_name_or_path and os.path.isdir(model_args.model_name_or_path) \
            and os.path.realpath(model_args.model_name_or_path) == os.path.realpath(training["output_dir"]):
        fail(f"output_dir {training['output_dir']!r} is the model being fine-tuned (model_name_or_path); "
             "write to another folder (saving would replace the weights training starts from)")
    if mode == "train_only":
        # no evaluation at all: also none during training, and so no best model to load at the end
        training["evaluation_strategy"] = "no"
        training["load_best_model_at_end"] = False
    for k, v in TRAINING_DEFAULTS.items():
        training.setdefault(k, v)
    # PaddleNLP turns do_eval=True with evaluation_strategy "no" into step-wise evaluation; keep "no" meaning no.
    training.setdefault("do_eval", training["evaluation_strategy"] != "no")
    return model_args, data_args, gen_args, training, mode


def check_ranges(model_args, data_args, gen_args, training: Dict) -> None:
    """Refuse values that can't work before anything loads (paddle would fail later with a traceback)."""
    from ..loading import check_adapter_folders

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
    check_sampling(top_k=gen_args.top_k, top_p=gen_args.top_p)
    check_chat_template(m.chat_template)
    check_adapter_folders(m.lora_path, m.prefix_path)
    from ..formats.quantized import refuse_if_quantized
    from ..formats.static import refuse_if_static

    refuse_if_quantized(m.model_name_or_path)  # integer weights can't be trained further
    refuse_if_static(m.model_name_or_path)  # a program without trainable weights


def resolve_family(model_args):
    from ..loading import checked_family

    m = model_args
    return checked_family(m.family, m.model_name_or_path, m.lora_path, m.prefix_path)


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
    from ..cpu_kernels import apply as apply_cpu_kernels
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


def save_outputs(trainer, tokenizer, family, kind, model_args, data_args, gen_args, training_args) -> None:
    """Save the model (or only the adapters), tokenizer, resolved arguments and our metadata."""
    from ..families import META_FILE

    out = training_args.output_dir
    trainer.save_final_model(out, kind)  # a full model as model.safetensors, like every other command's output
    if not training_args.should_save:
        return
    chosen = save_tokenizer(tokenizer, out)  # with its chat template and stop tokens, so the output chats the same way
    base = model_args.model_name_or_path
    meta = {
        "family": family.name,
        "kind": kind,
        "base_model": os.path.abspath(base) if os.path.isdir(base) else base,
        "src_length": data_args.src_length,
        "tgt_length": data_args.tgt_length,
        "dtype": model_args.dtype,
        "chat_format": family.name,
        "chat_template": chosen,
    }
    if kind == "lora":
        meta["lora_rank"] = model_args.lora_rank
    if kind == "prefix":
        meta["num_prefix_tokens"] = model_args.num_prefix_tokens
    write_json(os.path.join(out, META_FILE), meta)
    write_json(os.path.join(out, "finetune_args.json"), dump_args(model_args, data_args, gen_args, training_args.to_dict()))


def run(argv=None) -> int:
    model_args, data_args, gen_args, training, mode = parse_with_mode(argv)
    output_dir = training["output_dir"]
    from ..checkpoints import training_output

    with training_output(output_dir):
        # Validate the data before anything heavy loads or anything is written.
        from ..data import read_split

        train_records = read_split(data_args.dataset_name_or_path, "train") if mode != "eval_only" else []
        dev_records = read_split(data_args.dataset_name_or_path, "dev", required=mode == "eval_only")
        family = resolve_family(model_args)
        from ..runtime import setup_runtime

        setup_runtime()  # before paddle is imported
        check_training_device(training, model_args.dtype)
        make_dir(output_dir, "output_dir")
        import paddle

        # Fresh parameter and optimizer-state names in every run (not counters left by earlier runs in
        # this process), so a checkpoint's optimizer state matches the parameters when a run resumes.
        with paddle.utils.unique_name.guard():
            if mode == "eval_only":
                return _evaluate_only(family, model_args, data_args, gen_args, training, dev_records)
            return _train(family, model_args, data_args, gen_args, training, train_records, dev_records, mode)


def _pack(family, data_args, train_examples, dev_examples, prefix: bool = False):
    """Pack train (and dev, for loss evaluation) examples into rows of intokens_max_length tokens."""
    from ..data import pack_examples

    if not family.supports.get("intokens", False):
        raise UserError(f"--intokens: packing is not supported for the {family.name} family (see the README's support table)")
    if prefix and not family.supports.get("intokens_prefix", True):
        raise UserError(f"--intokens: prefix tuning of the {family.name} family can't be packed exactly (see llm/{family.name}/README.md); "
                        f"train the prefix with intokens off")
    train_rows = []
    if train_examples:
        train_rows, eff = pack_examples(train_examples, data_args.intokens_max_length)
        log.info(f"intokens: packed {len(train_examples)} train examples into {len(train_rows)} rows of "
                 f"{data_args.intokens_max_length} tokens; packing efficiency {100 * eff:.1f}% (real tokens / token slots)")
    dev_rows = pack_examples(dev_examples, data_args.intokens_max_length)[0] if dev_examples else []
    return train_rows, dev_rows


def _setup(family, model_args, data_args, training, train_records, dev_records, tokenizer_from: Optional[str] = None):
    """TrainingArguments, logging, tokenizer and the encoded (and, with intokens, packed) examples."""
    from paddlenlp.trainer import TrainingArguments, set_seed

    from ..data import encode_records

    try:
        training_args = TrainingArguments(**training)
    except (ValueError, TypeError) as e:
        raise UserError(f"training arguments: {e}") from None
    set_seed(training_args.seed)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.setLevel(logging.INFO if training_args.local_rank in (-1, 0) else logging.WARNING)
    source = tokenizer_from or model_args.model_name_or_path
    try:
        tokenizer = family.load_tokenizer(source, chat_template=model_args.chat_template)
    except UserError:
        raise
    except Exception as e:  # a wrong path or name: one line, not paddlenlp's traceback
        raise UserError(f"model_name_or_path {source!r}: can't load its tokenizer ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    train_examples, train_stats = (encode_records(family, tokenizer, train_records, data_args.src_length, data_args.tgt_length, "train")
                                   if train_records else ([], {}))
    dev_examples, _ = (encode_records(family, tokenizer, dev_records, data_args.src_length, data_args.tgt_length, "dev")
                       if dev_records else ([], None))
    if data_args.intokens:
        train_examples, dev_examples = _pack(family, data_args, train_examples, dev_examples,
                                             prefix=bool(model_args.prefix_tuning or model_args.prefix_path))
    return training_args, tokenizer, train_examples, train_stats, dev_examples


def _train(family, model_args, data_args, gen_args, training, train_records, dev_records, mode: str = "train") -> int:
    from ..checkpoints import prepare_resume
    from ..trainer import build_trainer

    training_args, tokenizer, train_examples, train_stats, dev_examples = _setup(
        family, model_args, data_args, training, train_records, dev_records)
    kind = "lora" if (model_args.lora or model_args.lora_path) else "prefix" if (model_args.prefix_tuning or model_args.prefix_path) else "full"
    # Decide where to resume before the model loads: a broken checkpoint is one line without that wait.
    last, unusable = prepare_resume(training_args, kind)
    model, kind = build_model(family, model_args, training_args, tokenizer)

    if mode == "train_only":
        log.info("do_eval false: no evaluation (during training or at the end)")
        dev_examples, dev_records = [], []
    elif not dev_examples:
        off = "evaluation and load_best_model_at_end are" if training_args.load_best_model_at_end else "evaluation is"
        log.info(f"no dev data (dev.json or dev/) in {data_args.dataset_name_or_path}: {off} switched off")
        training_args.evaluation_strategy = training_args.evaluation_strategy.__class__("no")
        training_args.do_eval = False
        training_args.load_best_model_at_end = False
    trainer = build_trainer(model, tokenizer, family, training_args, train_examples, dev_examples, dev_records, data_args, gen_args)
    trainer.unusable_checkpoints = unusable
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
    if dev_examples:  # the final evaluation runs whenever there is dev data (unless do_eval is false)
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    return 0


def _evaluate_only(family, model_args, data_args, gen_args, training, dev_records) -> int:
    """do_train false: evaluate the model (with its adapters) on the dev set; write only the results.

    Nothing is trained and no weights or checkpoints are written: output_dir receives eval_results.json
    (and generated_output.json with save_generation_output), whatever else it holds stays as it is.
    """
    from ..loading import load_for_inference, resolve_model
    from ..trainer import build_trainer

    m = model_args
    base, lora_path, prefix_path, _, _ = resolve_model(m.model_name_or_path, m.lora_path, m.prefix_path, family.name)
    adapter = lora_path or prefix_path
    tokenizer_from = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else base
    training_args, tokenizer, _, _, dev_examples = _setup(family, model_args, data_args, training, [], dev_records, tokenizer_from)
    what = f"{base}" + (f" with the LoRA adapters in {lora_path}" if lora_path else f" with the prefix in {prefix_path}" if prefix_path else "")
    log.info(f"evaluation-only run (do_train false): evaluating {what} on the dev set of {data_args.dataset_name_or_path}; "
             f"nothing is trained or saved except the results in {training_args.output_dir}")
    model, tokenizer, family, _ = load_for_inference(base, lora_path, prefix_path, dtype=m.dtype, family=family,
                                                     chat_template=m.chat_template)
    trainer = build_trainer(model, tokenizer, family, training_args, [], dev_examples, dev_records, data_args, gen_args)
    trainer.guard_run = False  # no training to protect: a failing evaluation is the command's failure
    metrics = trainer.evaluate()
    metrics["eval_model"] = os.path.abspath(base) if os.path.isdir(base) else base
    if adapter:
        metrics["eval_adapter"] = os.path.abspath(adapter)
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    return 0


def main(argv=None) -> int:
    return run(argv)
