"""PaddleNLP's Trainer, specialised for supervised fine-tuning.

What we add: evaluation as one token-weighted pass over the whole dev set (loss, ppl, token accuracy;
and BLEU-4 / ROUGE from generated replies when asked), real tokens/s in the progress bar and logs, and
a marker in every checkpoint that was written completely (see checkpoints.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Dict, List

import paddle
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer_callback import ProgressCallback, TrainerCallback

from .checkpoints import MARKER, mark_complete, replacing_weights
from .cpu_kernels import dense_views
from .data import Collator, ExampleDataset
from .families import logits_of
from .generation import text_metrics
from .generation import generate_replies

log = logging.getLogger("paddlellm")


class CheckpointMixin:
    """Saving shared by every Trainer of ours (SFTTrainer, preference_trainer.PreferenceTrainer): the final model
    as model.safetensors, checkpoint completion markers, and rotation that leaves foreign checkpoints alone.
    Put it before the paddlenlp Trainer class in the bases; the class sets self.unusable_checkpoints = []."""

    def _save(self, output_dir=None, state_dict=None, merge_tensor_parallel=False):
        # Every model save (checkpoints and the final one) replaces the weight files already in the folder.
        # Not in model-parallel runs: there other ranks write their shards into the same folder at the
        # same time, and telling their fresh files from stale ones would race.
        args = self.args
        single_writer = args.should_save and not self.model_parallel()
        folder = output_dir if output_dir is not None else args.output_dir
        with replacing_weights(folder, enabled=single_writer):
            super()._save(output_dir=output_dir, state_dict=state_dict, merge_tensor_parallel=merge_tensor_parallel)

    def model_parallel(self) -> bool:
        """Whether the model is split over processes (tensor, pipeline or sharding parallel)."""
        a = self.args
        return max(a.tensor_parallel_degree, 1) > 1 or max(a.pipeline_parallel_degree, 1) > 1 or max(a.sharding_parallel_degree, 1) > 1

    def save_final_model(self, output_dir: str, kind: str) -> None:
        """Save the trained model at the end of a run.

        A full model goes into model.safetensors, the format merge_lora_params.py, merge_tp_params.py and
        `paddlellm tiny` write, so every command's output folder holds the same kind of weights (the
        Trainer's own save would write model_state.pdparams). Adapters (LoRA, prefix) are saved by the
        Trainer as PaddleNLP's adapter files. Checkpoints (checkpoint-N/) keep the Trainer's format: resuming
        reads it. Under tensor / pipeline / sharding parallel the Trainer's per-rank sharded save is kept
        unchanged: merge_tp_params.py reads those shards (tensor-parallel ranks, pipeline stages).
        """
        if kind != "full" or self.model_parallel():
            self.save_model(output_dir)
            return
        if not self.args.should_save:  # data parallel: one process writes, the others hold the same weights
            return
        from paddlenlp.trainer.trainer import TRAINING_ARGS_NAME
        from paddlenlp.transformers.model_utils import unwrap_model

        os.makedirs(output_dir, exist_ok=True)
        with replacing_weights(output_dir):  # e.g. an earlier run's model_state.pdparams must not remain
            unwrap_model(self.model).save_pretrained(output_dir, safe_serialization=True)
        paddle.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))  # as the Trainer's save keeps it

    def _sorted_checkpoints(self, output_dir=None, checkpoint_prefix="checkpoint", use_mtime=False):
        # Checkpoints that resuming passed over as unusable (e.g. a foreign checkpoint-99/) are left alone by
        # the rotation: counting them would delete this run's newer checkpoints instead (rotation keeps the
        # highest step numbers).
        found = super()._sorted_checkpoints(output_dir=output_dir, checkpoint_prefix=checkpoint_prefix, use_mtime=use_mtime)
        skip = {os.path.abspath(p) for p in self.unusable_checkpoints}
        return [p for p in found if os.path.abspath(p) not in skip]

    def _save_checkpoint(self, model, metrics=None):
        # Saving into a checkpoint-N folder that is already there (one that resuming passed over as broken):
        # its old completion marker must not vouch for the new save until that is complete, and it is a
        # checkpoint of this run again, so it takes part in the rotation.
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if self.args.should_save and os.path.isfile(os.path.join(folder, MARKER)):
            os.remove(os.path.join(folder, MARKER))
        self.unusable_checkpoints = [p for p in self.unusable_checkpoints if os.path.abspath(p) != os.path.abspath(folder)]
        super()._save_checkpoint(model, metrics=metrics)
        # Workaround (paddlenlp 3.0.0b4): _save_checkpoint deletes checkpoints beyond save_total_limit only
        # when local_rank == 0, which a single process started without the launcher (local_rank -1) never
        # is, so there every checkpoint was kept. Rotate here in that case (by step number; it marks first).
        if self.args.local_rank == -1 and self.args.should_save:
            self._rotate_checkpoints(use_mtime=False, output_dir=self.args.output_dir)
        else:
            self._mark_checkpoint()

    def _rotate_checkpoints(self, use_mtime=False, output_dir=None) -> None:
        # PaddleNLP deletes older checkpoints at the end of _save_checkpoint, before returning: mark the
        # new one complete first, so an interruption between the two never leaves no complete checkpoint.
        if output_dir == self.args.output_dir:
            self._mark_checkpoint()
        super()._rotate_checkpoints(use_mtime=use_mtime, output_dir=output_dir)

    def _mark_checkpoint(self) -> None:
        if self.args.should_save:
            mark_complete(self.args.output_dir, self.state.global_step)


class SFTTrainer(CheckpointMixin, Trainer):
    def __init__(self, *args, family=None, data_args=None, gen_args=None, dev_records=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.family = family
        self.data_args = data_args
        self.gen_args = gen_args
        self.dev_records = dev_records or []
        self.real_tokens = 0  # real (non-padding) training tokens seen by this process
        self.history: List[Dict] = []  # every logged row (PaddleNLP's Trainer empties state.log_history at each log)
        # Token-weighted loss bookkeeping: [loss sum, supervised tokens] of this process in the current
        # optimisation step (a tensor), and of all processes since the last log / since the start.
        self._step = None
        self._window = [0.0, 0]
        self.total = [0.0, 0]
        self._rate_mark = None  # (time, real_tokens) at the start of the logging window
        self.unusable_checkpoints: List[str] = []  # set by finetune when resuming passed over broken ones
        self.guard_run = True  # a training run: a failing generation evaluation is a warning, not the end of the run
        self.add_callback(_NormaliseGradients(self))

    def log(self, logs: Dict[str, float], **kwargs) -> None:
        if "loss" in logs and self._window[1] > 0:
            # PaddleNLP logs the mean of per-micro-batch means; ours is the mean over every supervised token.
            logs["loss"] = round(self._window[0] / self._window[1], 8)
            self._window = [0.0, 0]
        if "loss" in logs and self._rate_mark is not None:
            # real (non-padding) tokens per second over the logging window, all data-parallel replicas together
            # (tensor- and pipeline-parallel ranks of one replica read the same tokens: counted once)
            now, (then, seen) = time.time(), self._rate_mark
            rate = (self.real_tokens - seen) * max(self.args.dataset_world_size, 1) / max(now - then, 1e-9)
            logs["tokens_per_second"] = round(rate, 1)
            self._rate_mark = (now, self.real_tokens)
        super().log(logs, **kwargs)
        self.history.append(dict(logs, step=self.state.global_step))

    def compute_loss(self, model, inputs, return_outputs=False):
        real = inputs.pop("real_tokens", None)
        if real is not None and model.training:
            self.real_tokens += int(real)
        return super().compute_loss(model, inputs, return_outputs=return_outputs)

    def training_step(self, model, inputs, step_control=0):
        """Backward the *sum* of token losses (over a constant); gradients are divided by the step's token
        count later.

        The model's loss is the mean over this micro-batch's supervised tokens; times their number it is
        their sum. Summing over micro-batches and processes and dividing once by the step's total makes
        the loss and the update independent of batch size, accumulation, packing and process count.
        """
        if self._rate_mark is None:
            self._rate_mark = (time.time(), self.real_tokens)
        if self.pipeline():
            # paddlenlp's pipeline step: the last stage's criterion gives the mean over the micro-batch's supervised
            # tokens (averaged over micro-batches with gradient accumulation) and backpropagates it as it is
            self.real_tokens += int(inputs.pop("real_tokens", 0))
            return super().training_step(model, inputs, step_control=step_control)
        model.train()
        inputs = self._prepare_inputs(inputs)
        # Kept as tensors until the step ends, so a GPU is not synchronised at every micro-batch.
        tokens = (inputs["labels"] != -100).astype("float32").sum()
        with dense_views():  # forward and backward without strided views on CPU (same values, faster)
            with self.autocast_smart_context_manager():
                loss = self.compute_loss(model, inputs)
            loss_sum = loss.astype("float32") * tokens
            # Backward the sum divided by a constant token budget (the same for every micro-batch and process,
            # so the update stays exact): a raw sum is thousands of times a mean loss, and under fp16 loss
            # scaling its gradients would overflow and skip the first steps until the scale had shrunk.
            scaled = loss_sum / self.token_budget()
            if self.do_grad_scaling:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        stats = paddle.stack([loss_sum.detach(), tokens])
        self._step = stats if self._step is None else self._step + stats
        return loss.detach()

    def pipeline(self) -> bool:
        return max(self.args.pipeline_parallel_degree, 1) > 1

    def token_budget(self) -> float:
        """Most tokens one process can see in an optimisation step (rows x row length): a constant scale."""
        d = self.data_args
        if d is None:
            return 1.0
        row = d.intokens_max_length if d.intokens else d.src_length + d.tgt_length
        return float(self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * row)

    def normalise_gradients(self) -> None:
        """Turn summed gradients into the mean over every supervised token of the step, across processes."""
        if self.pipeline():  # the pipeline backpropagated a mean loss already (see training_step)
            return
        stats = self._step.astype("float64") if self._step is not None else paddle.zeros([2], dtype="float64")
        groups = _replica_groups(self.args) if self.args.world_size > 1 else []
        world = 1
        for group, degree in groups:
            paddle.distributed.all_reduce(stats, group=group)
            world *= degree
        loss_sum, tokens = (float(v) for v in stats.numpy())
        self._step = None
        self._window = [self._window[0] + loss_sum, self._window[1] + int(tokens)]
        self.total = [self.total[0] + loss_sum, self.total[1] + int(tokens)]
        # Data parallel (and sharding) average gradients over their processes: undo that and the token
        # budget, then divide by the tokens. (Scaling is linear, so it does not matter whether sharding
        # averages before this point or inside the optimizer step.)
        scale = world * self.token_budget() / max(tokens, 1.0)
        with paddle.no_grad():
            for p in self.model.parameters():
                grad = getattr(p, "main_grad", None)
                if grad is None:
                    grad = p.grad
                if grad is not None:
                    grad.scale_(scale)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> Dict[str, float]:
        """Evaluate on the whole dev set in every process (results are identical on every rank)."""
        start = time.time()
        metrics = self._loss_metrics(eval_dataset or self.eval_dataset)
        if self.data_args.eval_with_do_generation:
            try:
                metrics.update(self._generation_metrics())
            except Exception as e:
                if not self.guard_run:
                    raise
                # A failure while generating or scoring replies (a model or metric quirk) must not end a
                # training run: that would lose every step since the last checkpoint.
                log.warning(f"generation evaluation failed at step {self.state.global_step} ({type(e).__name__}: {e}); "
                            "BLEU/ROUGE are left out this time and training goes on")
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
        with paddle.no_grad(), dense_views():
            for batch in loader:
                batch.pop("real_tokens", None)
                labels = batch.pop("labels")
                out = model(**batch)
                logits = logits_of(out).astype("float32")
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


def _replica_groups(args):
    """(group, degree) of each set of processes that see different data and average their gradients:
    data parallel, and sharding (GPU only; not testable here). group None = every process."""
    try:
        from paddle.distributed import fleet

        hcg = fleet.get_hybrid_communicate_group()
    except Exception:  # fleet not initialised: plain data parallel over every process
        hcg = None
    if hcg is None:
        return [(None, max(args.world_size, 1))]
    groups = []
    if hcg.get_data_parallel_world_size() > 1:
        groups.append((hcg.get_data_parallel_group(), hcg.get_data_parallel_world_size()))
    if hcg.get_sharding_parallel_world_size() > 1:
        groups.append((hcg.get_sharding_parallel_group(), hcg.get_sharding_parallel_world_size()))
    return groups


class _NormaliseGradients(TrainerCallback):
    """Calls SFTTrainer.normalise_gradients right before every optimizer step (after gradient all-reduce)."""

    def __init__(self, trainer: "SFTTrainer"):
        self.trainer = trainer

    def on_optimizer_begin(self, args, state, control, **kwargs):
        self.trainer.normalise_gradients()


class TokensProgressCallback(ProgressCallback):
    """The progress bar shows the latest loss and real (non-padding) tokens per second."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self.training_bar is not None:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_second', 0):.0f}")
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
        trainer.add_callback(TokensProgressCallback())
    return trainer
