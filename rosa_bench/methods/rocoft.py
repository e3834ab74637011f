"""RoCoFT (Kowsher et al., 2024): train k rows (mode=row) or k columns (mode=column) of each
target weight, W = W0 + R with R non-zero only on those rows/columns; k = fnmodel.rank.

Efficient by construction: the base weight itself holds W0 + R (only its k chosen slices are
rewritten, at each forward), so a forward is the frozen layer's own product and nothing is
added to its output; backward gives dx as for a frozen layer plus one thin product for R's
gradient. No (out, in) weight is rebuilt and no (out, in) gradient formed; merge() simply
hands back the base layer. Biases stay frozen unless fnmodel.train_biases, so counts are
k * in (rows) or k * out (columns) per layer, as the paper counts them.

Which rows/columns (fnmodel.select): `first`, `random`, or `prune`: a Wanda-style score, the
row's (column's) weight L1 norm times the L2 norm over calibration tokens of the matching
output (input) feature, from real activations captured by forward hooks while whole batches
run through the model. Two options reproduce the original code (Kowsher/RoCoFT):
- `prune_inputs=chained` (RoCoFT.py / leader.py `PEFT_prunig_row/column`): the activations are
  not the network's. The original feeds the embedding output to the first Linear, then each
  Linear, in module order, the previous Linear's output (no attention, norm, residual or
  activation in between); row scores read a layer's output, column scores its input. Here
  the chain starts from the input the first adapted layer receives in a real forward (BERT /
  RoBERTa: the embedding output, as the original's `model.roberta.embeddings(input_ids)`)
  and runs through the adapted layers in module order, the layers the original replaces
  (with its default, every Linear); padding tokens are left out, the original's are not.
  A layer whose input width differs from the previous one's output (GPT-2's c_attn -> c_proj,
  Llama's k/v and MLP projections) cannot be chained: that raises an error.
- `prune_score=signed_sum` (prune_old.py, the repository's prune.py until 2024-09-28): the
  feature statistic is the signed sum of its activations over tokens instead of their L2
  norm (since then the original uses the L2 norm, as our default), so positive and negative
  activations cancel.
Parameter shapes do not depend on which indices are chosen, so the
layers are built at apply() with a placeholder and the trainer's `on_train_start` picks the
indices before the first step; from Python, call `attached_method(model).calibrate(model,
batches)` before training.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rosa_bench.config import MethodConfig
from rosa_bench.errors import UserError
from rosa_bench.methods.base import (
    ALL_PROJECTIONS,
    AdapterLayer,
    Method,
    check_choices,
    is_adaptable,
    is_head,
    layer_shape,
    set_submodule,
)

if TYPE_CHECKING:
    from rosa_bench.train.loop import Trainer

MODES = ("row", "column")
SELECTIONS = ("first", "random", "prune")
PRUNE_SCORES = ("l2", "signed_sum")
PRUNE_INPUTS = ("model", "chained")


@dataclass
class RoCoFTConfig(MethodConfig):
    name: str = "rocoft"
    rank: Any = 1  # k rows or columns per target weight
    mode: str = "row"  # row | column
    select: str = "first"  # first | random | prune
    select_largest: bool = True  # prune: keep the k highest scores (false: the k lowest)
    calib_batches: int = 8  # prune: training batches run through the model to score
    prune_score: str = "l2"  # prune: statistic over tokens: l2 norm | signed_sum (the original's first)
    prune_inputs: str = "model"  # prune: the network's activations | chained (each fed the previous output)
    # Original-code protocol options (Kowsher/RoCoFT); biases: the shared train_biases=targets.
    prune_keep_first: bool = False  # prune: index 0 is always kept (replacing the last chosen one)
    adapt_head: bool = False  # the head's Linear layers and lm_head (untied) become RoCoFT layers too


class _SliceTrainedLinear(torch.autograd.Function):
    """y = x W^T + b, where W already holds W0 + R on the chosen rows (columns). Backward
    returns dx = dy W (as for any frozen layer) and the gradient of R alone: dy[:, rows]^T x
    (dy^T x[:, cols]). Nothing is added in the forward and no (out, in) gradient is formed."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, index, row: bool):  # noqa: ANN001 (autograd API)
        ctx.row, ctx.x_dtype, ctx.delta_dtype = row, x.dtype, delta.dtype
        ctx.save_for_backward(weight, x if row else x.index_select(-1, index), index)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # noqa: ANN205
        weight, seen, index = ctx.saved_tensors
        grad_x = (grad_y @ weight.to(grad_y.dtype)).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        flat_seen = seen.reshape(-1, seen.shape[-1]).to(flat_grad.dtype)
        # Both as (k, tokens) @ (tokens, n): BLAS is several times slower at (n, tokens) @ (tokens, k).
        if ctx.row:
            grad_delta = flat_grad.index_select(1, index).T @ flat_seen
        else:
            grad_delta = (flat_seen.T @ flat_grad).T
        grad_bias = flat_grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_delta.to(ctx.delta_dtype), None, None


