"""LoRA-XS (Bałazy et al., 2024): y = W x + (alpha / r) B R A x with B = U_r and A = S_r V_r^T
from the truncated SVD of W, both frozen; only the r x r matrix R trains (r^2 per layer).

`init=random` replaces the SVD factors by frozen Kaiming-uniform ones (the paper's ablation).
R starts at N(0, r_init_std^2), so the function changes by at most the init scale at step 0
(exactly nothing with r_init_std=0). The frozen factors are persistent buffers: checkpoints
hold them, so a reload does not depend on recomputing the SVD bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rosa_bench.config import MethodConfig
from rosa_bench.errors import UserError
from rosa_bench.methods.base import ALL_PROJECTIONS, Method, check_choices, truncated_svd
from rosa_bench.methods.lowrank import LowRankLayer

INITS = ("svd", "random")
SVD_KINDS = ("exact", "randomized")
RANDOM_FANS = ("own", "transposed")


@dataclass
class LoraXSConfig(MethodConfig):
    name: str = "loraxs"
    init: str = "svd"  # svd: B, A from the SVD of W | random: frozen Kaiming-uniform B, A
    r_init_std: float = 1e-5  # R ~ N(0, std^2); 0 makes the step-0 function exact
    svd: str = "exact"  # exact | randomized (faster on large matrices)
    svd_niter: int = 4  # power iterations of the randomized SVD
    random_fan: str = "own"  # init=random: Kaiming bounds from each factor's own fan-in | transposed


def frozen_factors(weight: torch.Tensor, rank: int, cfg: LoraXSConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) in the weight's dtype and device."""
    if cfg.init == "svd":
        u, s, vh = truncated_svd(weight, rank, randomized=cfg.svd == "randomized", niter=cfg.svd_niter)
        b, a = u, s[:, None] * vh
    else:
        b = torch.empty(weight.shape[0], rank, device=weight.device)
        a = torch.empty(rank, weight.shape[1], device=weight.device)
        # `transposed`: the original code initialises B^T (r, out) and A^T (in, r), so the bounds
        # come from fan-ins out and r instead of r and in.
        for factor in (b, a):
            nn.init.kaiming_uniform_(factor.T if cfg.random_fan == "transposed" else factor, a=math.sqrt(5))
    return b.to(weight.dtype).contiguous(), a.to(weight.dtype).contiguous()


class LoraXSLayer(LowRankLayer):
    """Three thin factors (in -> r -> r -> out), only the r x r R trainable: the chain never
    forms an r x in or out x r weight gradient."""

    def __init__(self, base_layer: nn.Module, rank: int, cfg: LoraXSConfig):
        super().__init__(base_layer, cfg.alpha / rank, cfg.dropout)
        b, a = frozen_factors(self.weight, rank, cfg)
        self.register_buffer("lora_xs_B", b)
        self.register_buffer("lora_xs_A", a)
        self.lora_xs_R = nn.Parameter(torch.empty(rank, rank, dtype=b.dtype, device=b.device))
        nn.init.normal_(self.lora_xs_R, std=cfg.r_init_std)

    def factors(self) -> tuple[torch.Tensor, ...]:
        return self.lora_xs_A, self.lora_xs_R, self.lora_xs_B


class LoraXS(Method):
    name = "loraxs"
    config_class = LoraXSConfig
    fused_path = True
    # The paper: RoBERTa query, value, attention output and FFN output ('output.dense' also
    # matches 'attention.output.dense'); every projection of Llama-family models.
    default_targets = {
        "llama": ALL_PROJECTIONS["llama"],
        "gpt2": ["c_attn", "attn.c_proj", "mlp.c_proj"],
        "bert": ["query", "value", "attention.output.dense", "output.dense"],
        "roberta": ["query", "value", "attention.output.dense", "output.dense"],
    }

    @classmethod
    def check_config(cls, cfg: LoraXSConfig) -> None:
        super().check_config(cfg)
        check_choices(cfg, init=INITS, svd=SVD_KINDS, random_fan=RANDOM_FANS)
        if cfg.r_init_std < 0:
            raise UserError(f"fnmodel.r_init_std={cfg.r_init_std!r} must be >= 0")
        if cfg.svd_niter < 0:
            raise UserError(f"fnmodel.svd_niter={cfg.svd_niter!r} must be >= 0")

    def make_layer(self, name: str, module: nn.Module) -> LoraXSLayer:
        return LoraXSLayer(module, self.rank_for(module), self.cfg)
