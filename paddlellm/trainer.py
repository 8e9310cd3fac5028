"""PaddleNLP's Trainer, specialised for supervised fine-tuning.

What we add: evaluation as one token-weighted pass over the whole dev set (loss, ppl, token accuracy;
and BLEU-4 / ROUGE from generated replies when asked), real tokens/s in the progress bar and logs.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, List, Optional

import numpy as np
import paddle
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer_callback import ProgressCallback

from .data import Collator, ExampleDataset
from .generation import text_metrics
from .inference import generate_replies

log = logging.getLogger("paddlellm")


class SFTTrainer(Trainer):
    def __init__(self, *args, family=None, data_args=None, gen_args=None, dev_records=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.data_args = data_args
        self.gen_args = gen_args
        self.dev_records = dev_records or []
        self.real_tokens = 0  # real (non-padding) training tokens seen by this process
        self.history: List[Dict] = []  # every logged row (PaddleNLP's Trainer empties state.log_history at each log)

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        super().log(logs, **kwargs)
        self.history.append(dict(logs, step=self.state.global_step))

    def compute_loss(self, model, inputs, return_outputs=False):
        real = inputs.pop("real_tokens", None)
        if real is not None and model.training:
            self.real_tokens += int(real)
        return super().compute_loss(model, inputs, return_outputs=return_outputs)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Evaluate on the whole dev set in every process (results are identical on every rank)."""
        start = time.time()
        metrics = self._loss_metrics(eval_dataset or self.eval_dataset)
        if self.data_args.eval_with_do_generation:
            metrics.update(self._generation_metrics())
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _loss_metrics(self, dataset) -> Dict[str, float]:
        """Token-weighted mean loss over every supervised dev token, perplexity and next-token accuracy."""
        model = self.model
        was_training = model.training
        model.eval()
        loader = paddle.io.DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, shuffle=False,
                                      collate_fn=self.data_collator)
        loss_sum, count, correct = 0.0, 0, 0
        with paddle.no_grad():
            for batch in loader:
                batch.pop("real_tokens", None)
                labels = batch.pop("labels")
                out = model(**batch)
                logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
                logits = logits.astype("float32")
                mask = labels != -100
                loss_sum += float(paddle.nn.functional.cross_entropy(logits, labels.unsqueeze(-1), ignore_index=-100, reduction="sum"))
                count += int(mask.astype("int64").sum())
                correct += int(((logits.argmax(-1) == labels) & mask).astype("int64").sum())
        if was_training:
            model.train()
        loss = loss_sum / max(count, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1), "tokens": count}

    def _generation_metrics(self) -> Dict[str, float]:
        """Generate a reply for every dev example; BLEU-4 / ROUGE against its final tgt turn."""
        model = self.model
        was_training = model.training
        model.eval()
        recs = self.dev_records
        outputs = generate_replies(model, self.tokenizer, self.family, recs, self.data_args.src_length, self.data_args.tgt_length,
                                   batch_size=self.args.per_device_eval_batch_size, top_k=self.gen_args.top_k, top_p=self.gen_args.top_p)
        if was_training:
            model.train()
        refs = [r.tgt[-1] for r in recs]
        metrics = text_metrics(outputs, refs)
        if self.data_args.save_generation_output and self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            path = os.path.join(self.args.output_dir, "generated_output.json")
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                for r, o in zip(recs, outputs):
                    f.write(json.dumps({"src": r.src if len(r.src) > 1 else r.src[0], "tgt": r.tgt[-1], "output": o}, ensure_ascii=False) + "\n")
            os.replace(path + ".tmp", path)
        return metrics


class TokensProgressCallback(ProgressCallback):
    """The progress bar shows the latest loss and real (non-padding) tokens per second."""

    def __init__(self, trainer: SFTTrainer):
        super().__init__()
        self.trainer = trainer
        self.last_tokens = 0
        self.last_time = None

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.last_time = time.time()
        self.last_tokens = self.trainer.real_tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.last_time is not None:
            now = time.time()
            tokens = self.trainer.real_tokens - self.last_tokens
            rate = tokens * max(args.world_size, 1) / max(now - self.last_time, 1e-9)
            logs["tokens_per_second"] = round(rate, 1)
            self.last_time, self.last_tokens = now, self.trainer.real_tokens
            if self.training_bar is not None:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{rate:.0f}")
        super().on_log(args, state, control, logs=logs, **kwargs)


def build_trainer(model, tokenizer, family, training_args, train_examples, dev_examples, dev_records, data_args, gen_args) -> SFTTrainer:
    collator = Collator(family, tokenizer.pad_token_id)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=ExampleDataset(train_examples),
        eval_dataset=ExampleDataset(dev_examples) if dev_examples else None,
        tokenizer=tokenizer,
        data_collator=collator,
        family=family,
        data_args=data_args,
        gen_args=gen_args,
        dev_records=dev_records,
    )
    if not training_args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TokensProgressCallback(trainer))
    return trainer
