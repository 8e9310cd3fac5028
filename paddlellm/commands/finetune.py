"""Fine-tuning (SFT, LoRA, Prefix Tuning) of a causal language model on src/tgt data.

    python finetune_generation.py llm/llama/lora_argument.json [--key value ...]
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from ..arguments import UserError, fail, make_dir, parse_args
from ..files import write_json
from ..finetune_args import TRAINING_DEFAULTS, DataArgument, GenerateArgument, ModelArgument, QuantArgument
from ..tuning import build_model, check_ranges, resolve_family, save_outputs, training_setup
from ..runtime import check_training_device

log = logging.getLogger("paddlellm")


def parse(argv=None):
    """(model_args, data_args, gen_args, training kwargs) of a fine-tuning command line."""
    return parse_with_mode(argv)[:4]


def parse_with_mode(argv=None):
    """parse() plus the run's mode: "train" (train, then evaluate when there is dev data: also when neither
    do_train nor do_eval is given), "train_only" (do_eval false) or "eval_only" (do_train false)."""
    model_args, data_args, gen_args, training = parse_args(
        [ModelArgument, DataArgument, GenerateArgument], argv, prog="finetune_generation.py",
        description="Fine-tune (SFT, LoRA, Prefix Tuning) a causal LM on src/tgt JSONL data.", training=True,
        help_only=[("QuantArgument (used with do_ptq / do_gptq, see `paddlellm quant --help`)", QuantArgument)])
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
        check_training_device(training, model_args.dtype, family)
        if int(training.get("pipeline_parallel_degree") or 1) > 1:
            from ..cpu_parallel import pipeline_config

            training["pipeline_parallel_config"] = pipeline_config(training.get("pipeline_parallel_config", ""))
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
    from ..data import encode_records

    training_args, tokenizer = training_setup(training, family, tokenizer_from or model_args.model_name_or_path,
                                              model_args.chat_template)
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
    elif max(training_args.pipeline_parallel_degree, 1) > 1 and dev_examples:
        # evaluation here runs the whole model's forward in one process; a pipeline stage holds part of it
        log.info("pipeline parallel: evaluation is off; evaluate the saved model with --do_train false (no launcher)")
        dev_examples, dev_records = [], []
        training_args.evaluation_strategy = training_args.evaluation_strategy.__class__("no")
        training_args.do_eval = False
        training_args.load_best_model_at_end = False
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
