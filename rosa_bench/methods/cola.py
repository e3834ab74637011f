"""ColA (Diao et al., 2023): collaborative adaptation with gradient learning.

The backbone is frozen and holds no trainable parameter. Each adapted layer computes
h = f(x) + alpha * g(x), where the adapters g (one per user) live on `fnmodel.adapter_device`,
outside the backbone's autograd graph: the forward adds g's output as a fresh leaf tensor whose
gradient hook captures dL/d(alpha g). Every `fnmodel.interval` optimizer steps the adapters are
fitted from the buffered (x, gradient) pairs ("gradient learning"): the gradient of
1/2 ||alpha g(x) - (alpha g(x).detach() - grad)||^2 is exactly the loss's gradient for the
adapter, which the trainer's optimizer then steps like any parameter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from rosa_bench.config import MethodConfig
from rosa_bench.errors import UserError
from rosa_bench.methods.base import AdapterLayer, Method, layer_shape

COLLAB_MODES = ("alone", "col")
NONLINEAR = ("fnmodel.adapter={} has a nonlinear (mlp) adapter: it has no weight delta to merge into the "
             "backbone (mergeable kinds: lowrank, linear)")


@dataclass
class ColaConfig(MethodConfig):
    name: str = "cola"
    alpha: float = 1.0  # h = f(x) + alpha * g(x)
    train_head: bool = False  # the backbone, head included, stays frozen
    adapter: str = "lowrank"  # lowrank | linear | mlp, or a mix like lowrank~linear (users in turn)
    hidden: int = 128  # mlp hidden size
    interval: int = 1  # optimizer steps of captured pairs per adapter step
    users: int = 1  # adapter sets; >1 needs a dataset that names a user per example (dolly)
    collab: str = "alone"  # alone: each example uses its user's adapter; col: the users' mean
    adapter_device: str = "cpu"  # where adapters, their gradients and optimizer state live


class Adapter(nn.Module):
    """An auxiliary model g(x); `delta_weight` is the (out, in) matrix equal to it, if any."""

    kind = ""

    def delta_weight(self) -> torch.Tensor:
        raise UserError(NONLINEAR.format(self.kind))


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
    """g(x) = W x with a zero-initialised full (out, in) matrix."""

    kind = "linear"

    def __init__(self, in_features: int, out_features: int, cfg: ColaConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def delta_weight(self) -> torch.Tensor:
        return self.weight


class Mlp(Adapter):
    """g(x) = W2 gelu(W1 x + b1) + b2; the second layer starts at zero so g starts at zero."""

    kind = "mlp"

    def __init__(self, in_features: int, out_features: int, cfg: ColaConfig):
        super().__init__()
        self.fc1 = nn.Linear(in_features, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, out_features)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


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


class Site:
    """One adapted layer's per-user adapters and the (input, user ids, output gradient) triples
    captured since the last fit. A plain object, not a Module, so moving the backbone never
    moves the adapters and the backbone's parameters never include them."""

    def __init__(self, adapters: nn.ModuleList, routing: Routing):
        self.adapters = adapters
        self.routing = routing
        self.pairs: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    def _users(self, batch_size: int) -> torch.Tensor | None:
        """The batch's user ids; a single id stands for every example (generation)."""
        users = self.routing.users if len(self.adapters) > 1 else None
        if users is not None and users.numel() == 1:
            users = users.expand(batch_size)
        if users is not None and users.shape[0] != batch_size:
            raise UserError(f"cola got {users.shape[0]} user ids for a batch of {batch_size} examples")
        return users

    def output(self, x: torch.Tensor, capture: bool) -> torch.Tensor:
        """alpha * g(x) on x's device; with `capture`, a leaf outside the adapters' graph whose
        gradient is buffered for `fit`."""
        users = self._users(x.shape[0])
        if not capture:
            xa = x.to(self.routing.device, torch.float32)
            return self.routing.mix(self.adapters, xa, users).to(x.device, x.dtype)
        if users is None and len(self.adapters) > 1:
            raise UserError(f"fnmodel.users={len(self.adapters)} needs a user id per training example "
                            "(a 'user' batch field, as dataset=dolly gives); this dataset names none")
        xa = x.detach().to(self.routing.device, torch.float32)
        with torch.no_grad():
            out = self.routing.mix(self.adapters, xa, users)
        leaf = out.to(x.device, x.dtype).requires_grad_(True)
        leaf.register_hook(partial(self._capture, xa, users))
        return leaf

    def _capture(self, x: torch.Tensor, users: torch.Tensor | None, grad: torch.Tensor) -> None:
        self.pairs.append((x, users, grad.detach().to(x.device, torch.float32)))

    def fit(self) -> None:
        """Accumulate each adapter's gradient from its own users' buffered pairs, then forget them."""
        with torch.enable_grad():
            for x, users, grad in self.pairs:
                for k, adapter in enumerate(self.adapters):
                    rows = slice(None) if users is None else (users == k).nonzero().squeeze(1)
                    if users is not None and rows.numel() == 0:
                        continue
                    out = self.routing.alpha * adapter(x[rows])
                    target = out.detach() - grad[rows]
                    (0.5 * (out - target).pow(2).sum()).backward()
        self.pairs.clear()

    def delta_weight(self) -> torch.Tensor:
        return self.routing.alpha * torch.stack([a.delta_weight() for a in self.adapters]).mean(0)


class ColaLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Module, site: Site):
        super().__init__(base_layer)
        self.site = site

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.site.output(x, capture=self.training and torch.is_grad_enabled())

    def delta_weight(self) -> torch.Tensor:
        return self.site.delta_weight().to(self.weight.device)


def _positive_int(key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"fnmodel.{key}={value!r} must be a positive integer for cola")


class ColA(Method):
    name = "cola"
    config_class = ColaConfig

    def __init__(self, cfg: ColaConfig):
        super().__init__(cfg)
        self.kinds = cfg.adapter.split("~")
        self.routing = Routing(cfg.alpha, cfg.collab, torch.device(cfg.adapter_device))
        self.sites: list[Site] = []
        self.steps = 0

    @classmethod
    def check_config(cls, cfg: ColaConfig) -> None:
        for kind in cfg.adapter.split("~"):
            if kind not in ADAPTERS:
                raise UserError(f"fnmodel.adapter={cfg.adapter!r}: unknown kind {kind!r}; choose "
                                f"{', '.join(ADAPTERS)} or a mix joined by '~' (lowrank~linear)")
        if "lowrank" in cfg.adapter.split("~"):
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
        if cfg.train_head or cfg.dropout:
            raise UserError(f"fnmodel.train_head={cfg.train_head!r} / fnmodel.dropout={cfg.dropout!r}: "
                            "cola keeps the whole backbone frozen and has no dropout; set false / 0")

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
        return super().apply(model, family)

    def make_layer(self, name: str, module: nn.Module) -> ColaLayer:
        out_features, in_features = layer_shape(module)
        kinds = [self.kinds[k % len(self.kinds)] for k in range(self.cfg.users)]  # users in turn
        adapters = nn.ModuleList(ADAPTERS[kind](in_features, out_features, self.cfg) for kind in kinds)
        adapters.to(self.routing.device)
        site = Site(adapters, self.routing)
        self.sites.append(site)
        return ColaLayer(module, site)

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
        own = self._named_adapters(model)
        unknown, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
        if unknown or missing:
            raise UserError(f"checkpoint does not match this cola model: unknown {unknown[:3]}, "
                            f"missing {missing[:3]}")
        with torch.no_grad():
            for key, tensor in state.items():
                own[key].copy_(tensor)
