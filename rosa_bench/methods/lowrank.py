"""The low-rank adapted layer shared by LoRA, LoRA-XS and ROSA, and its fused path.

Each of these methods adds a chain of thin factors to a frozen Linear / GPT-2 Conv1D:
y = x W^T + b + s * (x F_1^T ... F_{k-1}^T) F_k^T (LoRA and ROSA: F = A, B; LoRA-XS: A, R, B).
Computed as two separate modules (frozen layer, then update, then a sum), a training step pays
for a (tokens, out) update tensor and the sum in the forward, and a (tokens, in) adapter
input-gradient and another sum in the backward: memory traffic that costs more than the
adapter's arithmetic. The fused path does the same arithmetic in one autograd function that
accumulates the low-rank product into the frozen layer's output in place (addmm_), adds the
adapter's input-gradient into the frozen layer's in place, and saves only what the trainable
factors' gradients need (the adapter's input and the rank-r intermediates).
The arithmetic is `fused_forward` / `fused_backward`, shared with ColA's `LowRankCapture`
(methods/cola.py), which keeps its adapters outside autograd and buffers the factor gradients.

`LowRankLayer.forward` picks the path by itself. The fused one applies whenever the result is
the unfused one's up to float rounding; the unfused `base_layer(x) + update(x)` is kept when
- the switch is off (`fnmodel.fused=off`, or `layer.fused = False`: tests and debugging);
- autocast is active for the input's device (mixed precision: autocast picks each op's dtype);
- the input, frozen weight, bias and factors do not all share one dtype;
- the frozen weight requires grad, or the base layer is not exactly nn.Linear / Conv1D (a
  subclass, e.g. a quantized Linear, computes its own product), or it has forward or backward
  hooks, or global module hooks are registered (the fused path would not call them);
- LoRA with `fnmodel.fused_slices` (per-slice pairs of a fused q,k,v layer: no single chain).
Dropout (the adapter's input only) is no reason to fall back: the layer's own dropout module
runs once on the same input as in the unfused path (same random stream), and its output is the
adapter's input. Merged layers are plain base layers again, so no path is taken.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module
from transformers.pytorch_utils import Conv1D

from rosa_bench.methods.base import AdapterLayer

_FIRST_FACTOR = 5  # position of F_1 among _FusedLowRankLinear's inputs


class FusedNeeds(NamedTuple):
    """Which gradients a fused backward computes: the input's, the separate adapter input's,
    the bias's, and each factor's."""

    x: bool
    adapter_in: bool
    bias: bool
    factors: tuple[bool, ...]


def fused_forward(ctx: Any, x: torch.Tensor, adapter_in: torch.Tensor | None, weight: torch.Tensor | None,
                  bias: torch.Tensor | None, scaling: float, factors: tuple[torch.Tensor, ...],
                  needs: FusedNeeds) -> torch.Tensor:
    """x W^T + b + s (adapter_in F_1^T ... F_{k-1}^T) F_k^T, saving on `ctx` what `fused_backward`
    needs. `adapter_in` None: x itself. `weight` None: the update alone (no frozen layer to fuse
    with, as for ColA beside a layer the fused path cannot take; then `bias` is None too)."""
    flat = x.reshape(-1, x.shape[-1])
    flat_in = flat if adapter_in is None else adapter_in.reshape(flat.shape)
    # hidden[i]: the input of factor i, for i > 0 a (tokens, in_i) view of a (in_i, tokens)
    # product: computed with its rank-sized side as the rows, where MKL is fast (it is up to
    # 40x slower at (tokens, n) @ (n, r); measured 1.7x here on minilm-l6's layers).
    hidden = [flat_in]
    for factor in factors[:-1]:
        hidden.append(torch.mm(factor, hidden[-1].T).T)
    out_features = factors[-1].shape[0]
    # Allocated in its final shape, so the output is no view (in-place use downstream is fine).
    out = flat.new_empty(*x.shape[:-1], out_features)
    out_flat = out.view(-1, out_features)
    if weight is None:
        last_in = hidden[-1] if scaling == 1.0 else hidden[-1] * scaling  # scaled on the rank-r side
        torch.mm(last_in, factors[-1].T, out=out_flat)
    else:
        if bias is None:
            torch.mm(flat, weight.T, out=out_flat)
        else:
            torch.addmm(bias, flat, weight.T, out=out_flat)
        out_flat.addmm_(hidden[-1], factors[-1].T, alpha=scaling)

    ctx.scaling, ctx.adapter_separate, ctx.needs = scaling, adapter_in is not None, needs
    # Only a trainable factor's input is kept: LoRA-XS keeps its rank-r intermediate, not x.
    kept = [h if need else None for h, need in zip(hidden, needs.factors, strict=True)]
    ctx.save_for_backward(weight, *factors, *kept)
    return out


def fused_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[
        torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, list[torch.Tensor | None]]:
    """The gradients of `fused_forward`'s x, adapter input, bias and factors (None where not needed)."""
    needs = ctx.needs
    k = len(needs.factors)
    saved = ctx.saved_tensors  # once: activation checkpointing allows each unpack only once
    weight, factors, kept = saved[0], saved[1:k + 1], saved[k + 1:]
    grad = grad_out.reshape(-1, grad_out.shape[-1])
    adapter_in_needed = needs.adapter_in if ctx.adapter_separate else needs.x
    grad_factors: list[torch.Tensor | None] = [None] * k
    # The gradient w.r.t. factor i's output, kept transposed (rank, tokens): every thin
    # product below then has its rank-sized side as the result's rows, where MKL is fast (it
    # is up to 40x slower at (tokens, n) @ (n, r), the unfused backward's form).
    grad_t = grad.T
    for i in range(k - 1, -1, -1):
        scale = ctx.scaling if i == k - 1 else 1.0
        if needs.factors[i]:
            grad_factors[i] = thin_mm(grad_t, kept[i]).mul_(scale)
        if i == 0 or not (any(needs.factors[:i]) or adapter_in_needed):
            break
        grad_t = torch.mm(factors[i].T, grad_t).mul_(scale)
    grad_x = grad_adapter_in = None
    if needs.x and weight is not None:
        grad_x = torch.mm(grad, weight)
    if adapter_in_needed:
        first_scale = ctx.scaling if k == 1 else 1.0
        if ctx.adapter_separate or grad_x is None:
            grad_first = torch.mm(grad_t.T, factors[0]).mul_(first_scale)
            if ctx.adapter_separate:
                grad_adapter_in = grad_first
            else:
                grad_x = grad_first
        else:
            grad_x.addmm_(grad_t.T, factors[0], alpha=first_scale)
    shape_in = (*grad_out.shape[:-1], factors[0].shape[1])
    grad_x = grad_x.view(shape_in) if grad_x is not None else None
    grad_adapter_in = grad_adapter_in.view(shape_in) if grad_adapter_in is not None else None
    grad_bias = grad.sum(0) if needs.bias else None
    return grad_x, grad_adapter_in, grad_bias, grad_factors


