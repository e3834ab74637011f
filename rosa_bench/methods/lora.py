"""LoRA (Hu et al., 2021): y = W x + (alpha / r) B A x with A random, B = 0 at the start.

`fnmodel.fused_slices` reproduces microsoft/LoRA's `MergedLinear` (loralib/layers.py), which
the LoRA paper's GPT-2 runs put on the fused `c_attn` with `enable_lora=[True, False, True]`
(examples/NLG/src/model.py): the output is cut into len(fused_slices) equal slices (q, k, v)
and each `true` slice gets its own rank-r pair A_i (r, in), B_i (out / n, r) while the others
get no update. Stored as the original stores them: A = [A_q; A_v] (n_on * r, in) and
B = [B_q; B_v] (n_on * out / n, r), so weights transfer both ways.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rosa_bench.config import MethodConfig
from rosa_bench.errors import UserError
from rosa_bench.methods.base import Method, layer_shape
from rosa_bench.methods.lowrank import LowRankLayer


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    # null: one rank-r pair per target. A list of booleans (the original's enable_lora, e.g.
    # [true, false, true] for q, k, v of GPT-2's c_attn): per-slice pairs on the true slices only.
    fused_slices: list[bool] | None = None


class LoraLayer(LowRankLayer):
    """Without slices the shared low-rank chain A, B (fused path included); with slices its own
    per-slice update, which always takes the unfused path."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float,
                 slices: list[bool] | None = None):
        super().__init__(base_layer, alpha / rank, dropout)
        w = self.weight
        self.slices = list(slices) if slices else None
        pairs = sum(self.slices) if self.slices else 1
        self.slice_out = self.out_features // len(self.slices) if self.slices else self.out_features
        # Same shapes and init as HF PEFT (A: Kaiming-uniform, B: zeros) so weights transfer;
        # with slices, the pairs stacked as loralib's MergedLinear stacks them.
        self.lora_A = nn.Parameter(torch.empty(pairs * rank, self.in_features, dtype=w.dtype,
                                               device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(pairs * self.slice_out, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.rank = rank

    def factors(self) -> tuple[torch.Tensor, ...]:
        return self.lora_A, self.lora_B

    def fused_applies(self, x: torch.Tensor) -> bool:
        return self.slices is None and super().fused_applies(x)

    def _place(self, on_slices: torch.Tensor) -> torch.Tensor:
        """(..., pairs, slice_out) -> (..., out) with zeros on the slices that have no pair."""
        full = on_slices.new_zeros((*on_slices.shape[:-2], len(self.slices), self.slice_out))
        index = torch.tensor([i for i, on in enumerate(self.slices) if on], device=on_slices.device)
        return full.index_copy(-2, index, on_slices).flatten(-2)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        if self.slices is None:
            return super().update(x)
        hidden = F.linear(self.dropout(x), self.lora_A) * self.scaling
        hidden = hidden.unflatten(-1, (-1, self.rank))  # (..., pairs, r)
        b = self.lora_B.unflatten(0, (-1, self.slice_out))  # (pairs, slice_out, r)
        return self._place(torch.einsum("...pr,por->...po", hidden, b))

    def delta_weight(self) -> torch.Tensor:
        if self.slices is None:
            return super().delta_weight()
        a = self.lora_A.unflatten(0, (-1, self.rank))  # (pairs, r, in)
        b = self.lora_B.unflatten(0, (-1, self.slice_out))  # (pairs, slice_out, r)
        return self._place((b @ a).permute(2, 0, 1)).T * self.scaling  # (in, pairs, so) -> (out, in)


class LoRA(Method):
    name = "lora"
    config_class = LoraConfig
    fused_path = True

    @classmethod
    def check_config(cls, cfg: LoraConfig) -> None:
        super().check_config(cfg)
        slices = cfg.fused_slices
        if slices is not None and (len(slices) < 2 or not any(slices)):
            raise UserError(f"fnmodel.fused_slices={slices!r} must list at least two slices, one or more "
                            "of them true (GPT-2 c_attn, q and v only: [true, false, true]); or null")

    def check_layer(self, name: str, module: nn.Module) -> None:
        super().check_layer(name, module)
        slices = self.cfg.fused_slices
        out_features, in_features = layer_shape(module)
        # A fused q,k,v projection maps the hidden size to one slice per projection; any other
        # layer whose width the count merely divides would be cut into meaningless slices.
        if slices is not None and out_features != len(slices) * in_features:
            raise UserError(f"fnmodel.fused_slices has {len(slices)} slices but layer {name} maps "
                            f"{in_features} -> {out_features}, not {in_features} -> {len(slices)} x "
                            f"{in_features}: target only the fused q,k,v layer (GPT-2: c_attn)")

    def make_layer(self, name: str, module: nn.Module) -> LoraLayer:
        return LoraLayer(module, self.rank_for(module), self.cfg.alpha, self.cfg.dropout,
                         self.cfg.fused_slices)
