"""TensorBoard logging for a run folder, plus the peak-memory probe the loop reports."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


def peak_memory_mb() -> float:
    """Peak accelerator memory if training on CUDA, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
