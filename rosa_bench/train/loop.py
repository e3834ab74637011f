"""The one training loop every method and dataset goes through (HF Accelerate underneath).

Read `Trainer.fit` top to bottom: build loaders, optimizer and schedule; resume if a
checkpoint exists; then for each optimizer step: forward, backward, clip, step, log; evaluate
every `logging.eval_every` steps and at each epoch end; checkpoint at epoch ends and every
`train.save_every` steps. Methods hook in through `Method.on_*` (ROSA's resampling, ColA's
gradient learning) instead of branches here.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from rosa_bench import runs
from rosa_bench.config import RunConfig
from rosa_bench.data.task import Task
from rosa_bench.methods.base import Method, is_head, trainable_parameter_count
from rosa_bench.models import enable_gradient_checkpointing
from rosa_bench.train import checkpoint as ckpt
from rosa_bench.train import distributed
from rosa_bench.train.evaluation import (
    evaluate_split,
    generate_samples,
    length_sorted_loader,
    sharded_generate,
)
from rosa_bench.train.guard import NonFiniteGuard
from rosa_bench.train.logger import RunLogger, run_hparams
from rosa_bench.train.loss import check_label_smoothing, training_loss

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


class Trainer:
    def __init__(self, run: RunConfig, folder: Path, model: nn.Module, tokenizer: Any,
                 task: Task, method: Method):
        self.run, self.folder, self.task, self.method, self.tokenizer = run, folder, task, method, tokenizer
        distributed.start(run)
        self.accelerator = Accelerator(
            cpu=distributed.use_cpu(), mixed_precision=MIXED_PRECISION[run.train.precision],
            gradient_accumulation_steps=run.train.grad_accum,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=run.seed),
        )
        self.model = model
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # micro-batches consumed in the current epoch
        self.best: dict[str, Any] = {}
        self.last_scores: dict[str, Any] = {}
        self.saved_step = -1
        self.guard = NonFiniteGuard(run.train.skip_nonfinite)
        check_label_smoothing(run.train.label_smoothing, task)

    # ---- setup -----------------------------------------------------------------------------
    def _param_groups(self) -> list[dict[str, Any]]:
        """Weight decay on matrices only (not biases or norms), the usual AdamW practice; the
        task head at its own learning rate when `train.head_lr` is set."""
        params = self.method.optimizer_parameters(self.model)
        t = self.run.train
        head = {id(p) for n, p in self.model.named_parameters() if is_head(n)} if t.head_lr else set()
        groups = []
        for i, (lr, part) in enumerate(((t.lr, [p for p in params if id(p) not in head]),
                                        (t.head_lr, [p for p in params if id(p) in head]))):
            if part or i == 0:  # the two body groups always exist (checkpoints count on them)
                groups += [{"params": [p for p in part if p.ndim >= 2], "weight_decay": t.weight_decay,
                            "lr": lr},
                           {"params": [p for p in part if p.ndim < 2], "weight_decay": 0.0, "lr": lr}]
        return groups

    def _loaders(self) -> tuple[DataLoader, dict[str, DataLoader]]:
        t = self.run.train
        train = DataLoader(self.task.splits["train"], batch_size=t.batch_size, shuffle=True,
                           collate_fn=self.task.collate, num_workers=t.num_workers,
                           worker_init_fn=distributed.ignore_stop_signals,
                           # its own generator: starting (or skipping into) an epoch draws no
                           # number from the global RNG, so a resumed run's dropout stays in step
                           generator=torch.Generator().manual_seed(self.run.seed))
        evals = {s: length_sorted_loader(distributed.shard(self.task.splits[s]),  # gathered in evaluate_split
                                         t.eval_batch_size or t.batch_size, self.task.collate,
                                         num_workers=t.num_workers,
                                         worker_init_fn=distributed.ignore_stop_signals)
                 for s in self.task.validation_splits}
        return train, evals

    def reset_optimizer_state(self, params: list[nn.Parameter]) -> None:
        """Forget Adam moments of `params` (after a method re-initialises them); the LR
        schedule is untouched."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for p in params:
            inner.state.pop(p, None)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        with distributed.StopOnSignal() as self.stop:
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        run, acc = self.run, self.accelerator
        train_loader, eval_loaders = self._loaders()
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=run.train.lr)
        if run.train.gradient_checkpointing:
            enable_gradient_checkpointing(self.model, run.model.name)
        self.model = distributed.prepare_model(acc, self.model)
        self.optimizer, train_loader = acc.prepare(self.optimizer, train_loader)
        self.eval_loaders = eval_loaders
        self.steps_per_epoch = max(1, math.ceil(len(train_loader) / run.train.grad_accum))
        self.total_steps = run.train.max_steps or run.train.epochs * self.steps_per_epoch
        num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = get_scheduler(SCHEDULER_NAMES[run.train.scheduler], self.optimizer,
                                       num_warmup_steps=int(run.train.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        distributed.decorrelate_rng(run.seed)
        self._maybe_resume()
        self.logger = RunLogger(self.folder, enabled=acc.is_main_process, purge_step=self.global_step)
        self.logger.scalar("train/trainable_params", trainable_parameter_count(self.model), self.global_step)
        self.logger.hparams(run_hparams(run, self.task.name, trainable_parameter_count(self.model)))
        self.method.on_train_start(self)
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc="train",
                   disable=not (run.logging.progress and acc.is_local_main_process), dynamic_ncols=True)
        self.model.train()
        while self.global_step < self.total_steps and self.epoch < num_epochs:
            self.method.on_epoch_start(self)
            train_loader.set_epoch(self.epoch)
            loader = train_loader
            if self.batches_done:  # resumed mid-epoch: same shuffle, skip what was trained
                loader = acc.skip_first_batches(train_loader, self.batches_done)
            self._train_epoch(loader, bar)
            if self.global_step >= self.total_steps and self.batches_done < len(train_loader):
                break  # max_steps reached mid-epoch: the final checkpoint is written below
            self.epoch, self.batches_done = self.epoch + 1, 0
            self._evaluate()
            self._save_last()
        bar.close()
        if self.last_scores.get("_step") != self.global_step:
            self._evaluate()
        if self.saved_step != self.global_step:
            self._save_last()
        distributed.check_replicas_agree(self._model_state())
        summary = self._write_metrics(complete=True)
        self.logger.close()
        return summary

    def _train_epoch(self, loader: DataLoader, bar: tqdm) -> None:
        run, acc = self.run, self.accelerator
        window = distributed.LogWindow(time.perf_counter)
        for batch in loader:
            with acc.accumulate(self.model):
                loss = training_loss(self.model, batch, self.task.is_causal, run.train.label_smoothing)
                items = distributed.loss_items(batch, self.task.is_causal)
                acc.backward(distributed.global_mean(loss, items))
                # the parameter list walks the model: gather it once per optimizer step
                params = self.method.optimizer_parameters(self.model) if acc.sync_gradients else []
                skip = acc.sync_gradients and self.guard.skip_step(loss, params, self.global_step + 1)
                if acc.sync_gradients and not skip:
                    self.method.before_optimizer_step()
                    distributed.average_unsynced_gradients(params, self.model)
                elif skip:
                    self.method.discard_step()
                if acc.sync_gradients and run.train.max_grad_norm and not skip:
                    acc.clip_grad_norm_(params, run.train.max_grad_norm)
                if not skip:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.batches_done += 1
            mask = batch.get("attention_mask")
            window.add(float(loss.detach()), items,
                       int(mask.sum()) if mask is not None else batch["input_ids"].numel())
            if not acc.sync_gradients:
                continue
            self.scheduler.step()
            self.global_step += 1
            bar.update(1)
            self.method.on_step_end(self)
            if self.global_step % run.logging.log_every == 0 or self.global_step == self.total_steps:
                stats = window.read()  # summed over processes
                self.logger.scalars({"train/loss": stats["loss"], "train/lr": self.scheduler.get_last_lr()[0],
                                     "train/tokens_per_s": stats["tokens_per_s"],
                                     "train/peak_mem_mb": stats["peak_mem_mb"],
                                     "train/epoch": self.global_step / self.steps_per_epoch},
                                    self.global_step)
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            if run.logging.eval_every and self.global_step % run.logging.eval_every == 0:
                self._evaluate()
            if run.logging.eval_generate_every and self.global_step % run.logging.eval_generate_every == 0:
                self._evaluate_generation()
            if run.train.save_every and self.global_step % run.train.save_every == 0:
                self._save_last()
            if self.stop.requested():  # all processes agree, after the same step
                if self.saved_step != self.global_step:
                    self._save_last()
                self.logger.close()
                self.stop.exit()
            if self.global_step >= self.total_steps:
                return

    # ---- evaluation and checkpoints ------------------------------------------------------------
    def _evaluate(self) -> None:
        acc = self.accelerator
        model = acc.unwrap_model(self.model)
        scores: dict[str, dict[str, float]] = {}
        for split, loader in self.eval_loaders.items():
            scores[split] = evaluate_split(model, self.task, loader, acc.device, sharded=True)
            prefix = "valid" if split == self.task.validation_splits[0] else f"valid_{split.split('_')[-1]}"
            self.logger.scalars({f"{prefix}/{k}": v for k, v in scores[split].items()}, self.global_step)
        if self.task.is_causal and self.task.sample_prompts:
            samples = generate_samples(model, self.tokenizer, self.task.sample_prompts, acc.device,
                                       self.run.logging.sample_max_new_tokens, sharded=True)
            text = "\n\n".join(f"**prompt:** `{p.strip()}`  \n**generation:** {g}"
                               for p, g in zip(self.task.sample_prompts, samples))
            self.logger.text("valid/sample", text, self.global_step)
        self.last_scores = {**scores, "_step": self.global_step}
        self._track_best(scores[self.task.validation_splits[0]])

    def _evaluate_generation(self) -> None:
        """Generation scores (BLEU, ROUGE, accuracy) on the first validation split, with the
        same code as evaluate.py, so their curves exist during training."""
        if not self.task.generation_sets:
            return
        from rosa_bench.evaluate import generation_scores

        split = self.task.validation_splits[0]
        scores, _, _ = generation_scores(self.accelerator.unwrap_model(self.model), self.tokenizer, self.task,
                                         split, self.run.logging.eval_generate_max_prompts, progress=False,
                                         decode=sharded_generate)
        self.logger.scalars({f"valid/{k}": v for k, v in scores.items() if isinstance(v, float)},
                            self.global_step)

    def _track_best(self, scores: dict[str, float]) -> None:
        """NaN (a diverged model's score) ranks below every number; a later number replaces it."""
        sign = 1.0 if self.task.greater_is_better else -1.0

        def rank(value: float | None) -> float:
            return -math.inf if value is None or math.isnan(value) else sign * value

        name, value = self.task.metric_name, scores[self.task.metric_name]
        if math.isnan(value):
            self.accelerator.print(f"warning: {name} on split {self.task.validation_splits[0]!r} is NaN at "
                                   f"step {self.global_step}; it ranks worst for the best checkpoint")
        better = "value" not in self.best or rank(value) > rank(self.best["value"])
        if better:
            self.best = {"metric": name, "value": value, "step": self.global_step,
                         "epoch": self.epoch, "scores": scores}
            self.logger.best(scores, self.global_step)
            if self.accelerator.is_main_process:
                ckpt.save_checkpoint(runs.checkpoint_dir(self.folder, "best"), self._model_state(),
                                     self._loop_state())
        self._write_metrics(complete=False)

    def _model_state(self) -> dict[str, torch.Tensor]:
        return self.method.checkpoint_state(self.accelerator.unwrap_model(self.model))

    def _loop_state(self) -> dict[str, Any]:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_done": self.batches_done,
                "total_steps": self.total_steps, "best": self.best, "nonfinite_skipped": self.guard.skipped}

    def _save_last(self) -> None:
        self.accelerator.wait_for_everyone()
        rng = distributed.gather_rng_states()  # every process's, to resume each one's own
        if self.accelerator.is_main_process:
            ckpt.save_checkpoint(runs.checkpoint_dir(self.folder, "last"), self._model_state(),
                                 self._loop_state() | rng, self.optimizer, self.scheduler,
                                 keep=self.run.train.keep_checkpoints)
        self.saved_step = self.global_step

    def _maybe_resume(self) -> None:
        last = ckpt.find_resumable(self.folder)
        if last is None:
            return
        self.method.load_checkpoint_state(self.accelerator.unwrap_model(self.model),
                                          ckpt.load_model_state(last))
        state = ckpt.restore_training_state(last, self.optimizer, self.scheduler)
        distributed.restore_rng_state(state)
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        self.batches_done, self.best = state["batches_done"], state["best"]
        self.guard.skipped = state.get("nonfinite_skipped", 0)
        self.accelerator.print(f"resuming {self.folder} at step {self.global_step} (epoch {self.epoch})")

    def _write_metrics(self, complete: bool) -> dict[str, Any]:
        model = self.accelerator.unwrap_model(self.model)
        summary = {
            "complete": complete,
            "global_step": self.global_step,
            "total_steps": self.total_steps,
            "epoch": self.epoch,
            "task": self.task.name,
            "method": self.method.name,
            "model": self.run.model.name,
            "trainable_params": trainable_parameter_count(model),
            "total_params": sum(p.numel() for p in model.parameters()),
            "best": self.best,
            "nonfinite_skipped": self.guard.skipped,
            "final": {k: v for k, v in self.last_scores.items() if k != "_step"},
        }
        if self.accelerator.is_main_process:
            runs.write_json(self.folder / runs.METRICS_FILE, summary)
        return summary