class RoCoFTLayer(AdapterLayer):
    """The base weight itself carries W0 + R on the chosen slices (rewritten from the
    trainable `rocoft_delta` and the kept originals at every forward, k slices of work), so a
    forward is the plain base product and merge() has nothing left to add."""

    def __init__(self, base_layer: nn.Module, mode: str, index: torch.Tensor):
        super().__init__(base_layer)
        self.mode = mode
        self.dim = 0 if mode == "row" else 1  # the dimension of the (out, in) weight indexed
        w = self.weight
        self.register_buffer("rocoft_index", index.to(w.device))
        # W0 on the chosen slices, to rebuild W0 + R and to restore W0 when the slices change;
        # not saved: it is the base model's own weight at `rocoft_index`.
        self.register_buffer("rocoft_origin", w.index_select(self.dim, self.rocoft_index).clone(),
                             persistent=False)
        self.rocoft_delta = nn.Parameter(torch.zeros_like(self.rocoft_origin))
        self.needs_calibration = False  # set for select=prune until indices are chosen

    @torch.no_grad()
    def _write_slices(self, values: torch.Tensor) -> None:
        self.weight.index_copy_(self.dim, self.rocoft_index, values.to(self.weight.dtype))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.needs_calibration and self.training:
            raise UserError("rocoft select=prune: call attached_method(model).calibrate(model, batches) "
                            "before training (the trainer does this itself)")
        self._write_slices(self.rocoft_origin + self.rocoft_delta)
        if not (torch.is_grad_enabled() and self.rocoft_delta.requires_grad):
            return self.base_layer(x)
        return _SliceTrainedLinear.apply(x, self.weight, self.base_layer.bias, self.rocoft_delta,
                                         self.rocoft_index, self.mode == "row")

    def delta_weight(self) -> torch.Tensor:
        return torch.zeros_like(self.weight).index_add_(self.dim, self.rocoft_index, self.rocoft_delta)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        self._write_slices(self.rocoft_origin + self.rocoft_delta)
        return self.base_layer

    @torch.no_grad()
    def capture_origin(self) -> None:
        """Keep the base weight's current values on the chosen slices as W0."""
        self.rocoft_origin.copy_(self.weight.index_select(self.dim, self.rocoft_index))

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put W0 back on the current slices (before they change or are reloaded)."""
        self._write_slices(self.rocoft_origin)

    @torch.no_grad()
    def select(self, index: torch.Tensor) -> None:
        """Adopt new rows/columns; the update restarts at zero, so the function is W0's."""
        self.restore_base()
        self.rocoft_index.copy_(index)
        self.capture_origin()
        self.rocoft_delta.zero_()
        self.needs_calibration = False


