"""Checkpoints as safetensors tensors plus a JSON state: nothing is ever unpickled.

A checkpoint holds what the method says restores the model (trainable tensors, plus any
frozen tensors it edits), the optimizer's tensors and hyper-parameters, the LR schedule,
RNG states and the loop position. It is written into a temporary folder and renamed into
place, so a kill leaves either the previous checkpoint or the new one, never half of one.
The state JSON holds a SHA-256 of every tensor file, checked on every load: a damaged
checkpoint is named and never trusted (checkpoints older than the checksums load with a
warning that they are unverified); a resume falls back to the previous 'last' kept
(`train.keep_checkpoints`) or stops, and never silently starts over.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rosa_bench.errors import UserError
from rosa_bench.runs import (
    CHECKPOINTS,
    TMP_MARK,
    CorruptFile,
    checkpoint_history,
    checkpoint_slot,
    read_json,
    replace_dir,
    storage_errors,
    write_json,
)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKSUMS = "files"  # state key: {file name: sha256}
RESUME_KEYS = ("global_step", "epoch", "batches_done", "best", "optimizer", "rng")
SINCE_CHECKSUMS = ("nonfinite_skipped",)  # loop-state keys written alongside every checksum table

log = logging.getLogger(__name__)


class CheckpointError(UserError):
    """A checkpoint that is missing a file, fails its checksum or cannot be parsed."""


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _listify(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(meta["python"]))
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))


def _listify(x: Any) -> Any:
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: Path, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None, keep: int = 1) -> None:
    """Write a checkpoint folder atomically, keeping `keep - 1` previous versions.
    `state` is JSON-able loop state."""
    folder = checkpoint_slot(folder)
    with storage_errors(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}{TMP_MARK}"))
    try:
        with storage_errors(tmp / MODEL_FILE):
            save_file(_contiguous(model_state), str(tmp / MODEL_FILE))
        meta = dict(state)
        if optimizer is not None:
            opt_tensors, opt_meta = optimizer_to_flat(optimizer)
            rng_tensors, rng_meta = rng_state()
            with storage_errors(tmp / OPTIMIZER_FILE):
                save_file(_contiguous(opt_tensors | rng_tensors), str(tmp / OPTIMIZER_FILE))
            meta |= {"optimizer": opt_meta, "rng": rng_meta,
                     "scheduler": scheduler.state_dict() if scheduler is not None else None}
        meta[CHECKSUMS] = {p.name: file_digest(p) for p in sorted(tmp.glob("*.safetensors"))}
        write_json(tmp / STATE_FILE, meta)
        replace_dir(tmp, folder, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _predates_checksums(meta: dict[str, Any]) -> bool:
    """A state written before checksums existed: no checksum table and none of the keys every
    state has held since (a current state that lost its table is damaged, not old)."""
    return CHECKSUMS not in meta and not any(key in meta for key in SINCE_CHECKSUMS)


_unverified_warned: set[str] = set()


def load_state(folder: Path, verify: tuple[str, ...] = ()) -> dict[str, Any]:
    """The checkpoint's JSON state, after checking the checksums of the files in `verify`.
    A checkpoint written before checksums existed is loaded with a warning that its files
    are unverified; the tensors are still parsed, and matched by name and shape on load."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} is damaged: {STATE_FILE} is missing")
    try:
        meta = read_json(path)
    except CorruptFile as err:
        raise CheckpointError(f"checkpoint {folder} is damaged: {err}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder} is damaged: {path} is not a JSON object")
    checksums = meta.get(CHECKSUMS)
    if checksums is None and _predates_checksums(meta):
        if str(folder) not in _unverified_warned:
            _unverified_warned.add(str(folder))
            log.warning("checkpoint %s predates checksums: its files cannot be verified", folder)
        checksums = {}
    elif not isinstance(checksums, dict):
        raise CheckpointError(f"checkpoint {folder} is damaged: {path} holds no checksums")
    elif any(name not in checksums for name in verify):
        absent = next(name for name in verify if name not in checksums)
        raise CheckpointError(f"checkpoint {folder} is damaged: {path} has no checksum for {absent}")
    for name in verify:
        file = Path(folder) / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: {file} is missing")
        if name in checksums and file_digest(file) != checksums[name]:
            raise CheckpointError(f"checkpoint {folder} is damaged: {file} fails its checksum")
    return meta


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    load_state(folder, verify=(name,))
    try:
        return load_file(str(Path(folder) / name))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"checkpoint {folder} is damaged: {Path(folder) / name}: {err}") from None


def load_model_state(folder: Path) -> dict[str, torch.Tensor]:
    return _load_tensors(folder, MODEL_FILE)


def restore_training_state(folder: Path, optimizer: torch.optim.Optimizer,
                           scheduler: Any | None) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG state from `folder`; returns the loop state."""
    tensors = _load_tensors(folder, OPTIMIZER_FILE)
    meta = load_state(folder)
    opt_tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    try:
        optimizer.load_state_dict(optimizer_from_flat(opt_tensors, meta["optimizer"]))
        if scheduler is not None and meta.get("scheduler") is not None:
            scheduler.load_state_dict(meta["scheduler"])
        set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {folder} cannot be restored: "
                              f"{type(err).__name__}: {err}") from None
    return meta


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / MODEL_FILE).is_file()


def check_resumable(folder: Path) -> dict[str, Any]:
    """The state of a 'last' checkpoint after checking every file and key a resume needs."""
    meta = load_state(folder, verify=(MODEL_FILE, OPTIMIZER_FILE))
    absent = [k for k in RESUME_KEYS if k not in meta]
    if absent:
        raise CheckpointError(f"checkpoint {folder} is damaged: {STATE_FILE} lacks {absent}")
    return meta


def find_resumable(run_folder: Path) -> Path | None:
    """The newest 'last' checkpoint that passes `check_resumable`, warning about each damaged
    one skipped; None when the run has none yet. Raises CheckpointError when checkpoints
    exist but none is usable: the run must not silently start over on top of them."""
    candidates = checkpoint_history(run_folder, "last")
    legacy = Path(run_folder) / CHECKPOINTS / "last.old"
    candidates += [legacy] if legacy.exists() else []
    problems = []
    for folder in candidates:
        try:
            check_resumable(folder)
        except CheckpointError as err:
            problems.append(str(err))
            log.warning("%s; trying an older checkpoint", err)
            continue
        if problems:
            log.warning("resuming from the older checkpoint %s", folder)
        return folder
    if problems:
        raise CheckpointError(f"no usable checkpoint in {Path(run_folder) / CHECKPOINTS}: "
                              f"{'; '.join(problems)}; delete the run folder to start over")
    return None
