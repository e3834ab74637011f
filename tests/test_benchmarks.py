"""The step-time floor really is the bound it is reported as: the backbone is frozen, yet the
gradient reaches every target layer's output, the first layer's included, exactly as far as it
must for an adapter there."""

from __future__ import annotations

import torch

from benchmarks.step_time import apply_floor
from tests.test_methods import inputs, tiny


def test_floor_sends_gradients_to_every_target_output_and_trains_only_the_head():
    model = tiny("bert")
    params = apply_floor(model, ["query", "value"])
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output
        return hook

    for name, module in model.named_modules():
        if name.endswith(("query", "value")):
            module.register_forward_hook(keep(name))
    model(**inputs(), labels=torch.tensor([0, 1, 2])).loss.backward()
    assert sorted(outputs) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1)
                               for p in ("query", "value")]
    assert all(out.grad is not None and out.grad.abs().sum() > 0 for out in outputs.values())
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"classifier.weight", "classifier.bias"} == {n for n, p in model.named_parameters()
                                                                      if any(p is q for q in params)}
