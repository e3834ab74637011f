"""Checkpoints as safetensors tensors plus a JSON state: nothing is ever unpickled.

A checkpoint holds what the method says restores the model (trainable tensors, plus any
frozen tensors it edits), the optimizer's tensors and hyper-parameters, the LR schedule,
RNG states and the loop position. It is written into a temporary folder and renamed into
place, so a kill leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rosa_bench.runs import read_json, replace_dir, write_json

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


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


def save_checkpoint(folder: Path, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any | None = None) -> None:
    """Write a checkpoint folder atomically. `state` is JSON-able loop state."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp"))
    save_file(_contiguous(model_state), str(tmp / MODEL_FILE))
    meta = dict(state)
    if optimizer is not None:
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        rng_tensors, rng_meta = rng_state()
        save_file(_contiguous(opt_tensors | rng_tensors), str(tmp / OPTIMIZER_FILE))
        meta |= {"optimizer": opt_meta, "rng": rng_meta,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None}
    write_json(tmp / STATE_FILE, meta)
    replace_dir(tmp, folder)


def load_model_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / MODEL_FILE))


def load_state(folder: Path) -> dict[str, Any]:
    return read_json(folder / STATE_FILE)


def restore_training_state(folder: Path, optimizer: torch.optim.Optimizer,
                           scheduler: Any | None) -> dict[str, Any]:
    """Load optimizer, scheduler and RNG state from `folder`; returns the loop state."""
    meta = load_state(folder)
    tensors = load_file(str(folder / OPTIMIZER_FILE))
    opt_tensors = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    optimizer.load_state_dict(optimizer_from_flat(opt_tensors, meta["optimizer"]))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    set_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"])
    return meta


def has_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file() and (folder / MODEL_FILE).is_file()
