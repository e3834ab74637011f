"""TensorBoard logging for a run folder, plus the peak-memory probe the loop reports.

Each run folder is one session of TensorBoard's HParams dashboard: its hyperparameters
(`run_hparams`) are written once, and every scalar tag of the folder is a metric column there
(the last value logged): `best/<score>` (validation scores at the best checkpoint) and the
`test/<score>` that evaluate.py adds, beside the training curves."""

from __future__ import annotations

import dataclasses
import resource
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from rosa_bench.config import RunConfig

HParam = str | int | float | bool


def peak_memory_mb() -> float:
    """Peak accelerator memory if training on CUDA, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def run_hparams(run: RunConfig, task: str, trainable_params: int) -> dict[str, HParam]:
    """The HParams table's columns: what the run is, how it trained, and every option of its
    method (rank, alpha, ... and the method's own), lists and nulls as text."""
    values: dict[str, HParam] = {
        "method": run.fnmodel.name, "model": run.model.name, "task": task, "seed": run.seed,
        "lr": run.train.lr, "batch_size": run.train.batch_size * run.train.grad_accum,
        "steps": run.train.max_steps or 0, "epochs": run.train.epochs, "trainable_params": trainable_params}
    for key, value in dataclasses.asdict(run.fnmodel).items():
        if key != "name":
            values[key] = value if isinstance(value, HParam) else str(value)
    return values


class RunLogger:
    """Writes scalars and text into the run folder. `purge_step` drops events a crashed run
    logged after its last checkpoint, so resumed curves have no duplicate points."""

    def __init__(self, folder: Path, enabled: bool = True, purge_step: int | None = None):
        self.writer = SummaryWriter(str(folder), purge_step=purge_step or None) if enabled else None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, values: dict[str, HParam]) -> None:
        """This run's row of the HParams table (no experiment summary: TensorBoard then takes
        the union of every run's hyperparameters and scalar tags, so runs of different
        methods and tasks share one table)."""
        if self.writer is not None:
            _, session_start, _ = hparams_summaries(values, {})
            self.writer.file_writer.add_summary(session_start)

    def best(self, scores: dict[str, float], step: int) -> None:
        """Validation scores of the new best checkpoint: best/<score>, whose last value is the best."""
        self.scalars({f"best/{k}": v for k, v in scores.items()}, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
