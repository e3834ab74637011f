"""May this command train in the run folder it names? The rules that make rerunning the same
command safe: one process per folder (a lock), leftovers of interrupted writes removed, and
a resume only when nothing that changes results differs from what the folder was trained
with: the composed config (`config_differences`) and the data itself (`data_fingerprints`,
so the same data under another path resumes, and other data under the same path does not).
`train.resume=force` continues anyway and says what differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from rosa_bench import runlock, runs
from rosa_bench.config import RunConfig
from rosa_bench.data.task import Task
from rosa_bench.errors import UserError

# Keys that do not change what is trained or how it is scored (the data's path is checked
# through the data's fingerprint instead; fnmodel.fused changes float rounding only).
NEUTRAL_KEYS = ("output.", "logging.progress", "logging.log_every", "logging.sample_max_new_tokens",
                "train.num_workers", "train.resume", "train.keep_checkpoints", "train.skip_nonfinite",
                "train.gradient_checkpointing",
                "train.eval_batch_size", "dataset.cache", "dataset.num_samples_to_log",
                "dataset.generation.batch_size", "model.cache_dir", "fnmodel.fused")
BUDGET_KEYS = ("train.max_steps", "train.epochs")

log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (or a plain process): the one that owns the folder."""
    return int(os.environ.get("RANK", "0")) == 0


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(stored: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) for each result-changing key that differs. Keys only one
    side knows (options added or removed since the run started) are not compared."""
    old, now = _flatten(stored), _flatten(new)
    return [(k, old[k], now[k]) for k in sorted(old.keys() & now.keys())
            if old[k] != now[k] and not is_neutral(k)]


def is_neutral(key: str) -> bool:
    """`key` is in NEUTRAL_KEYS, or under one of its sections (entries ending in '.'). Exact
    otherwise: as a prefix, `fnmodel.fused` would also let `fnmodel.fused_slices` change."""
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in NEUTRAL_KEYS)


def may_continue(folder: Path, run: RunConfig) -> bool:
    """False when the run is complete and nothing differs (nothing to do); True to train;
    raises UserError listing the differing keys unless `train.resume=force`."""
    force = run.train.resume == "force"
    if not (folder / runs.CONFIG_FILE).is_file():
        if runs.checkpoint_history(folder, "last") and not force:
            raise UserError(f"run folder {folder} holds checkpoints but no {runs.CONFIG_FILE}, so what "
                            "they were trained with is unknown; delete the folder, or set train.resume=force")
        return True
    diffs = config_differences(runs.read_config_dict(folder), runs.config_dict(run))
    complete = runs.is_complete(folder)
    if not diffs:
        return not complete
    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs)
    if not force:
        if all(k in BUDGET_KEYS for k, _, _ in diffs):
            hint = ("train.resume=force to continue it to the new budget (the LR schedule is re-planned "
                    "from the current step, so it will not equal a fresh run of that length)")
        else:
            hint = "train.resume=force to continue anyway (the run then mixes both configs)"
        state = "complete run" if complete else "run"
        raise UserError(f"the {state} in {folder} was trained with a different config ({listed}); "
                        f"use another output.name, or {hint}")
    verb = "extending the complete run" if complete else "continuing"
    log.warning("train.resume=force: %s %s with changed %s", verb, folder, listed)
    return True


def split_fingerprint(split: datasets.Dataset) -> str:
    """SHA-256 of the split's rows (as Arrow IPC, in order): equal exactly when the rows are."""
    digest = hashlib.sha256()
    for batch in split.with_format("arrow").iter(batch_size=65536):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_table(batch)
        digest.update(sink.getvalue())
    return digest.hexdigest()


def data_fingerprints(task: Task) -> dict[str, str]:
    return {name: split_fingerprint(task.splits[name]) for name in ["train", *task.validation_splits]}


def check_data(folder: Path, task: Task, run: RunConfig) -> None:
    """Refuse to resume on other data than the run trained on; record the data otherwise."""
    path = folder / runs.DATA_FILE
    now = data_fingerprints(task)
    before = runs.read_json(path) if path.is_file() else {}
    changed = sorted(s for s in now if s in before and before[s] != now[s])
    if changed and run.train.resume != "force":
        raise UserError(f"the data of split(s) {', '.join(changed)} differs from what the run in {folder} "
                        f"trained on (dataset.cache={run.dataset.cache!r}); use another output.name, or set "
                        "train.resume=force to continue on the new data")
    if changed:
        log.warning("train.resume=force: continuing %s on changed data (split(s) %s)", folder,
                    ", ".join(changed))
    if is_main_process():
        runs.write_json(path, now)


@contextlib.contextmanager
def claimed(folder: Path) -> Iterator[None]:
    """Hold `folder` (created if needed) for this process: the lock, then the removal of
    temporary files interrupted writes left. A bad input (UserError) that stops a run this
    call created, before its first checkpoint, removes the folders it created: nothing stays
    behind. Non-main ranks of a distributed launch neither lock nor clean."""
    if not is_main_process():
        yield
        return
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    with runs.storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    fd = runlock.acquire(folder)
    try:
        stray = runs.remove_temporaries(folder)
        if stray:
            log.warning("removed %d temporary file(s) left in %s by an interrupted write", len(stray), folder)
        yield
    except UserError:
        if created and not (folder / runs.CHECKPOINTS).exists():
            runlock.release(folder, fd)
            fd = None
            shutil.rmtree(folder, ignore_errors=True)
            for parent in created[1:]:
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise
    finally:
        if fd is not None:
            runlock.release(folder, fd)
