"""The method contract of DESIGN.md as reusable checks, so each method's test file states only
what is particular to it (imported by test_loraxs.py and test_rocoft.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import rosa_bench
from rosa_bench.methods import attached_method
from rosa_bench.methods.base import AdapterLayer
from tests.test_methods import inputs, logits, tiny


def randomize(model: nn.Module, marker: str, scale: float = 0.1, seed: int = 2) -> None:
    """Give the parameters whose name holds `marker` random values, so the update is active."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if marker in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def loss(model: nn.Module, family: str) -> torch.Tensor:
    labels = torch.tensor([0, 1, 2]) if family == "bert" else inputs()["input_ids"]
    return model(**inputs(), labels=labels).loss


def gradient_sets(model: nn.Module, family: str) -> tuple[set[str], set[str]]:
    """(names with a non-zero gradient after one backward, names that require grad)."""
    loss(model, family).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return with_grad, {n for n, p in model.named_parameters() if p.requires_grad}


def check_merge_keeps_outputs(model: nn.Module, family: str) -> None:
    before = logits(model)
    assert (before - logits(tiny(family))).abs().max() > 1e-4  # the update is active
    merged = rosa_bench.merge(model)
    torch.testing.assert_close(logits(merged), before, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    names = sorted(n for n, _ in merged.named_parameters())
    assert names == sorted(n for n, _ in tiny(family).named_parameters())


def check_round_trip(family: str, make: Callable[[int], nn.Module], marker: str) -> None:
    """Train-like values saved from a model built with seed 0 restore the exact outputs on a
    model built with another seed (so nothing may come from the re-initialisation)."""
    trained = make(0)
    randomize(trained, marker)
    state = attached_method(trained).checkpoint_state(trained)
    fresh = make(1)
    assert (logits(fresh) - logits(trained)).abs().max() > 1e-4
    attached_method(fresh).load_checkpoint_state(fresh, state)
    torch.testing.assert_close(logits(fresh), logits(trained), atol=0, rtol=0)
