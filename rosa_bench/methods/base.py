"""The method contract: what every PEFT method shares lives here, once.

A method is a `Method` subclass that (usually) wraps each target Linear / GPT-2 Conv1D layer
in an `AdapterLayer` subclass. The base owns target matching, freezing, the classification
head, rank checks, merging, checkpoint state and the trainer hooks; a method file holds only
what is particular to it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rosa_bench.config import FUSED_CHOICES, MethodConfig
from rosa_bench.errors import UserError, choices_error

if TYPE_CHECKING:
    from rosa_bench.train.loop import Trainer

# Top-level modules of HF sequence-classification models that form the task head.
HEAD_NAMES = ("classifier", "score")
FAMILY_OF_MODEL_TYPE = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama",
                        "bert": "bert", "roberta": "roberta"}
METHOD_ATTR = "_rosa_bench_method"
# Every attention and MLP projection per family, for methods whose papers adapt all of them.
ALL_PROJECTIONS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
}
# Per-example batch fields that are not model inputs (ColA's user id): the forward pre-hook that
# `attach` registers pops them before the HF forward and hands them to the attached method.
SIDE_INPUTS = ("user",)
BIAS_CHOICES = ("none", "targets", "all")
_HOOKED_ATTR = "_rosa_bench_side_input_hook"
_FIXED_SIDE_ATTR = "_rosa_bench_fixed_side_inputs"


def model_family(model: nn.Module) -> str:
    """The architecture family that picks default targets ('llama', 'gpt2', 'bert', ...)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return FAMILY_OF_MODEL_TYPE.get(model_type, model_type)


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a Linear or Conv1D (whose weight is stored transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return module.weight.shape[0], module.weight.shape[1]


def is_head(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HEAD_NAMES)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and the RMSNorm classes of HF models (LlamaRMSNorm ...), found by class name."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def pattern_matches(pattern: str, name: str) -> bool:
    """A target pattern is a module-name suffix ('q_proj', 'attn.c_attn') or a full regex."""
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


def find_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the adaptable (Linear/Conv1D, non-head) modules matched by `patterns`.

    Every pattern must match at least one module: a typo must not silently train nothing."""
    candidates = [n for n, m in model.named_modules() if is_adaptable(m) and not is_head(n)]
    matched: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if pattern_matches(pattern, n)]
        if not hits:
            leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
            raise UserError(f"target pattern {pattern!r} matches no Linear/Conv1D module; "
                            f"layer names in this model: {', '.join(leaf_names)}")
        matched.extend(h for h in hits if h not in matched)
    return sorted(matched, key=[n for n, _ in model.named_modules()].index)


def head_linears(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv1D layers of the task head (classifier / score)."""
    return [n for n, m in model.named_modules() if is_adaptable(m) and is_head(n)]


@torch.no_grad()
def truncated_svd(weight: torch.Tensor, rank: int, randomized: bool = False,
                  niter: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets (U (out, r), S (r,), Vh (r, in)) in float32, whatever the
    weight's dtype. `randomized` (Halko et al.) avoids the full SVD of large matrices."""
    w = weight.detach().float()
    if randomized:
        u, s, v = torch.svd_lowrank(w, q=min(rank + 10, *w.shape), niter=niter)
        return u[:, :rank], s[:rank], v[:, :rank].T
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def check_choices(cfg: MethodConfig, **choices: tuple[str, ...]) -> None:
    """Each named option `fnmodel.<key>` must be one of its choices (raises UserError)."""
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise choices_error(f"fnmodel.{key}", getattr(cfg, key), allowed)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _take_side_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    side = {key: kwargs.pop(key) for key in SIDE_INPUTS if key in kwargs}
    side = side or getattr(module, _FIXED_SIDE_ATTR, {})
    method = getattr(module, METHOD_ATTR, None)
    if method is not None:
        method.receive_side_inputs(side)  # also when empty, so no stale ids outlive a batch
    return args, kwargs


def attach(model: nn.Module, method: Method) -> None:
    """Mark `model` as wrapped by `method` and make its forward accept (and route) the side
    inputs, so every dataset's batch can go to every method unchanged."""
    setattr(model, METHOD_ATTR, method)
    if not getattr(model, _HOOKED_ATTR, False):
        model.register_forward_pre_hook(_take_side_inputs, with_kwargs=True)
        setattr(model, _HOOKED_ATTR, True)


@contextmanager
def fixed_side_inputs(model: nn.Module, **side: torch.Tensor) -> Iterator[None]:
    """Side inputs for every forward inside the block that passes none: HF `generate` accepts
    no extra per-example fields, so generation for one user's prompts sets them here."""
    setattr(model, _FIXED_SIDE_ATTR, side)
    try:
        yield
    finally:
        delattr(model, _FIXED_SIDE_ATTR)


class AdapterLayer(nn.Module):
    """A frozen Linear/Conv1D plus a method's trainable update: y = base(x) + update(x).

    Weights are exposed in Linear orientation (out, in) whatever the base stores, so methods
    never special-case GPT-2's transposed Conv1D. `fused` (fnmodel.fused) lets a layer that has
    a fused forward/backward take it (methods/lowrank.py); false forces the unfused path."""

    fused: bool = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = layer_shape(base_layer)
        self.transposed = isinstance(base_layer, Conv1D)
        base_layer.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight as (out, in); a view, so in-place edits reach the base layer."""
        w = self.base_layer.weight
        return w.T if self.transposed else w

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) matrix this adapter adds to the base weight."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.update(x)

    @torch.no_grad()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        self.weight.add_(delta.to(self.weight.dtype))

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the update into the base weight and return the plain base layer."""
        self.add_to_weight(self.delta_weight())
        return self.base_layer


def copy_checked(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model's, refusing any whose shape differs: `copy_`
    would broadcast a damaged or foreign tensor (one of shape [1] fills any weight) silently."""
    wrong = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
             if v.shape != own[k].shape]
    if wrong:
        raise UserError(f"checkpoint tensors do not fit this model: {', '.join(wrong[:3])}")
    with torch.no_grad():
        for name, tensor in state.items():
            own[name].copy_(tensor)


def _subclasses(cls: type) -> set[type]:
    return {sub for direct in cls.__subclasses__() for sub in {direct, *_subclasses(direct)}}


class Method:
    """A PEFT method. Subclasses set `name`, `config_class`, `default_targets` and implement
    `make_layer`; hooks are optional."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Paper defaults per model family: attention query and value projections (LoRA's choice).
    default_targets: ClassVar[dict[str, list[str]]] = {
        "llama": ["q_proj", "v_proj"],
        "gpt2": ["c_attn"],
        "bert": ["query", "value"],
        "roberta": ["query", "value"],
    }
    mergeable: ClassVar[bool] = True
    # Whether its layers have the fused low-rank path (methods/lowrank.py) that fnmodel.fused
    # switches, for some configuration at least (`uses_fused_path` says for which).
    fused_path: ClassVar[bool] = False

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    # ---- configuration -------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: MethodConfig) -> None:
        """Reject bad method options before any model loads (subclasses extend)."""
        rank = cfg.rank
        if cls.uses_rank(cfg) and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise UserError(f"fnmodel.rank={cfg.rank!r} must be a positive integer for {cls.name}")
        check_choices(cfg, train_biases=BIAS_CHOICES, fused=FUSED_CHOICES)
        if cfg.fused != "auto" and not cls.uses_fused_path(cfg):
            with_path = sorted(m.name for m in _subclasses(Method) if m.fused_path)
            raise UserError(f"fnmodel.fused={cfg.fused!r} has no effect on {cls.name} with these options: "
                            f"only {', '.join(with_path)} have a fused path (cola with adapter=lowrank); "
                            "leave it at 'auto'")

    @classmethod
    def uses_fused_path(cls, cfg: MethodConfig) -> bool:
        """Whether fnmodel.fused switches anything for this configuration (`fused_path`, unless
        a method has the path for some configurations only)."""
        return cls.fused_path

    @classmethod
    def uses_rank(cls, cfg: MethodConfig) -> bool:
        """Whether fnmodel.rank means anything for this configuration (checked only then)."""
        return True

    def target_patterns(self, family: str) -> list[str]:
        if self.cfg.targets is not None:
            return list(self.cfg.targets)
        if family not in self.default_targets:
            raise UserError(f"no default targets of {self.name} for model family {family!r} "
                            f"(known: {', '.join(sorted(self.default_targets))}); set fnmodel.targets")
        return list(self.default_targets[family])

    def rank_for(self, module: nn.Module) -> int:
        """The rank this method uses on `module` (subclasses may resolve fractions)."""
        return int(self.cfg.rank)

    def check_layer(self, name: str, module: nn.Module) -> None:
        out_f, in_f = layer_shape(module)
        rank = self.rank_for(module)
        if rank > min(out_f, in_f):
            raise UserError(f"fnmodel.rank={rank} is larger than layer {name} allows "
                            f"(shape {out_f}x{in_f}: rank at most {min(out_f, in_f)})")

    # ---- wrapping ------------------------------------------------------------------------
    def make_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        raise NotImplementedError

    def apply(self, model: nn.Module, family: str | None = None) -> nn.Module:
        """Freeze the model, wrap the target layers, unfreeze the head; returns the model."""
        family = family or model_family(model)
        targets = find_targets(model, self.target_patterns(family))
        for name in targets:
            self.check_layer(name, model.get_submodule(name))
        model.requires_grad_(False)
        for name in targets:
            layer = self.make_layer(name, model.get_submodule(name))
            layer.fused = self.cfg.fused == "auto"
            set_submodule(model, name, layer)
        self.set_head_trainable(model)
        self.set_protocol_trainable(model)
        attach(model, self)
        return model

    def set_head_trainable(self, model: nn.Module) -> None:
        for name, param in model.named_parameters():
            if is_head(name):
                param.requires_grad_(self.cfg.train_head)

    def set_protocol_trainable(self, model: nn.Module) -> None:
        """Unfreeze what an original protocol trains beyond the method itself: the adapted
        layers' biases (train_biases=targets), every bias outside the head (all), norms."""
        for name, module in model.named_modules():
            if is_head(name):
                continue
            if self.cfg.train_norms and is_norm(module):
                module.requires_grad_(True)
            if self.cfg.train_biases == "targets" and isinstance(module, AdapterLayer):
                bias = getattr(module.base_layer, "bias", None)
                if bias is not None:
                    bias.requires_grad_(True)
        if self.cfg.train_biases == "all":
            for name, param in model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias" and not is_head(name):
                    param.requires_grad_(True)

    def adapter_layers(self, model: nn.Module) -> list[tuple[str, AdapterLayer]]:
        return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold every adapter into its base weight; returns a plain model."""
        if not self.mergeable:
            raise UserError(f"method {self.name} cannot be merged into the base weights")
        for name, layer in self.adapter_layers(model):
            set_submodule(model, name, layer.merge())
        if hasattr(model, METHOD_ATTR):
            delattr(model, METHOD_ATTR)
        return model

    # ---- state -----------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint must hold to restore the trained model on top of the base
        model: the trainable parameters and the adapters' own persistent buffers (frozen
        factors, chosen indices); methods that edit frozen weights add those."""
        state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        return state | adapter_buffers(model)

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise UserError(f"checkpoint holds tensors this model lacks: {unknown[:5]}")
        copy_checked(own, state)

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the trainer's optimizer steps (and clips). ColA's adapters live outside the
        backbone, so it names them here."""
        return [p for p in model.parameters() if p.requires_grad]

    def receive_side_inputs(self, side: dict[str, torch.Tensor]) -> None:
        """The batch's SIDE_INPUTS for the forward about to run (empty when it has none)."""

    # ---- trainer hooks (no-ops unless a method needs them) ----------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        """Called once before the first step (after resume)."""

    def on_epoch_start(self, trainer: Trainer) -> None:
        """Called at the start of each epoch."""

    def before_optimizer_step(self) -> None:
        """Called once per optimizer step, after its last micro-batch's backward and before
        clipping and stepping: where gradients computed outside autograd are filled in."""

    def discard_step(self) -> None:
        """Called instead of `before_optimizer_step` when the step is skipped (a non-finite loss
        or gradient under `train.skip_nonfinite`): forget what its backward buffered outside
        autograd, as zero_grad forgets its gradients."""

    def on_step_end(self, trainer: Trainer) -> None:
        """Called after each optimizer step."""


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent buffers that adapter layers own (not their base layer's), by full name."""
    found = {}
    for prefix, layer in model.named_modules():
        if isinstance(layer, AdapterLayer):
            for name, buf in layer.named_buffers(recurse=False):
                if name not in layer._non_persistent_buffers_set:
                    found[f"{prefix}.{name}" if prefix else name] = buf.detach()
    return found


def trainable_parameter_count(model: nn.Module) -> int:
    method = getattr(model, METHOD_ATTR, None)
    params = method.optimizer_parameters(model) if method is not None else \
        [p for p in model.parameters() if p.requires_grad]
    return sum(p.numel() for p in params)


def attached_method(model: nn.Module) -> Method:
    method = getattr(model, METHOD_ATTR, None)
    if method is None:
        raise UserError("this model has no rosa_bench method applied (call rosa_bench.apply first)")
    return method
