"""The run-folder format: the one module that knows how a run folder is laid out.

    <output.path>/<task dir>/<run name>/
        config.yaml          the resolved, validated config
        overrides.yaml       the command-line overrides that named the run
        metrics.json         final and best validation scores, run status
        events.out.tfevents.*  TensorBoard scalars and text samples
        checkpoints/last/    model.safetensors, optimizer.safetensors, state.json
        checkpoints/best/    model.safetensors, state.json (chosen on validation only)

Everything is written atomically (temporary file or folder, then rename), so a crash
never leaves a half-written file that a resume would trust.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rosa_bench.config import RunConfig, validate
from rosa_bench.errors import UserError

CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
METRICS_FILE = "metrics.json"
CHECKPOINTS = "checkpoints"

# Overrides that do not change what is trained, or are already in the folder path.
_NAME_SKIP_PREFIXES = ("dataset.cache", "dataset.name", "dataset.task", "dataset=", "fnmodel=",
                       "fnmodel.name", "model=", "model.name", "output.", "logging.progress",
                       "hydra.", "hydra/", "train.num_workers")
_MAX_NAME = 160


def run_name(run: RunConfig, overrides: list[str]) -> str:
    """Readable, stable name: '<method>_<model>' plus the remaining overrides, sorted, so the
    same command always maps to the same folder (and resumes there)."""
    if run.output.name:
        return run.output.name
    model = run.model.name.replace("/", "-")
    extra = sorted(o.lstrip("+~") for o in overrides
                   if not o.lstrip("+~").startswith(_NAME_SKIP_PREFIXES))
    name = ",".join([f"{run.fnmodel.name}_{model}", *extra]).replace("/", "-")
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME - 9]}-{digest}"
    return name


def run_dir(run: RunConfig, task_subdir: str, overrides: list[str]) -> Path:
    return Path(run.output.path) / task_subdir / run_name(run, overrides)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _finite(data: Any) -> Any:
    """`data` with NaN and infinite floats as None: strict JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(value) for value in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (a NaN score is written as null)."""
    atomic_write_text(path, json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_config(folder: Path, run: RunConfig, overrides: list[str]) -> None:
    atomic_write_text(folder / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(run)))
    atomic_write_text(folder / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def read_config(folder: Path) -> RunConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a run folder: {CONFIG_FILE} is missing")
    return validate(OmegaConf.load(path))


def read_config_dict(folder: Path) -> dict[str, Any]:
    """The saved config as plain data, not validated: readers such as figures.py must also
    read runs of methods this checkout does not know."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a run folder: {CONFIG_FILE} is missing")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def read_metrics(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METRICS_FILE
    return read_json(path) if path.is_file() else {}


def is_complete(folder: Path) -> bool:
    return bool(read_metrics(folder).get("complete"))


def checkpoint_dir(folder: Path, which: str) -> Path:
    """`which` is 'last' or 'best'. A crash between the two renames of a checkpoint swap
    leaves only '<which>.old': fall back to it."""
    path = Path(folder) / CHECKPOINTS / which
    old = path.with_name(which + ".old")
    if not path.exists() and old.exists():
        return old
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written temporary folder into place."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def config_dict(run: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(run)
