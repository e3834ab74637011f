"""The training loss. With `train.label_smoothing` = 0 it is the model's own (HF) loss; above
0 it is the same cross-entropy against smoothed targets, (1 - eps) * NLL(label) + eps * mean over
the vocabulary (classes) of -log p, as microsoft/LoRA's GPT-2 E2E runs train (examples/NLG
src/model.py, `label_smooth`). Same terms, same normaliser as the model's loss and as
`distributed.loss_items`: the mean over label tokens after the causal shift (labels -100
skipped), or over examples, so gradient accumulation and data parallelism weigh it alike.
Validation keeps the plain loss (the original also evaluates without smoothing).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rosa_bench.data.task import REGRESSION, Task
from rosa_bench.errors import UserError

IGNORE = -100


def check_label_smoothing(label_smoothing: float, task: Task) -> None:
    """Smoothing needs class targets: STS-B's regression head has none."""
    if label_smoothing and task.kind == REGRESSION:
        raise UserError(f"train.label_smoothing={label_smoothing!r} needs class labels, but {task.name} is a "
                        "regression task; set train.label_smoothing=0")


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, causal: bool,
                           label_smoothing: float) -> torch.Tensor:
    """Mean smoothed cross-entropy over the label tokens (causal: position t predicts t + 1)
    or the examples, in float32 as HF's own loss."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, label_smoothing=label_smoothing)


def training_loss(model: nn.Module, batch: dict[str, torch.Tensor], causal: bool,
                  label_smoothing: float) -> torch.Tensor:
    """The loss one training micro-batch backpropagates."""
    if not label_smoothing:
        return model(**batch).loss
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return smoothed_cross_entropy(logits, batch["labels"], causal, label_smoothing)
