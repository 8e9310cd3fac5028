"""paddlenlp's DPOTrainer with our output-folder conventions (engine layer).

The DPO maths (the losses, rewards, reference handling with a frozen copy or with the LoRA adapters
switched off) is paddlenlp.trl.DPOTrainer's and DPOCriterion's as they are. What we add is what every
training run of ours has: the final model saved as model.safetensors (adapters as PaddleNLP's adapter
files), checkpoints marked complete and rotated as in fine-tuning (trainer.CheckpointMixin), and every
logged row kept for log_history.json.
"""
from __future__ import annotations

import logging
from typing import Dict, List

from paddlenlp.trl import DPOTrainer

from .data import ExampleDataset
from .preference_data import PreferenceCollator
from .trainer import CheckpointMixin

log = logging.getLogger("paddlellm")


class PreferenceTrainer(CheckpointMixin, DPOTrainer):
    def __init__(self, *args, family=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.history: List[Dict] = []  # every logged row (the Trainer empties state.log_history at each log)
        self.unusable_checkpoints: List[str] = []  # set by the command when resuming passed over broken ones

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        train = "loss" in logs
        # Workaround (paddlenlp 3.0.0b4): DPOTrainer.log multiplies state.epoch by num_train_epochs before
        # every training log (PaddleNLP's run_dpo.py sets num_train_epochs to 1), so with 3 epochs the log
        # said epoch 3.0 after the first. Divide first, so the logged epoch is the Trainer's own.
        if train and self.state.epoch is not None:
            self.state.epoch /= max(self.args.num_train_epochs, 1e-9)
        super().log(logs, **kwargs)
        self.history.append({k: (float(v) if hasattr(v, "item") else v) for k, v in logs.items()} | {"step": self.state.global_step})

    def _wrap_ref_model(self, model):
        # paddlenlp wraps the reference (and, in evaluate, the policy) with paddle.amp.decorate and
        # fleet.distributed_model whatever the run: without mixed precision and without a fleet process
        # group (a single process, CPU) there is nothing to wrap, and fleet would fail uninitialised.
        args = self.args
        if not (args.fp16 or args.bf16) and args.world_size <= 1:
            return model
        return super()._wrap_ref_model(model)


def build_preference_trainer(model, ref_model, tokenizer, family, training_args, dpo_config, train_examples, dev_examples):
    """A PreferenceTrainer over encoded (or packed) pairs; ref_model None for LoRA (adapters off) or reference_free."""
    trainer = PreferenceTrainer(
        model=model,
        ref_model=ref_model,
        dpo_config=dpo_config,
        args=training_args,
        train_dataset=ExampleDataset(train_examples) if train_examples else None,
        eval_dataset=ExampleDataset(dev_examples) if dev_examples else None,
        tokenizer=tokenizer,
        data_collator=PreferenceCollator(family, tokenizer.pad_token_id),
        # Both replies are scored over every supervised token, their end token included (paddlenlp's
        # ignore_eos_token=True would instead skip the rejected reply's first token).
        ignore_eos_token=False,
        family=family,
    )
    return trainer
