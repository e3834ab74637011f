"""LoRA (Hu et al., 2021): y = W x + (alpha / r) B A x with A random, B = 0 at the start."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rosa_bench.methods.base import AdapterLayer, Method


class LoraLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__(base_layer)
        w = self.weight
        # Same shapes and init as HF PEFT (A: Kaiming-uniform, B: zeros) so weights transfer.
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        # Scale the rank-r intermediate, not the (tokens, out) result: same math, r/out the work.
        return F.linear(F.linear(self.dropout(x), self.lora_A) * self.scaling, self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling


class LoRA(Method):
    name = "lora"

    def make_layer(self, name: str, module: nn.Module) -> LoraLayer:
        return LoraLayer(module, self.rank_for(module), self.cfg.alpha, self.cfg.dropout)
