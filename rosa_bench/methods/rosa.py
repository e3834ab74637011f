"""ROSA, Random Orthogonal Subspace Adaptation (Gamal & Rabusseau, 2024).

Each target weight is split by SVD, W = U diag(s) V^T: r singular directions become the
trainable factors B A (sqrt(s) folded into each side, so both start equally scaled) and the
rest stays frozen as the residual. Every `factorize_freq` epochs or steps the update is merged
back (W <- W + B A) and the weight is split again along a new subspace, so a sequence of rank-r
updates can add up to a full-rank change at rank-r cost per step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from rosa_bench.config import FUSED_CHOICES, MethodConfig
from rosa_bench.errors import UserError
from rosa_bench.methods.base import BIAS_CHOICES, Method, check_choices, layer_shape
from rosa_bench.methods.lowrank import LowRankLayer

if TYPE_CHECKING:
    from rosa_bench.train.loop import Trainer

SAMPLE_METHODS = ("random", "top", "bottom")
FACTORIZE_METHODS = ("equal", "add", "random")
FACTORIZE_LEVELS = ("epoch", "step")
RESET_SCOPES = ("resampled", "all")
SINGULAR_SPLITS = ("sqrt", "input")


@dataclass
class RosaConfig(MethodConfig):
    name: str = "rosa"
    sample_method: str = "random"  # which singular directions train: random block, top, bottom
    factorize_method: str = "equal"  # equal: orthogonal split; add: W kept, delta; random: LoRA init
    factorize_freq: int = 1  # resample every this many epochs/steps; 0: never
    factorize_level: str = "epoch"  # epoch | step
    # Original-code protocol options (mid-2023 factorizednet):
    reset_optimizer: str = "resampled"  # at a resample forget the moments of: resampled | all parameters
    random_start_last: bool = True  # the random block may start at full - rank (false: it never does)
    singular_values: str = "sqrt"  # sqrt: sqrt(s) on each factor | input: all of s on A (input side)


def pick_directions(how: str, rank: int, full: int, generator: torch.Generator,
                    last_start: bool = True) -> torch.Tensor:
    """Indices of the `rank` singular directions that train: a contiguous block at a random
    start (as in the paper's code), the largest, or the smallest. Without `last_start` the
    block never starts at full - rank (the original's exclusive randint bound)."""
    if how == "top":
        start = 0
    elif how == "bottom":
        start = full - rank
    else:
        high = full - rank + 1 if last_start or full == rank else full - rank
        start = int(torch.randint(0, high, (), generator=generator))
    return torch.arange(start, start + rank)


class RosaLayer(LowRankLayer):
    """y = W_res x + B A x, where W_res + B A is the layer's current full weight (no scale)."""

    def __init__(self, base_layer: nn.Module, rank: int, dropout: float):
        super().__init__(base_layer, 1.0, dropout)
        w = self.weight
        self.rank = rank
        # Zero until the first factorize(): the wrapped layer starts as the plain layer.
        self.rosa_A = nn.Parameter(torch.zeros(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.rosa_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))

    def factors(self) -> tuple[torch.Tensor, ...]:
        return self.rosa_A, self.rosa_B

    @torch.no_grad()
    def factorize(self, cfg: RosaConfig, generator: torch.Generator) -> None:
        """Merge B A into W, then split again along a freshly chosen subspace. The parameter
        tensors are edited in place so the optimizer keeps pointing at them."""
        self.add_to_weight(self.delta_weight())
        if cfg.factorize_method == "random":  # LoRA's init (Kaiming-uniform A, zero B), our generator
            a = torch.empty(self.rank, self.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.rosa_A.copy_(a)
            self.rosa_B.zero_()
            return
        # Reduced SVD (LAPACK gesdd on CPU): exact, and the cheapest way to get every singular
        # direction, which the random block needs.
        u, s, vh = torch.linalg.svd(self.weight.float(), full_matrices=False)
        idx = pick_directions(cfg.sample_method, self.rank, s.numel(), generator, cfg.random_start_last)
        idx = idx.to(s.device)
        if cfg.singular_values == "input":
            a, b = s[idx, None] * vh[idx], u[:, idx]
        else:
            root = s[idx].sqrt()
            a, b = root[:, None] * vh[idx], u[:, idx] * root
        self.rosa_A.copy_(a)
        if cfg.factorize_method == "equal":
            self.rosa_B.copy_(b)
            self.add_to_weight(-(b @ a))
        else:  # add: W stays whole; B = 0 so the chosen directions start with no effect
            self.rosa_B.zero_()


class ROSA(Method):
    name = "rosa"
    config_class = RosaConfig
    fused_path = True
    # The paper's targets: attention q/k/v/o for encoders, attention and MLP for decoders.
    default_targets = {
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "gpt2": ["c_attn", "c_proj", "c_fc"],
        "bert": ["query", "key", "value", "attention.output.dense"],
        "roberta": ["query", "key", "value", "attention.output.dense"],
    }

    def __init__(self, cfg: RosaConfig):
        super().__init__(cfg)
        self.seed = 0

    @classmethod
    def check_config(cls, cfg: RosaConfig) -> None:
        rank = cfg.rank
        is_int = isinstance(rank, int) and not isinstance(rank, bool)
        if not ((is_int and rank >= 1) or (isinstance(rank, float) and 0 < rank < 1)):
            raise UserError(f"fnmodel.rank={rank!r} must be a positive integer or a float in (0, 1) "
                            "(a fraction of each layer's full rank) for rosa")
        check_choices(cfg, sample_method=SAMPLE_METHODS, factorize_method=FACTORIZE_METHODS,
                      factorize_level=FACTORIZE_LEVELS, reset_optimizer=RESET_SCOPES,
                      singular_values=SINGULAR_SPLITS, train_biases=BIAS_CHOICES, fused=FUSED_CHOICES)
        freq = cfg.factorize_freq
        if not isinstance(freq, int) or isinstance(freq, bool) or freq < 0:
            raise UserError(f"fnmodel.factorize_freq={freq!r} must be an integer >= 0 (0: never resample)")

    def rank_for(self, module: nn.Module) -> int:
        if isinstance(self.cfg.rank, float):
            return max(1, int(self.cfg.rank * min(layer_shape(module))))
        return int(self.cfg.rank)

    def make_layer(self, name: str, module: nn.Module) -> RosaLayer:
        return RosaLayer(module, self.rank_for(module), self.cfg.dropout)

    def apply(self, model: nn.Module, family: str | None = None) -> nn.Module:
        """Wrap and split. The subspace seed is drawn from torch's global RNG here, so a run
        seeded with `seed` (pipeline.build) picks the same subspaces when it is rebuilt."""
        self.seed = int(torch.randint(0, 2**62, ()))
        model = super().apply(model, family)
        self.resample(model, count=0)
        return model

    def resample(self, model: nn.Module, count: int) -> list[nn.Parameter]:
        """Merge and re-split every ROSA layer along subspaces drawn for resample `count`;
        returns the re-initialised parameters (whose optimizer state is now stale)."""
        generator = torch.Generator().manual_seed(self.seed + count)
        params: list[nn.Parameter] = []
        for _, layer in self.adapter_layers(model):
            layer.factorize(self.cfg, generator)
            params += [layer.rosa_A, layer.rosa_B]
        return params

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """ROSA rewrites the frozen weights of the layers it adapts, so they are saved too."""
        state = super().checkpoint_state(model)
        for name, layer in self.adapter_layers(model):
            state[f"{name}.base_layer.weight"] = layer.base_layer.weight.detach()
        return state

    # ---- trainer hooks --------------------------------------------------------------------------
    def _resample_during_training(self, trainer: Trainer, count: int) -> None:
        start = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = self.resample(model, count)
        if self.cfg.reset_optimizer == "all":  # the original rebuilt its optimizer at each resample
            params = self.optimizer_parameters(model)
        trainer.reset_optimizer_state(params)  # the LR schedule is left as it is
        trainer.logger.scalar("train/factorize_seconds", time.perf_counter() - start, trainer.global_step)

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Resample at the start of epochs freq, 2 freq, ...; not when resuming mid-epoch
        (batches_done > 0), where this epoch's resample already happened before the save."""
        freq = self.cfg.factorize_freq
        if (self.cfg.factorize_level == "epoch" and freq and trainer.batches_done == 0
                and trainer.epoch > 0 and trainer.epoch % freq == 0):
            self._resample_during_training(trainer, trainer.epoch // freq)

    def on_step_end(self, trainer: Trainer) -> None:
        """Resample after optimizer steps freq, 2 freq, ... (not after the last one)."""
        freq, step = self.cfg.factorize_freq, trainer.global_step
        if (self.cfg.factorize_level == "step" and freq and step % freq == 0
                and step < trainer.total_steps):
            self._resample_during_training(trainer, step // freq)