def feature_statistic(feats: torch.Tensor, score: str) -> torch.Tensor:
    """Per-feature sum over the tokens (rows) of `feats`: of squares (l2) or of the signed
    values (signed_sum); sums over batches add up."""
    feats = feats.reshape(-1, feats.shape[-1]).float()
    return (feats.pow(2) if score == "l2" else feats).sum(0)


def prune_scores(weight: torch.Tensor, feature_sums: torch.Tensor, mode: str,
                 score: str = "l2") -> torch.Tensor:
    """Row (column) L1 norm of `weight` (out, in) times the matching output (input) feature's
    statistic: the L2 norm over tokens (`feature_sums` holds squared sums), or the signed sum."""
    l1 = weight.float().abs().sum(dim=1 if mode == "row" else 0)
    return l1 * (feature_sums.sqrt() if score == "l2" else feature_sums)


class RoCoFT(Method):
    name = "rocoft"
    config_class = RoCoFTConfig
    default_targets = ALL_PROJECTIONS  # the paper adapts every attention and FFN projection

    @classmethod
    def check_config(cls, cfg: RoCoFTConfig) -> None:
        super().check_config(cfg)
        check_choices(cfg, mode=MODES, select=SELECTIONS, prune_score=PRUNE_SCORES, prune_inputs=PRUNE_INPUTS)
        if cfg.calib_batches < 1:
            raise UserError(f"fnmodel.calib_batches={cfg.calib_batches!r} must be > 0")
        if cfg.dropout:
            raise UserError(f"fnmodel.dropout={cfg.dropout!r}: rocoft has no dropout; set it to 0")
        if cfg.adapt_head and cfg.train_head:
            raise UserError("fnmodel.adapt_head=true trains k rows/columns of the head: set "
                            "fnmodel.train_head=false (the whole head would train otherwise)")

    def _size(self, module: nn.Module) -> int:
        """How many rows (columns) the layer has to choose from."""
        out_f, in_f = layer_shape(module)
        return out_f if self.cfg.mode == "row" else in_f

    def check_layer(self, name: str, module: nn.Module) -> None:
        size = self._size(module)
        if self.cfg.rank > size:
            raise UserError(f"fnmodel.rank={self.cfg.rank} is larger than layer {name} allows "
                            f"({self.cfg.mode} mode: at most {size} {self.cfg.mode}s)")

    def make_layer(self, name: str, module: nn.Module) -> RoCoFTLayer:
        size = self._size(module)
        k = min(self.rank_for(module), size)  # only a head can be smaller than k (checked elsewhere)
        index = torch.randperm(size)[:k].sort().values if self.cfg.select == "random" else torch.arange(k)
        layer = RoCoFTLayer(module, self.cfg.mode, index)
        layer.needs_calibration = self.cfg.select == "prune"
        return layer

    def apply(self, model: nn.Module, family: str | None = None) -> nn.Module:
        model = super().apply(model, family)
        if self.cfg.adapt_head:
            self._adapt_head(model)
        return model

    def _adapt_head(self, model: nn.Module) -> None:
        """The original replaces every nn.Linear, the classifier's and lm_head included, so only
        k rows/columns of the head train (the rest stays at its init). A tied lm_head gets its
        own copy of the embedding first, as the original's cloned weights do."""
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight:
            out_emb.weight = nn.Parameter(out_emb.weight.detach().clone(), requires_grad=False)
        names = [n for n, m in model.named_modules()
                 if is_adaptable(m) and (is_head(n) or (out_emb is not None and m is out_emb))]
        for name in names:
            layer = self.make_layer(name, model.get_submodule(name))
            bias = layer.base_layer.bias
            if self.cfg.train_biases != "none" and bias is not None:
                bias.requires_grad_(True)
            set_submodule(model, name, layer)

    # ---- prune selection ----------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> None:
        """Choose every layer's rows/columns by the prune score over `batches` (dicts of model
        inputs), run through the whole model in eval mode; resets the updates to zero."""
        layers = [layer for _, layer in self.adapter_layers(model)]
        for layer in layers:
            layer.select(layer.rocoft_index)  # back to W0, so the scores see the base weights
        sums = {layer: torch.zeros(self._size(layer.base_layer), device=layer.weight.device)
                for layer in layers}
        mask: list[torch.Tensor | None] = [None]

        def real_tokens(feats: torch.Tensor) -> torch.Tensor:
            """(tokens, features) without padding; also where the model flattened batch and
            sequence before the layer (BERT's attention projections)."""
            m, flat = mask[0], feats.reshape(-1, feats.shape[-1])
            return flat[m.reshape(-1)] if m is not None and m.numel() == flat.shape[0] else flat

        def hook(layer: RoCoFTLayer):
            def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
                feats = real_tokens(output if self.cfg.mode == "row" else args[0])
                sums[layer] += feature_statistic(feats, self.cfg.prune_score)
            return record

        def chain(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._chain(layers, real_tokens(args[0]), sums)

        chained = self.cfg.prune_inputs == "chained"
        handles = [layers[0].register_forward_hook(chain)] if chained and layers else \
            [layer.register_forward_hook(hook(layer)) for layer in layers]
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        seen = 0
        try:
            for batch in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                attention = batch.get("attention_mask")
                mask[0] = attention.bool() if attention is not None else None  # skip padding tokens
                model(**batch)
                seen += 1
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        if not seen:
            raise UserError("rocoft select=prune: calibration got no batches")
        for layer in layers:
            scores = prune_scores(layer.weight, sums[layer], self.cfg.mode, self.cfg.prune_score)
            chosen = scores.topk(len(layer.rocoft_index), largest=self.cfg.select_largest).indices
            if self.cfg.prune_keep_first and not (chosen == 0).any():
                chosen[-1] = 0  # the original's column_prune: index 0 replaces the weakest choice
            layer.select(chosen.sort().values)

    def _chain(self, layers: list[RoCoFTLayer], x: torch.Tensor, sums: dict) -> None:
        """prune_inputs=chained: feed `x` (the first layer's real input tokens) through the
        adapted layers' base weights one after another, as the original's calibration does,
        adding each layer's input (column) or output (row) statistic."""
        for layer in layers:
            if x.shape[-1] != layer.in_features:
                raise UserError(f"fnmodel.prune_inputs=chained: a layer with {layer.in_features} inputs "
                                f"follows one with {x.shape[-1]} outputs, so the chain breaks; use "
                                "prune_inputs=model or targets whose widths chain (BERT/RoBERTa)")
            out = layer.base_layer(x)
            sums[layer] += feature_statistic(out if self.cfg.mode == "row" else x, self.cfg.prune_score)
            x = out

    def on_train_start(self, trainer: Trainer) -> None:
        """select=prune: score on the first `calib_batches` shuffled training batches (seeded) of
        the global batch size, so every process scores the same rows, whatever their number.
        A resumed or initialised run keeps the indices its checkpoint restored."""
        if self.cfg.select != "prune" or trainer.global_step > 0:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        if not any(layer.needs_calibration for _, layer in self.adapter_layers(model)):
            return  # indices restored by train.init_from
        global_batch = trainer.run.train.batch_size * trainer.accelerator.num_processes
        loader = DataLoader(trainer.task.splits["train"], batch_size=global_batch,
                            shuffle=True, collate_fn=trainer.task.collate,
                            generator=torch.Generator().manual_seed(trainer.run.seed))
        self.calibrate(model, itertools.islice(loader, self.cfg.calib_batches))
        trainer.reset_optimizer_state([layer.rocoft_delta for _, layer in self.adapter_layers(model)])

    def load_checkpoint_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """W0 comes back on the old slices before the saved ones are read; restored indices
        count as chosen, so a reloaded prune run needs no calibration."""
        layers = [layer for _, layer in self.adapter_layers(model)]
        for layer in layers:
            layer.restore_base()
        super().load_checkpoint_state(model, state)
        for layer in layers:
            layer.capture_origin()
            layer.needs_calibration = False
