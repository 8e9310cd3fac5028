"""Preference alignment (DPO and its variants) on paddlenlp's DPOTrainer, from preference JSONL data.

    python run_dpo.py llm/llama/dpo_argument.json [--key value ...]
    paddlellm dpo llm/llama/dpo_argument.json [--key value ...]

The model arguments, LoRA setup, device checks, output folder (weights, tokenizer, paddlellm_meta.json,
finetune_args.json), resuming and checkpoint rotation are fine-tuning's (paddlellm.tuning); the DPO
arguments carry the names of PaddleNLP's DPOConfig (llm/alignment/dpo). Full DPO keeps a frozen copy of
the starting model as the reference; LoRA DPO uses the same model with its adapters switched off.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from ..arguments import UserError, fail, make_dir, parse_args
from ..files import write_json
from ..finetune_args import TRAINING_DEFAULTS, GenerateArgument, ModelArgument
from ..runtime import check_training_device
from ..tuning import build_model, check_ranges, resolve_family, save_outputs, training_setup

log = logging.getLogger("paddlellm")

# paddlenlp.trl.DPOTrainer's loss types, plus PaddleNLP's "orpo" (= "or" + the SFT loss, reference-free).
LOSS_TYPES = ["sigmoid", "hinge", "ipo", "kto_pair", "sppo_hard", "nca_pair", "dpop", "or", "simpo", "orpo"]
NEED_REFERENCE = ("kto_pair", "sppo_hard", "nca_pair", "dpop")  # DPOTrainer refuses them reference-free
NO_REFERENCE = ("or", "simpo")  # DPOTrainer refuses a reference model for them


@dataclass
class PreferenceDataArgument:
    dataset_name_or_path: str = field(default=None, metadata={"help": "Folder with train.json and dev.json (preference JSONL: src, tgt, response, sort), or train/ and dev/ folders of *.json."})
    task_name: Optional[str] = field(default=None, metadata={"help": "Name of the task, recorded with the results."})
    src_length: int = field(default=1024, metadata={"help": "Maximum tokens of the context (earlier turns + final prompt); oldest turns are dropped first."})
    tgt_length: int = field(default=1024, metadata={"help": "Maximum tokens of each candidate reply (including its end token)."})
    intokens: bool = field(default=False, metadata={"help": "Pack several pairs into one sequence of up to intokens_max_length tokens (exact: pairs never see each other)."})
    intokens_max_length: int = field(default=2048, metadata={"help": "Token slots of one packed sequence."})


@dataclass
class DPOArgument:
    """PaddleNLP's DPOConfig (llm/alignment/dpo/dpo_argument.py), read by paddlenlp.trl.DPOTrainer / DPOCriterion."""

    beta: float = field(default=0.1, metadata={"help": "DPO beta: how far the policy may move from the reference (reward = beta * log-ratio)."})
    loss_type: str = field(default="sigmoid", metadata={"help": "Preference loss: sigmoid (DPO), hinge, ipo, kto_pair, sppo_hard, nca_pair, dpop, or, simpo, orpo (= or + SFT loss).", "choices": LOSS_TYPES})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative DPO: assumed probability that a pair's label is flipped (sigmoid and simpo), in [0, 0.5)."})
    reference_free: bool = field(default=False, metadata={"help": "No reference model (its log-probabilities count as 0); implied by or/simpo/orpo."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin gamma."})
    dpop_lambda: float = field(default=50.0, metadata={"help": "DPOP penalty weight on the chosen reply's log-probability falling below the reference's."})
    pref_loss_ratio: float = field(default=1.0, metadata={"help": "Weight of the preference loss."})
    sft_loss_ratio: float = field(default=0.0, metadata={"help": "Weight of an added SFT loss on the chosen replies."})
    ref_model_update_steps: int = field(default=-1, metadata={"help": "Copy the policy into the reference every N steps (full DPO only; -1 never)."})
    lora: bool = field(default=False, init=False)  # set from --lora: DPOTrainer then switches the adapters off for the reference


def parse(argv=None):
    """(model_args, data_args, dpo_args, training kwargs) of a DPO command line, checked."""
    model_args, data_args, dpo, training = parse_args(
        [ModelArgument, PreferenceDataArgument, DPOArgument], argv, prog="run_dpo.py",
        description="Align a causal LM on preference pairs with DPO (paddlenlp's DPOTrainer): full or LoRA.", training=True)
    m = model_args
    if not m.model_name_or_path:
        fail("model_name_or_path is required (a model folder, e.g. a fine-tuned output folder, or a PaddleNLP model name)")
    if not data_args.dataset_name_or_path:
        fail("dataset_name_or_path is required (a folder with train.json and dev.json of preference pairs)")
    if not training.get("output_dir"):
        fail("output_dir is required: the folder for checkpoints and results")
    try:
        check_dpo(model_args, data_args, dpo, training)
        check_ranges(model_args, data_args, GenerateArgument(), training)
    except UserError as e:
        fail(str(e))
    if training.get("do_train") is False:
        fail("--do_train false: the DPO command trains; leave do_train at true (do_eval false trains without evaluating)")
    if os.path.isdir(m.model_name_or_path) and os.path.realpath(m.model_name_or_path) == os.path.realpath(training["output_dir"]):
        fail(f"output_dir {training['output_dir']!r} is the model being aligned (model_name_or_path); write to another folder")
    if training.get("do_eval") is False:
        training["evaluation_strategy"] = "no"
        training["load_best_model_at_end"] = False
    for k, v in TRAINING_DEFAULTS.items():
        training.setdefault(k, v)
    training.setdefault("do_eval", training["evaluation_strategy"] != "no")
    dpo.lora = bool(m.lora or m.lora_path)
    return model_args, data_args, dpo, training


def check_dpo(model_args, data_args, dpo: DPOArgument, training: Dict) -> None:
    """Refuse DPO settings paddlenlp's DPOTrainer would refuse with a traceback (or silently misuse); resolve orpo."""
    m = model_args
    if m.prefix_tuning or m.prefix_path:
        raise UserError("--prefix_tuning / --prefix_path: DPO trains the full model or LoRA adapters (the reference is the "
                        "model with its adapters off, which paddlenlp does only for LoRA); use --lora or neither")
    if not dpo.beta > 0:
        raise UserError(f"--beta must be > 0, got {dpo.beta}")
    if not 0 <= dpo.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing must be in [0, 0.5), got {dpo.label_smoothing}")
    if dpo.loss_type == "orpo":  # as PaddleNLP's run_dpo.py: ORPO = SFT loss + the odds-ratio loss, no reference
        dpo.loss_type, dpo.reference_free, dpo.sft_loss_ratio = "or", True, 1.0
        log.info("loss_type orpo: the 'or' loss plus the SFT loss (sft_loss_ratio 1), reference-free")
    if dpo.loss_type in NO_REFERENCE and not dpo.reference_free:
        dpo.reference_free = True
        log.info(f"loss_type {dpo.loss_type} uses no reference model: reference_free set to true")
    if dpo.reference_free and dpo.loss_type in NEED_REFERENCE:
        raise UserError(f"--reference_free true: loss_type {dpo.loss_type} needs the reference model; use sigmoid, hinge, ipo, or or simpo")
    if dpo.ref_model_update_steps > 0 and (m.lora or m.lora_path or dpo.reference_free):
        raise UserError("--ref_model_update_steps: only full DPO keeps a separate reference model to update "
                        "(with LoRA the reference is the model itself, adapters off); leave it at -1")


def run(argv=None) -> int:
    model_args, data_args, dpo, training = parse(argv)
    output_dir = training["output_dir"]
    from ..checkpoints import training_output

    with training_output(output_dir):
        from ..preference_data import read_preference_split

        # Validate the data before anything heavy loads or anything is written.
        train_records = read_preference_split(data_args.dataset_name_or_path, "train")
        dev_records = read_preference_split(data_args.dataset_name_or_path, "dev", required=False)
        family = resolve_family(model_args)
        if not family.supports.get("dpo", True):
            raise UserError(f"DPO is not supported for the {family.name} family (see llm/{family.name}/README.md)")
        if data_args.intokens and not family.supports.get("intokens", False):
            raise UserError(f"--intokens: packing is not supported for the {family.name} family (see the README's support table)")
        from ..runtime import setup_runtime

        setup_runtime()  # before paddle is imported
        check_training_device(training, model_args.dtype)
        make_dir(output_dir, "output_dir")
        import paddle

        with paddle.utils.unique_name.guard():  # fresh parameter names: a resumed run's optimizer state matches
            return _train(family, model_args, data_args, dpo, training, train_records, dev_records)


def _encode(family, tokenizer, data_args, train_records, dev_records):
    from ..data import pack_examples
    from ..preference_data import encode_preference_records

    d = data_args
    train, stats = encode_preference_records(family, tokenizer, train_records, d.src_length, d.tgt_length, "train")
    dev = encode_preference_records(family, tokenizer, dev_records, d.src_length, d.tgt_length, "dev")[0] if dev_records else []
    if d.intokens:
        train, eff = pack_examples(train, d.intokens_max_length)
        log.info(f"intokens: packed {len(train_records)} train pairs into {len(train)} rows of {d.intokens_max_length} tokens; "
                 f"packing efficiency {100 * eff:.1f}%")
        dev = pack_examples(dev, d.intokens_max_length)[0] if dev else []
    return train, stats, dev


def reference_model(family, model_args, training_args):
    """The frozen reference of full DPO: the starting model loaded a second time (its memory is one more
    copy of the weights; no gradients or optimizer state)."""
    from ..cpu_kernels import apply as apply_cpu_kernels

    extra = {}
    if training_args.tensor_parallel_degree > 1:
        extra = dict(tensor_parallel_degree=training_args.tensor_parallel_degree, tensor_parallel_rank=training_args.tensor_parallel_rank)
    ref = apply_cpu_kernels(family, family.load_model(model_args.model_name_or_path, dtype=model_args.dtype, **extra))
    ref.eval()
    for p in ref.parameters():
        p.stop_gradient = True
    return ref


def _train(family, model_args, data_args, dpo, training, train_records, dev_records) -> int:
    from ..checkpoints import prepare_resume
    from ..preference_trainer import build_preference_trainer

    training_args, tokenizer = training_setup(training, family, model_args.model_name_or_path, model_args.chat_template)
    train, train_stats, dev = _encode(family, tokenizer, data_args, train_records, dev_records)
    kind = "lora" if dpo.lora else "full"
    last, unusable = prepare_resume(training_args, kind)  # before the model loads: a broken checkpoint is one line
    model, kind = build_model(family, model_args, training_args, tokenizer)
    ref = None if (dpo.reference_free or dpo.lora) else reference_model(family, model_args, training_args)
    if not training_args.do_eval:
        dev = []
    elif not dev:
        log.info(f"no dev data (dev.json or dev/) in {data_args.dataset_name_or_path}: evaluation is switched off")
        training_args.evaluation_strategy = training_args.evaluation_strategy.__class__("no")
        training_args.do_eval = False
        training_args.load_best_model_at_end = False
    trainer = build_preference_trainer(model, ref, tokenizer, family, training_args, dpo, train, dev)
    trainer.unusable_checkpoints = unusable
    train_result = trainer.train(resume_from_checkpoint=last)
    save_outputs(trainer, tokenizer, family, kind, model_args, data_args, dpo, training_args)
    if training_args.should_save:
        _record_alignment(training_args.output_dir, dpo)
        write_json(os.path.join(training_args.output_dir, "log_history.json"), trainer.history)
    metrics = dict(train_result.metrics)
    metrics.update({f"train_{k}": v for k, v in train_stats.items()})
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    if dev:
        eval_metrics = {k: (float(v) if hasattr(v, "item") else v) for k, v in trainer.evaluate().items()}
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
    return 0


def _record_alignment(output_dir: str, dpo: DPOArgument) -> None:
    """Add how the model was aligned to paddlellm_meta.json (what predict/merge read stays as fine-tuning wrote it)."""
    from ..files import META_FILE

    path = os.path.join(output_dir, META_FILE)
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    meta["alignment"] = {"method": "dpo", "loss_type": dpo.loss_type, "beta": dpo.beta, "reference_free": dpo.reference_free}
    write_json(path, meta)


def main(argv=None) -> int:
    return run(argv)
