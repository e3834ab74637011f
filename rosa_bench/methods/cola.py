"""ColA (Diao et al., 2023): collaborative adaptation with gradient learning.

The backbone is frozen and holds no trainable parameter. Each adapted layer computes
h = f(x) + alpha * g(x), where the adapters g (one per user) live on `fnmodel.adapter_device`,
outside the backbone's autograd graph. `AdapterOutput` adds alpha * g(x) to the backbone's graph
as a function of x alone: its backward passes alpha * g'(x)^T dL/dh on to x (so every earlier
layer sees the adapters' own contribution, as in ordinary backprop) and buffers the pair
(x, dL/d(alpha g)), while the adapters' parameters never enter the backbone's graph. Every
`fnmodel.interval` optimizer steps the adapters are fitted from the buffered pairs ("gradient
learning"): the gradient of 1/2 ||alpha g(x) - (alpha g(x).detach() - grad)||^2 is the loss's
gradient for the adapter, which the trainer's optimizer then steps like any parameter.

Relation to ordinary backprop (tested in tests/test_cola.py at every step, not just the first):
- one user, or `collab=alone` (each example reaches only its own user's adapters): the fitted
  gradient equals backprop's exactly; with `interval` k, it is the sum of backprop's gradients
  over the interval's k batches (the adapters do not move inside an interval).
- `collab=col` with K users: the forward uses the users' mean, alpha/K sum_j g_j(x), but each user
  is fitted on its own examples only (as in the original code), so user k's gradient is
  K * d/d(theta_k) of the loss restricted to user k's examples (the other examples' terms of the
  batch loss dropped, its normaliser kept), not backprop's gradient of the whole batch loss.

Cost: each captured (x, dL/d(alpha g)) pair is turned into the adapters' gradients in the
backward that produced it, not kept until the fit. The gradient needs nothing but the pair and the
adapters' weights, which do not move inside an interval, so the numbers are the same; the pair's
activations are freed at once and no second forward runs at fit time. A one-user low-rank site
(the common case) does it in `LowRankCapture`, in LoRA's fused arithmetic (methods/lowrank.py):
the forward keeps only x and the rank-r A x, the backward computes dx, dA, dB in the thin
(rank, tokens) form. `Site.fit` then only adds the buffered gradients into `.grad`.

`LowRankCapture` also takes the frozen layer itself (`ColaLayer.fused_applies`), as LoRA's fused
path does: alpha B A x is accumulated into the frozen layer's output in place and its input
gradient into the frozen layer's, so no (tokens, out) adapter output and no (tokens, in) gradient
sum is made. The adapters stay where they were: A and B enter only as detached values, their
gradients go to the site's buffer, never to autograd. The layer falls back to the frozen layer's
output plus the site's separate output (`LowRankCapture` without a weight, or `AdapterOutput`)
- outside a capturing forward (eval, no_grad: the adapters' plain forward);
- for several users or another adapter kind (routing and `Site.capture` per user);
- where `Site._lowrank_applies` says no: x off `adapter_device`, not float32, or under autocast;
- where `lowrank.fusable` says no for the base layer: `fnmodel.fused=off`, a Linear subclass or
  hooks on the base layer, another dtype in the frozen weight or bias.
Gradient checkpointing, `interval` and `discard_step` see the same thing on both paths: one
buffered [dA, dB] entry per real backward.

`fnmodel.head_adapter=linear_bias` reproduces the original's RoBERTa GLUE runs
(diaoenmao/ColA-..., src/module/peft/utils/other.py targets `classifier.dense` and
`classifier.out_proj`; src/model/cola.py `make_cola_model` gives every user a zero-initialised
linear adapter with bias there, whatever fnmodel.adapter): the frozen head gets those adapters.

Checkpoints written before the MLP adapter took `mlp_layers` named its two Linears fc1/fc2
(one GELU hidden layer); they load under today's names, hidden.0 / out.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rosa_bench.config import MethodConfig
from rosa_bench.errors import UserError
from rosa_bench.methods.base import (
    AdapterLayer,
    Method,
    check_choices,
    copy_checked,
    head_linears,
    layer_shape,
    set_submodule,
)
from rosa_bench.methods.lowrank import FusedNeeds, fusable, fused_backward, fused_forward

COLLAB_MODES = ("alone", "col")
NONLINEAR = ("fnmodel.adapter={} has a nonlinear (mlp) adapter: it has no weight delta to merge into the "
             "backbone (mergeable kinds: lowrank, linear)")


@dataclass
class ColaConfig(MethodConfig):
    name: str = "cola"
    alpha: float = 1.0  # h = f(x) + alpha * g(x)
    train_head: bool = False  # the backbone, head included, stays frozen
    adapter: str = "lowrank"  # lowrank | linear | mlp, or a mix like lowrank~linear (users in turn)
    hidden: int = 128  # mlp: width of the first hidden layer
    mlp_layers: int = 1  # mlp: hidden layers (the original code: 2)
    mlp_growth: float = 2.0  # mlp: each further hidden layer is this times wider (original: 128, 256)
    mlp_activation: str = "gelu"  # gelu | relu (the original code)
    assign: str = "interleave"  # mixed kinds to users: interleave (0: a, 1: b, 2: a ...) | blocks (a a b b)
    interval: int = 1  # optimizer steps of captured pairs per adapter step
    users: int = 1  # adapter sets; >1 needs a dataset that names a user per example (dolly)
    collab: str = "alone"  # alone: each example uses its user's adapter; col: the users' mean
    adapter_device: str = "cpu"  # where adapters, their gradients and optimizer state live
    head_adapter: str = "none"  # none | linear_bias: the frozen head's Linears get linear adapters with bias


class Adapter(nn.Module):
    """An auxiliary model g(x); `delta_weight` is the (out, in) matrix equal to it, if any."""

    kind = ""

    def delta_weight(self) -> torch.Tensor:
        raise UserError(NONLINEAR.format(self.kind))

    def delta_bias(self) -> torch.Tensor | None:
        """The (out,) vector this adapter adds to the layer's bias, if any."""
        return None


