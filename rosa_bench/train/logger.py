"""TensorBoard logging for a run folder, plus the peak-memory probe the loop reports.

Each run folder is one session of TensorBoard's HParams dashboard: its hyperparameters
(`run_hparams`) are written once, and every scalar tag of the folder is a metric column there
(the last value logged): `best/<score>` (validation scores at the best checkpoint) and the
`test/<score>` that evaluate.py adds, beside the training curves.

Events are written by `EventFile` in the calling thread, not by TensorBoard's background
writer thread: a full disk or a read-only folder then fails the write that caused it, as one
line naming the event file (`runs.storage_errors`), instead of a traceback printed by a
background thread and an error raised later at some unrelated flush or close."""

from __future__ import annotations

import dataclasses
import itertools
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries
from torch.utils.tensorboard.summary import scalar as scalar_summary
from torch.utils.tensorboard.summary import text as text_summary

from rosa_bench.config import RunConfig
from rosa_bench.runs import storage_errors

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


_file_ids = itertools.count()  # several event files of one process in one second get distinct names


class _Descriptor:
    """The file object RecordWriter writes to: every record goes to the disk at once with
    os.write (no buffer that a later flush, or the garbage collector, could fail to empty)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.closed = False

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)


class EventFile:
    """One TensorBoard event file, in TensorBoard's record format and file naming, written
    synchronously; every failed write is a UserError naming the file. `purge_step` makes
    TensorBoard drop the events earlier files hold from that step on (what a crashed run
    logged after its last checkpoint), so resumed curves have no duplicate points."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_file_ids)}"
        self.path = Path(folder) / f"events.out.tfevents.{stamp}"
        with storage_errors(self.path):
            self._records = RecordWriter(_Descriptor(self.path))
        self.add(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step:
            self.add(Event(step=purge_step, file_version="brain.Event:2"))
            self.add(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def add(self, event: Event) -> None:
        with storage_errors(self.path):
            self._records.write(event.SerializeToString())

    def summary(self, summary: Summary, step: int | None = None) -> None:
        event = Event(summary=summary, wall_time=time.time())
        if step is not None:
            event.step = int(step)
        self.add(event)

    def close(self) -> None:
        self._records.close()


class RunLogger:
    """Writes scalars and text into the run folder's event file (see `EventFile`)."""

    def __init__(self, folder: Path, enabled: bool = True, purge_step: int | None = None):
        self.events = EventFile(folder, purge_step) if enabled else None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.events is not None:
            self.events.summary(scalar_summary(tag, value), step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.scalar(tag, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.events is not None:
            self.events.summary(text_summary(tag, text), step)

    def hparams(self, values: dict[str, HParam]) -> None:
        """This run's row of the HParams table (no experiment summary: TensorBoard then takes
        the union of every run's hyperparameters and scalar tags, so runs of different
        methods and tasks share one table)."""
        if self.events is not None:
            _, session_start, _ = hparams_summaries(values, {})
            self.events.summary(session_start)

    def best(self, scores: dict[str, float], step: int) -> None:
        """Validation scores of the new best checkpoint: best/<score>, whose last value is the best."""
        self.scalars({f"best/{k}": v for k, v in scores.items()}, step)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
