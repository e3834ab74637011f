"""`train.init_from=<run folder>`: start a run from another run's trained weights (the LoRA
and LoRA-XS papers start MRPC, RTE and STS-B from their MNLI runs).

The source must be the same model, method and rank; its final (`last`) checkpoint is loaded
through the method's own `load_checkpoint_state`, so every method restores exactly what its
checkpoints hold (ROSA's rewritten base weights, RoCoFT's indices, LoRA-XS's frozen factors).
A task head of another shape (3 MNLI labels, 2 MRPC labels) is left at its fresh init.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rosa_bench import runs
from rosa_bench.config import RunConfig
from rosa_bench.errors import UserError
from rosa_bench.methods.base import Method, is_head
from rosa_bench.train import checkpoint as ckpt

MUST_MATCH = (("model", "name"), ("model", "hub_id"), ("fnmodel", "name"), ("fnmodel", "rank"))


def _check_compatible(source: dict, run: RunConfig, folder: Path) -> None:
    ours = runs.config_dict(run)
    for section, key in MUST_MATCH:
        theirs, mine = source.get(section, {}).get(key), ours[section][key]
        if theirs != mine:
            raise UserError(f"train.init_from={folder}: that run has {section}.{key}={theirs!r}, this run "
                            f"{mine!r}; start from a run of the same model, method and rank")


def _usable_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
                  folder: Path) -> dict[str, torch.Tensor]:
    """The source tensors this model takes: all of them, except head tensors of another shape."""
    usable = {}
    for name, tensor in state.items():
        mine = own.get(name)
        if mine is not None and mine.shape == tensor.shape:
            usable[name] = tensor
        elif not is_head(name):
            found = "missing" if mine is None else f"shaped {tuple(mine.shape)}"
            raise UserError(f"train.init_from={folder}: checkpoint tensor {name} {tuple(tensor.shape)} is "
                            f"{found} in this model; the checkpoint is not compatible")
    return usable


def load_initial_weights(run: RunConfig, model: nn.Module, method: Method) -> list[str]:
    """Load `run.train.init_from`'s final weights into `model`; returns the head tensors left
    at their fresh init (shape differs)."""
    folder = Path(run.train.init_from)
    source = runs.read_config_dict(folder)  # raises if `folder` is no run folder
    _check_compatible(source, run, folder)
    last = runs.checkpoint_dir(folder, "last")
    if not ckpt.has_checkpoint(last):
        raise UserError(f"train.init_from={folder}: no checkpoint in {last} (has that run trained?)")
    state = ckpt.load_model_state(last)
    own = dict(model.named_parameters()) | dict(model.named_buffers()) | method.checkpoint_state(model)
    usable = _usable_state(state, own, folder)
    method.load_checkpoint_state(model, usable)
    return sorted(set(state) - set(usable))
