"""Full fine-tuning: every parameter trains (the head too unless fnmodel.train_head=false)."""

from __future__ import annotations

from torch import nn

from rosa_bench.methods.base import Method, attach


class FullFineTuning(Method):
    name = "full"

    @classmethod
    def check_config(cls, cfg) -> None:
        """Full fine-tuning has no rank; nothing to check."""

    def apply(self, model: nn.Module, family: str | None = None) -> nn.Module:
        model.requires_grad_(True)
        self.set_head_trainable(model)
        attach(model, self)
        return model