class _FusedLowRankLinear(torch.autograd.Function):
    """Inputs: x, the adapter's input (None: x itself), the frozen (out, in) weight, its bias
    (or None), the scale s, then the factors F_1..F_k in Linear orientation and chain order."""

    @staticmethod
    def forward(ctx, x, adapter_in, weight, bias, scaling, *factors):  # noqa: ANN001 (autograd API)
        n = ctx.needs_input_grad
        return fused_forward(ctx, x, adapter_in, weight, bias, scaling, factors,
                             FusedNeeds(n[0], n[1], n[3], n[_FIRST_FACTOR:]))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN205
        grad_x, grad_adapter_in, grad_bias, grad_factors = fused_backward(ctx, grad_out)
        return grad_x, grad_adapter_in, None, grad_bias, None, *grad_factors


def _has_hooks(module: nn.Module) -> bool:
    """Forward or backward hooks on `module`, or global ones (torch.nn.modules.module's
    register_module_*_hook, e.g. a FLOP counter): the fused path never calls the base layer, so
    none of them would see it."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks)


def thin_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (a factor's gradient), contiguous, computed with the smaller side as the rows."""
    if a.shape[0] > b.shape[1]:
        return torch.mm(b.T, a.T).T.contiguous()
    return torch.mm(a, b)


def fusable(layer: AdapterLayer, x: torch.Tensor, factors: tuple[torch.Tensor, ...]) -> bool:
    """Whether `layer`'s frozen base and `factors` may go through `fused_forward` with input x:
    the switch on, a plain Linear / Conv1D without hooks and a frozen weight, no autocast, and
    one dtype throughout (the module docstring says why each)."""
    base = layer.base_layer
    if not layer.fused or type(base) not in (nn.Linear, Conv1D) or _has_hooks(base) \
            or torch.is_autocast_enabled(x.device.type):
        return False
    weight = layer.weight
    if weight.requires_grad:
        return False
    tensors = [weight, *factors] + ([base.bias] if base.bias is not None else [])
    return all(t.dtype == x.dtype for t in tensors)


class LowRankLayer(AdapterLayer):
    """y = base(x) + s * (dropout(x) F_1^T ... F_{k-1}^T) F_k^T. A subclass registers its
    factors and lists them in `factors()`; the unfused update, the merge delta and the fused
    path are all derived from that list here, once."""

    def __init__(self, base_layer: nn.Module, scaling: float, dropout: float):
        super().__init__(base_layer)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, ...]:
        """F_1..F_k in Linear orientation (out_i, in_i), the one the input meets first first."""
        raise NotImplementedError

    def update(self, x: torch.Tensor) -> torch.Tensor:
        # The scale goes on the rank-r input of the last factor, not on the (tokens, out) result.
        *inner, last = self.factors()
        h = self.dropout(x)
        for factor in inner:
            h = F.linear(h, factor)
        if self.scaling != 1.0:
            h = h * self.scaling
        return F.linear(h, last)

    def delta_weight(self) -> torch.Tensor:
        delta = reduce(torch.matmul, reversed(self.factors()))
        return delta * self.scaling if self.scaling != 1.0 else delta

    def fused_applies(self, x: torch.Tensor) -> bool:
        """Whether this forward may take the fused path (the module docstring says when not)."""
        return fusable(self, x, self.factors())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused_applies(x):
            return super().forward(x)
        adapter_in = self.dropout(x)
        return _FusedLowRankLinear.apply(x, None if adapter_in is x else adapter_in, self.weight,
                                         self.base_layer.bias, self.scaling, *self.factors())