class LowRank(Adapter):
    """g(x) = B A x with hidden size r; B starts at zero so g starts at zero."""

    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, cfg: ColaConfig):
        super().__init__()
        self.A = nn.Parameter(torch.empty(int(cfg.rank), in_features))
        self.B = nn.Parameter(torch.zeros(out_features, int(cfg.rank)))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B)

    def delta_weight(self) -> torch.Tensor:
        return self.B @ self.A


class FullLinear(Adapter):
    """g(x) = W x (+ b) with a zero-initialised full (out, in) matrix (and bias)."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, cfg: ColaConfig, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def delta_weight(self) -> torch.Tensor:
        return self.weight

    def delta_bias(self) -> torch.Tensor | None:
        return self.bias


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}
ASSIGN_ORDERS = ("interleave", "blocks")
HEAD_ADAPTERS = ("none", "linear_bias")
# Parameter names of the MLP adapter before `mlp_layers` (one GELU layer, fc1 -> fc2), after
# the `<layer>.cola.<user>.` prefix (a backbone layer may itself be called fc1).
OLD_MLP_NAME = re.compile(r"(\.cola\.\d+\.)(fc1|fc2)\.")
NEW_MLP_NAMES = {"fc1": "hidden.0", "fc2": "out"}


def mlp_widths(cfg: ColaConfig) -> list[int]:
    """Hidden widths: `hidden`, then each `mlp_growth` times the last (128, 256 for 2 layers)."""
    widths = [cfg.hidden]
    for _ in range(cfg.mlp_layers - 1):
        widths.append(int(widths[-1] * cfg.mlp_growth))
    return widths


class Mlp(Adapter):
    """g(x) = W_out act(... act(W1 x + b1) ...) + b_out; the output layer starts at zero so g
    starts at zero."""

    kind = "mlp"

    def __init__(self, in_features: int, out_features: int, cfg: ColaConfig):
        super().__init__()
        layers: list[nn.Module] = []
        for width in mlp_widths(cfg):
            layers += [nn.Linear(in_features, width), ACTIVATIONS[cfg.mlp_activation]()]
            in_features = width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x))


ADAPTERS: dict[str, type[Adapter]] = {a.kind: a for a in (LowRank, FullLinear, Mlp)}


@dataclass
class Routing:
    """What every adapted layer of one model shares: the scale, the collaboration mode, the
    adapter device, and the current batch's user ids (None: no ids, or a single user)."""

    alpha: float
    collab: str
    device: torch.device
    users: torch.Tensor | None = None

    def mix(self, adapters: nn.ModuleList, x: torch.Tensor, users: torch.Tensor | None) -> torch.Tensor:
        """alpha * g(x): each example's own user's adapter (alone), else the users' mean
        (col, and prompts that name no user)."""
        if users is None or self.collab == "col":
            return self.alpha * torch.stack([a(x) for a in adapters]).mean(0)
        out = None
        for k in users.unique().tolist():
            rows = (users == k).nonzero().squeeze(1)
            y = adapters[k](x[rows])
            out = y.new_zeros((x.shape[0], *y.shape[1:])) if out is None else out
            out = out.index_copy(0, rows, y)
        return self.alpha * out


