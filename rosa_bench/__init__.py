"""rosa-bench: train, evaluate and compare parameter-efficient fine-tuning methods.

From Python, on any Hugging Face model::

    import rosa_bench
    model = rosa_bench.apply(model, "lora", rank=8, targets=["q_proj", "v_proj"])
    ...train...
    model = rosa_bench.merge(model)   # a plain model with the update folded in
"""

from __future__ import annotations

from torch import nn

from rosa_bench.methods import attached_method, method_class


def apply(model: nn.Module, method: str, **options) -> nn.Module:
    """Wrap `model` with `method` (a name from `fnmodel`); options are that method's config
    fields (rank, alpha, targets, ...). Returns the wrapped model."""
    cls = method_class(method)
    cfg = cls.config_class(name=method, **options)
    cls.check_config(cfg)
    return cls(cfg).apply(model)


def merge(model: nn.Module) -> nn.Module:
    """Fold the applied method's update into the base weights; returns a plain model."""
    return attached_method(model).merge(model)


__all__ = ["apply", "merge"]
