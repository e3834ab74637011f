"""Full fine-tuning: every parameter trains (the head too unless fnmodel.train_head=false)."""

from __future__ import annotations

from torch import nn

from rosa_bench.config import MethodConfig
from rosa_bench.methods.base import Method, attach


class FullFineTuning(Method):
    name = "full"

    @classmethod
    def uses_rank(cls, cfg: MethodConfig) -> bool:
        return False

    def apply(self, model: nn.Module, family: str | None = None) -> nn.Module:
        model.requires_grad_(True)
        self.set_head_trainable(model)
        attach(model, self)
        return model