class AdapterOutput(torch.autograd.Function):
    """alpha * g(x) as a node of the backbone's graph whose only differentiable input is x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, site: Site,
                users: torch.Tensor | None) -> torch.Tensor:
        xa = x.detach().to(site.routing.device, torch.float32)
        with torch.no_grad():
            out = site.routing.mix(site.adapters, xa, users)
        # Saved through autograd, not as a ctx attribute: under gradient checkpointing it is then
        # dropped after the forward and recomputed for the backward like any activation.
        ctx.save_for_backward(xa)
        ctx.site, ctx.users, ctx.x_dtype = site, users, x.dtype
        return out.to(x.device, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        """Runs once per real backward: a checkpointed block's recomputed forward builds a
        graph of its own that is never differentiated, so each (x, grad) pair is captured once."""
        site, (xa,) = ctx.site, ctx.saved_tensors
        grad_a = grad.detach().to(xa.device, torch.float32)
        site.capture(xa, ctx.users, grad_a)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = site.input_gradient(xa, ctx.users, grad_a).to(grad.device, ctx.x_dtype)
        return dx, None, None, None


class LowRankCapture(torch.autograd.Function):
    """`AdapterOutput` and the capture for a one-user low-rank site, by hand, in LoRA's fused
    arithmetic (`lowrank.fused_forward` / `fused_backward`) with the adapter's A, B as the
    factors and alpha as the scale. Given the frozen layer's weight (and bias) it is the whole
    layer, f(x) + alpha B A x, summed in place; without (weight None) alpha B A x alone. In the
    backward, with G = dL/d(alpha g): dx = alpha G B A (added in place into the frozen layer's
    G W), and the fitted gradients dB = alpha G^T (A x), dA = alpha (G B)^T x, exactly what
    autograd through `AdapterOutput.backward` and `Site.capture` gives, are buffered for the fit.
    Only x (the layer's input, no copy) and the rank-r A x are saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor, site: Site, weight: torch.Tensor | None,
                bias: torch.Tensor | None) -> torch.Tensor:
        adapter = site.adapters[0]
        ctx.site = site
        needs = FusedNeeds(x=ctx.needs_input_grad[0], adapter_in=False, bias=False, factors=(True, True))
        return fused_forward(ctx, x.detach(), None, weight, bias, site.routing.alpha,
                             (adapter.A.detach(), adapter.B.detach()), needs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        """Runs once per real backward (see `AdapterOutput.backward`)."""
        dx, _, _, grad_factors = fused_backward(ctx, grad.detach())
        ctx.site.pairs.append(grad_factors)  # [dA, dB], the order of `Site.params`
        return dx, None, None, None, None


class Site:
    """One adapted layer's per-user adapters and the adapters' gradients from each (input, user
    ids, output gradient) triple captured since the last fit. A plain object, not a Module, so
    moving the backbone never moves the adapters and the backbone's parameters never include
    them."""

    def __init__(self, adapters: nn.ModuleList, routing: Routing):
        self.adapters = adapters
        self.routing = routing
        self.params = list(adapters.parameters())
        # AdapterOutput's output needs a grad-requiring input even where x has none (the first
        # adapted layer of a frozen backbone), or its backward, and so the capture, never runs.
        self._anchor = torch.empty(0, requires_grad=True)
        # One entry per captured backward: a gradient (or None) for each of `params`.
        self.pairs: list[list[torch.Tensor | None]] = []
        self.lowrank = len(adapters) == 1 and isinstance(adapters[0], LowRank)

    def _users(self, batch_size: int) -> torch.Tensor | None:
        """The batch's user ids; a single id stands for every example (generation)."""
        users = self.routing.users if len(self.adapters) > 1 else None
        if users is not None and users.numel() == 1:
            users = users.expand(batch_size)
        if users is not None and users.shape[0] != batch_size:
            raise UserError(f"cola got {users.shape[0]} user ids for a batch of {batch_size} examples")
        return users

    def _lowrank_applies(self, x: torch.Tensor) -> bool:
        """`LowRankCapture` computes what `AdapterOutput` does only where no conversion or
        autocast is involved: one low-rank adapter, on x's device, in x's dtype."""
        return (self.lowrank and x.device == self.routing.device and x.dtype == torch.float32
                and not torch.is_autocast_enabled(x.device.type))

    def output(self, x: torch.Tensor, capture: bool) -> torch.Tensor:
        """alpha * g(x) on x's device; with `capture`, through `AdapterOutput` (or its low-rank
        equivalent), which buffers the adapters' gradients for `fit` and keeps their parameters
        out of x's graph."""
        users = self._users(x.shape[0])
        if not capture:
            xa = x.to(self.routing.device, torch.float32)
            return self.routing.mix(self.adapters, xa, users).to(x.device, x.dtype)
        if users is None and len(self.adapters) > 1:
            raise UserError(f"fnmodel.users={len(self.adapters)} needs a user id per training example "
                            "(a 'user' batch field, as dataset=dolly gives); this dataset names none")
        if self._lowrank_applies(x):
            return LowRankCapture.apply(x, self._anchor, self, None, None)
        return AdapterOutput.apply(x, self._anchor, self, users)

    def input_gradient(self, x: torch.Tensor, users: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
        """alpha * g'(x)^T grad: the adapters' path to the layer's input, with respect to x only
        (the adapters' own .grad is left alone: `fit` fills it)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (dx,) = torch.autograd.grad(self.routing.mix(self.adapters, x, users), x, grad)
        return dx

    def capture(self, x: torch.Tensor, users: torch.Tensor | None, grad: torch.Tensor) -> None:
        """Buffer each adapter's gradient of 1/2 ||alpha g(x) - (alpha g(x).detach() - grad)||^2,
        i.e. alpha g'(x)^T grad, over its own users' rows (every row without user ids)."""
        grads: list[torch.Tensor | None] = []
        with torch.enable_grad():
            for k, adapter in enumerate(self.adapters):
                own = list(adapter.parameters())
                rows = slice(None) if users is None else (users == k).nonzero().squeeze(1)
                if users is not None and rows.numel() == 0:
                    grads += [None] * len(own)
                    continue
                out = self.routing.alpha * adapter(x[rows])
                grads += torch.autograd.grad(out, own, grad[rows])
        self.pairs.append(grads)

    def fit(self) -> None:
        """Add the buffered gradients into the adapters' .grad (as backward would), then forget them."""
        for i, param in enumerate(self.params):
            parts = [pair[i] for pair in self.pairs if pair[i] is not None]
            if not parts:
                continue
            total = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            param.grad = total if param.grad is None else param.grad + total
        self.pairs.clear()

    def delta_weight(self) -> torch.Tensor:
        return self.routing.alpha * torch.stack([a.delta_weight() for a in self.adapters]).mean(0)

    def delta_bias(self) -> torch.Tensor | None:
        biases = [a.delta_bias() for a in self.adapters]
        present = [b for b in biases if b is not None]
        if not present:
            return None
        # An adapter without a bias adds zero: the mean is over every user, as delta_weight's.
        return self.routing.alpha * torch.stack(present).sum(0) / len(biases)


class ColaLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, site: Site):
        super().__init__(base_layer)
        self.site = site

    @property
    def capturing(self) -> bool:
        """A training forward whose backward will run: the one that captures gradients."""
        return self.training and torch.is_grad_enabled()

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.site.output(x, capture=self.capturing)

    def fused_applies(self, x: torch.Tensor) -> bool:
        """Whether a capturing forward takes `LowRankCapture` with the frozen layer fused in (the
        module docstring lists when not)."""
        site = self.site
        return site._lowrank_applies(x) and fusable(self, x, (site.adapters[0].A, site.adapters[0].B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """base(x) + alpha g(x): fused for a one-user low-rank site (see `fused_applies`), else
        summed into the frozen layer's fresh output where the two agree in dtype (no autocast):
        a (tokens, out) tensor fewer per layer. The frozen layer's backward does not read its
        output, so the in-place sum is safe for autograd."""
        if self.capturing and self.fused_applies(x):
            return LowRankCapture.apply(x, self.site._anchor, self.site, self.weight, self.base_layer.bias)
        out = self.base_layer(x)
        update = self.update(x)
        if out.dtype != update.dtype or out.shape != update.shape:
            return out + update
        return out.add_(update)

    def delta_weight(self) -> torch.Tensor:
        return self.site.delta_weight().to(self.weight.device)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """The weight delta, and the head adapters' bias delta into the base bias."""
        bias = self.site.delta_bias()
        if bias is not None:
            base = self.base_layer
            if base.bias is None:  # on the layer's device and in its dtype, not the adapters'
                base.bias = nn.Parameter(base.weight.new_zeros(base.weight.shape[0]), requires_grad=False)
            base.bias.add_(bias.to(base.bias.device, base.bias.dtype))
        return super().merge()


def user_kinds(kinds: list[str], users: int, assign: str) -> list[str]:
    """Each user's adapter kind: in turn (interleave) or in contiguous blocks, the original
    code's order (8 users, lowrank~linear: users 0-3 lowrank, 4-7 linear)."""
    if assign == "blocks":
        return [kinds[k * len(kinds) // users] for k in range(users)]
    return [kinds[k % len(kinds)] for k in range(users)]


def _positive_int(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"fnmodel.{key}={value!r} must be a positive integer for cola")


class ColA(Method):
    name = "cola"
    config_class = ColaConfig
    fused_path = True  # one-user low-rank sites only (uses_fused_path)

    def __init__(self, cfg: ColaConfig):
        super().__init__(cfg)
        self.kinds = cfg.adapter.split("~")
        self.routing = Routing(cfg.alpha, cfg.collab, torch.device(cfg.adapter_device))
        self.sites: list[Site] = []
        self.steps = 0
        self._kept: list[int] = []  # each site's buffered gradients after the last accepted step

    @classmethod
    def uses_rank(cls, cfg: ColaConfig) -> bool:
        return "lowrank" in cfg.adapter.split("~")

    @classmethod
    def uses_fused_path(cls, cfg: ColaConfig) -> bool:
        """A one-user low-rank site fuses the frozen layer in (`ColaLayer.fused_applies`): the
        configurations with a low-rank kind, the same that have a rank."""
        return cls.uses_rank(cfg)

    @classmethod
    def check_config(cls, cfg: ColaConfig) -> None:
        for kind in cfg.adapter.split("~"):
            if kind not in ADAPTERS:
                raise UserError(f"fnmodel.adapter={cfg.adapter!r}: unknown kind {kind!r}; choose "
                                f"{', '.join(ADAPTERS)} or a mix joined by '~' (lowrank~linear)")
        super().check_config(cfg)
        for key in ("hidden", "interval", "users"):
            _positive_int(key, getattr(cfg, key))
        if cfg.collab not in COLLAB_MODES:
            raise UserError(f"fnmodel.collab={cfg.collab!r} is not allowed; choose one of: "
                            f"{', '.join(COLLAB_MODES)}")
        try:
            torch.device(cfg.adapter_device)
        except RuntimeError:
            raise UserError(f"fnmodel.adapter_device={cfg.adapter_device!r} is not a device; "
                            "choose cpu, cuda or cuda:<index>") from None
        if cfg.train_head or cfg.dropout or cfg.train_biases != "none" or cfg.train_norms:
            raise UserError(f"fnmodel.train_head={cfg.train_head!r} / dropout={cfg.dropout!r} / train_biases="
                            f"{cfg.train_biases!r} / train_norms={cfg.train_norms!r}: cola keeps the whole "
                            "backbone frozen and has no dropout; set false / 0 / none / false")
        check_choices(cfg, mlp_activation=tuple(ACTIVATIONS), assign=ASSIGN_ORDERS,
                      head_adapter=HEAD_ADAPTERS)
        _positive_int("mlp_layers", cfg.mlp_layers)
        if cfg.mlp_growth <= 0:
            raise UserError(f"fnmodel.mlp_growth={cfg.mlp_growth!r} must be > 0")

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        """One weight delta exists only for linear kinds and, with several users, under col."""
        return "mlp" not in self.kinds and (self.cfg.collab == "col" or self.cfg.users == 1)

    def check_layer(self, name: str, module: nn.Module) -> None:
        if "lowrank" in self.kinds:
            super().check_layer(name, module)

    def apply(self, model: nn.Module, family: str | None = None) -> nn.Module:
        device = self.routing.device
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f"fnmodel.adapter_device={self.cfg.adapter_device!r} is not reachable from "
                            f"process {os.environ.get('RANK', '0')}, which sees {torch.cuda.device_count()} "
                            "CUDA device(s); use fnmodel.adapter_device=cpu, or cuda (each process's GPU)")
        model = super().apply(model, family)
        if self.cfg.head_adapter == "linear_bias":
            self._adapt_head(model)
        return model

    def _layer(self, module: nn.Module, adapters: list[Adapter]) -> ColaLayer:
        site = Site(nn.ModuleList(adapters).to(self.routing.device), self.routing)
        self.sites.append(site)
        return ColaLayer(module, site)

    def make_layer(self, name: str, module: nn.Module) -> ColaLayer:
        out_features, in_features = layer_shape(module)
        kinds = user_kinds(self.kinds, self.cfg.users, self.cfg.assign)
        return self._layer(module, [ADAPTERS[kind](in_features, out_features, self.cfg) for kind in kinds])

    def _adapt_head(self, model: nn.Module) -> None:
        """head_adapter=linear_bias: each Linear of the (frozen) task head gets, for every user,
        a zero-initialised linear adapter with bias, as the original's RoBERTa GLUE runs."""
        names = head_linears(model)
        if not names:
            raise UserError("fnmodel.head_adapter=linear_bias: this model has no classification head "
                            "(classifier / score); set fnmodel.head_adapter=none")
        for name in names:
            module = model.get_submodule(name)
            out_features, in_features = layer_shape(module)
            adapters = [FullLinear(in_features, out_features, self.cfg, bias=True)
                        for _ in range(self.cfg.users)]
            set_submodule(model, name, self._layer(module, adapters))

    def _named_adapters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{name}.cola.{key}": tensor for name, layer in self.adapter_layers(model)
                for key, tensor in layer.site.adapters.state_dict().items()}

    def optimizer_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in self.adapter_layers(model) for p in layer.site.adapters.parameters()]

    def receive_side_inputs(self, side: dict[str, torch.Tensor]) -> None:
        users = side.get("user")
        if users is None or self.cfg.users == 1:
            self.routing.users = None
            return
        users = users.to(self.routing.device, torch.long).view(-1)
        if users.numel() and (int(users.min()) < 0 or int(users.max()) >= self.cfg.users):
            raise UserError(f"the batch names users {sorted(set(users.tolist()))} but fnmodel.users="
                            f"{self.cfg.users} allows 0..{self.cfg.users - 1}; set fnmodel.users to the "
                            "dataset's number of users (dolly: 8)")
        self.routing.users = users

    def on_train_start(self, trainer) -> None:
        self.steps = trainer.global_step  # a resumed run keeps its interval phase

    def before_optimizer_step(self) -> None:
        self.steps += 1
        if self.steps % self.cfg.interval == 0:
            for site in self.sites:
                site.fit()
        self._kept = [len(site.pairs) for site in self.sites]

    def discard_step(self) -> None:
        """Drop the skipped step's captured gradients; the interval's earlier steps' stay."""
        for site, count in zip(self.sites, self._kept or [0] * len(self.sites), strict=True):
            del site.pairs[count:]

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the (mean, under col) delta into the base weights; lowrank/linear only."""
        if self.cfg.collab == "alone" and self.cfg.users > 1:
            raise UserError(f"fnmodel.collab=alone with fnmodel.users={self.cfg.users} keeps one model per "
                            "user: there is no single weight to merge; use fnmodel.collab=col")
        if "mlp" in self.kinds:
            raise UserError(NONLINEAR.format(self.cfg.adapter))
        return super().merge(model)

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._named_adapters(model).items()}

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        state = self._renamed_old_mlp(state)
        own = self._named_adapters(model)
        unknown, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
        if unknown or missing:
            raise UserError(f"checkpoint does not match this cola model: unknown {unknown[:3]}, "
                            f"missing {missing[:3]}")
        copy_checked(own, state)

    def _renamed_old_mlp(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keys of MLP adapters saved as fc1/fc2 under today's names. Those checkpoints hold
        one GELU hidden layer, so only that shape can take them."""
        if not any(OLD_MLP_NAME.search(key) for key in state):
            return state
        if self.cfg.mlp_layers != 1 or self.cfg.mlp_activation != "gelu":
            raise UserError(f"this checkpoint's ColA mlp adapters use the old fc1/fc2 names (one GELU hidden "
                            f"layer) but fnmodel.mlp_layers={self.cfg.mlp_layers} "
                            f"mlp_activation={self.cfg.mlp_activation}; "
                            "set fnmodel.mlp_layers=1 fnmodel.mlp_activation=gelu to load it")
        return {OLD_MLP_NAME.sub(lambda m: f"{m[1]}{NEW_MLP_NAMES[m[2]]}.", key): tensor
                for key, tensor in state.items()}
