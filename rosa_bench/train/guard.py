"""Non-finite losses and gradients: stop the run (default) or skip the step and count it.

A NaN or infinite loss or gradient means the next optimizer step would write non-finite
weights, and every later checkpoint, score and "best" would be meaningless. The trainer asks
`NonFiniteGuard.skip_step` once per optimizer step, before the optimizer touches anything:
by default the run stops with one line naming the step (`NonFiniteError`, exit 3, recorded in
metrics.json by `record_failure`); with `train.skip_nonfinite=true` the update is dropped,
the batch counts as consumed (the LR schedule and data order go on), and the count is kept
in the checkpoint and metrics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from rosa_bench import runs
from rosa_bench.errors import RunFailed

log = logging.getLogger(__name__)


class NonFiniteError(RunFailed):
    def __init__(self, what: str, step: int):
        super().__init__(f"non-finite {what} at step {step}: the run stopped before the update; lower "
                         "train.lr (or raise precision), or set train.skip_nonfinite=true to skip such steps")
        self.what, self.step = what, step


def gradients_finite(params: list[nn.Parameter]) -> bool | None:
    """Whether every gradient is finite; None when no parameter has one."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class NonFiniteGuard:
    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped = 0  # optimizer steps skipped so far (restored on resume)

    def skip_step(self, loss: torch.Tensor, params: list[nn.Parameter], step: int) -> bool:
        """True when optimizer step `step` must be skipped; raises NonFiniteError unless skipping.

        The gradients decide when there are any: a batch whose labels are all ignored (prompts
        truncated to max_length) has a NaN mean loss but zero, harmless gradients."""
        loss_finite = bool(torch.isfinite(loss.detach()).all())
        grads_finite = gradients_finite(params)
        if grads_finite or (grads_finite is None and loss_finite):
            return False
        what = "gradient" if loss_finite else f"loss ({float(loss.detach().float().mean())})"
        if not self.skip:
            raise NonFiniteError(what, step)
        self.skipped += 1
        log.warning("non-finite %s at step %d: step skipped (%d so far)", what, step, self.skipped)
        return True


def record_failure(folder: Path, err: NonFiniteError) -> None:
    """Mark metrics.json as failed (not complete), keeping the scores written so far."""
    try:
        metrics = runs.read_metrics(folder)
    except runs.CorruptFile:
        metrics = {}
    metrics |= {"complete": False, "failed": {"reason": f"non-finite {err.what}", "step": err.step,
                                              "message": str(err)}}
    runs.write_json(Path(folder) / runs.METRICS_FILE, metrics)
