"""RoCoFT on tiny random models (GPT-2 Conv1D, Llama, BERT): exact step 0, the row/column
update, merge, gradients, k*in / k*out counts, checkpoints with indices, prune selection on a
hand-built layer and through a real forward, the trainer hook, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rosa_bench
from rosa_bench.errors import UserError
from rosa_bench.methods import attached_method
from rosa_bench.methods.base import trainable_parameter_count
from rosa_bench.methods.rocoft import RoCoFT, RoCoFTLayer
from rosa_bench.pipeline import build, resolve, train
from tests.contract import check_merge_keeps_outputs, check_round_trip, gradient_sets, randomize
from tests.test_config import composed
from tests.test_methods import FAMILIES, inputs, logits, tiny
from tests.test_train import tiny_run

MODES = ["row", "column"]


def layers(model: nn.Module) -> list[RoCoFTLayer]:
    return [m for m in model.modules() if isinstance(m, RoCoFTLayer)]


@pytest.mark.parametrize("select", ["first", "random"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_step_zero_is_exactly_the_base_model(family, mode, select):
    ref = logits(tiny(family))
    wrapped = rosa_bench.apply(tiny(family), "rocoft", rank=3, mode=mode, select=select)
    torch.testing.assert_close(logits(wrapped), ref, atol=0, rtol=0)


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_update_touches_only_the_selected_rows_or_columns(mode, conv1d):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(6, 5) if conv1d else nn.Linear(5, 6)  # both: 5 inputs -> 6 outputs
    layer = RoCoFTLayer(base, mode, torch.tensor([1, 4]))
    w0 = layer.weight.detach().clone()
    nn.init.normal_(layer.rocoft_delta)
    delta = layer.delta_weight()
    other = [i for i in range(delta.shape[0 if mode == "row" else 1]) if i not in (1, 4)]
    untouched = delta[other] if mode == "row" else delta[:, other]
    assert untouched.abs().max() == 0
    assert (delta[[1, 4]] if mode == "row" else delta[:, [1, 4]]).abs().min() > 0
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(layer(x), x @ (w0 + delta).T + base.bias)
    torch.testing.assert_close(layer.update(x), x @ delta.T)
    torch.testing.assert_close(layer.weight, w0 + delta)  # the base weight carries W0 + R


@pytest.mark.parametrize("train_bias", [False, True])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_autograd_through_the_dense_update(mode, conv1d, train_bias):
    """The hand-written backward (dx, dR, db) against autograd on x (W0 + R)^T + b, in float64."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = (Conv1D(6, 5) if conv1d else nn.Linear(5, 6)).double()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = RoCoFTLayer(base, mode, torch.tensor([0, 3]))
    base.bias.requires_grad_(train_bias)
    nn.init.normal_(layer.rocoft_delta)
    delta = layer.rocoft_delta.detach().clone().requires_grad_()
    bias = b0.clone().requires_grad_()
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    weight0 = w0.T if conv1d else w0
    dense = torch.zeros_like(weight0).index_add(0 if mode == "row" else 1, torch.tensor([0, 3]), delta)
    upstream = torch.randn(2, 3, 6, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    ((x_ref @ (weight0 + dense).T + bias) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.rocoft_delta.grad, delta.grad)
    assert (base.bias.grad is not None) == train_bias
    if train_bias:
        torch.testing.assert_close(base.bias.grad, bias.grad)


@pytest.mark.parametrize("mode", MODES)
def test_optimizer_steps_reach_the_base_weight(mode):
    """After AdamW moves R, the next forward (train or eval) computes with W0 + R."""
    torch.manual_seed(0)
    base = nn.Linear(5, 6)
    w0 = base.weight.detach().clone()
    layer = RoCoFTLayer(base, mode, torch.tensor([2, 5] if mode == "row" else [1, 2]))
    optimizer = torch.optim.AdamW([layer.rocoft_delta], lr=0.1)
    x = torch.randn(4, 5)
    for _ in range(2):
        layer(x).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.rocoft_delta.abs().min() > 0
    expected = x @ (w0 + layer.delta_weight()).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_training_step(mode):
    model = rosa_bench.apply(tiny("llama"), "rocoft", rank=2, mode=mode).train()
    randomize(model, "rocoft_delta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs(), labels=inputs()["input_ids"])
    out.loss.backward()
    torch.testing.assert_close(out.logits.float(), logits(model.eval()), atol=0.1, rtol=0.05)
    assert all(m.rocoft_delta.grad.abs().sum() > 0 for m in layers(model))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_outputs(family, mode):
    model = rosa_bench.apply(tiny(family), "rocoft", rank=2, mode=mode, select="random")
    randomize(model, "rocoft_delta")
    check_merge_keeps_outputs(model, family)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_only_selected_slices_and_head_get_gradients(family, mode):
    model = rosa_bench.apply(tiny(family), "rocoft", rank=2, mode=mode)
    randomize(model, "rocoft_delta")
    with_grad, trainable = gradient_sets(model, family)
    assert with_grad == trainable
    assert all(n.endswith("rocoft_delta") or n.startswith("classifier") for n in trainable)
    assert any(n.startswith("classifier") for n in trainable) == (family == "bert")


def test_train_bias_adds_the_target_biases():
    model = rosa_bench.apply(tiny("bert"), "rocoft", rank=2, train_biases="targets", train_head=False)
    with_grad, trainable = gradient_sets(model, "bert")
    assert with_grad == trainable
    biases = {n for n in trainable if n.endswith("base_layer.bias")}
    assert len(biases) == len(layers(model)) == 12  # 6 projections x 2 layers, all with bias


@pytest.mark.parametrize(("mode", "per_layer"), [("row", "k*in"), ("column", "k*out")])
def test_trainable_count_is_k_times_in_or_out(mode, per_layer):
    model = rosa_bench.apply(tiny("llama"), "rocoft", rank=3, mode=mode)
    # (out, in) per layer: q 32x32, k 16x32, v 16x32, o 32x32, gate 48x32, up 48x32, down 32x48
    shapes = [(32, 32), (16, 32), (16, 32), (32, 32), (48, 32), (48, 32), (32, 48)]
    side = 1 if per_layer == "k*in" else 0
    assert len(layers(model)) == 14
    assert trainable_parameter_count(model) == 2 * sum(3 * s[side] for s in shapes)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_checkpoint_round_trip_restores_outputs_and_indices(family, mode):
    def make(seed: int) -> nn.Module:
        base = tiny(family)
        torch.manual_seed(seed)  # another seed picks other random rows/columns
        return rosa_bench.apply(base, "rocoft", rank=2, mode=mode, select="random")

    assert any((a.rocoft_index != b.rocoft_index).any() for a, b in zip(layers(make(0)), layers(make(1))))
    check_round_trip(family, make, "rocoft_delta")


class OneLayer(nn.Module):
    """A hand-built 'model': one projection, inputs given as the batch's `x`."""

    def __init__(self, weight: list[list[float]]):
        super().__init__()
        w = torch.tensor(weight)
        self.proj = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(w)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)


def pruned(weight, batches, mode: str, k: int, largest: bool = True) -> list[int]:
    model = rosa_bench.apply(OneLayer(weight), "rocoft", rank=k, mode=mode, select="prune",
                             select_largest=largest, targets=["proj"])
    attached_method(model).calibrate(model, batches)
    return model.proj.rocoft_index.tolist()


def test_prune_columns_follow_the_wanda_score():
    # column L1 norms [4, 1, 2, 3]; input feature norms over the 2 tokens [0.1, 10, 1, 1]
    # -> scores [0.4, 10, 2, 3]: neither factor alone gives this order
    w = [[2, 1, 1, 1], [-2, 0, 1, 2]]
    x = torch.tensor([[[0.1, 6.0, 0.6, 0.8], [0.0, 8.0, 0.8, 0.6]]])
    assert pruned(w, [{"x": x}], "column", 2) == [1, 3]
    assert pruned(w, [{"x": x}], "column", 2, largest=False) == [0, 2]
    assert pruned(w, [{"x": x}], "column", 1) == [1]


def test_prune_rows_follow_the_wanda_score_over_all_batches():
    # rows L1 [3, 1, 2]; tokens (1, 0) and (0, 2) give outputs (3, 0, 1) and (0, 2, 2):
    # output norms [3, 2, sqrt 5] -> scores [9, 2, 4.47]
    w = [[3, 0], [0, 1], [1, 1]]
    batches = [{"x": torch.tensor([[[1.0, 0.0]]])}, {"x": torch.tensor([[[0.0, 2.0]]])}]
    assert pruned(w, batches, "row", 2) == [0, 2]
    assert pruned(w, batches, "row", 1, largest=False) == [1]
    assert pruned(w, batches[:1], "row", 2) == [0, 2] and pruned(w, batches[:1], "row", 1, False) == [1]


def test_prune_ignores_padding_tokens():
    w = [[1, 1], [1, 1]]
    x = torch.tensor([[[1.0, 0.0], [0.0, 100.0]]])  # the second token is padding
    assert pruned(w, [{"x": x}], "column", 1) == [1]
    masked = {"x": x, "attention_mask": torch.tensor([[1, 0]])}
    assert pruned(w, [masked], "column", 1) == [0]


@pytest.mark.parametrize("mode", MODES)
def test_prune_scores_come_from_a_real_forward_of_the_whole_model(mode):
    model = rosa_bench.apply(tiny("llama"), "rocoft", rank=3, mode=mode, select="prune")
    target = model.model.layers[1].mlp.down_proj  # deep: its input depends on every layer before
    seen = []

    def record(module, args, output):
        seen.append(output if mode == "row" else args[0])

    handle = target.base_layer.register_forward_hook(record)
    batches = [inputs(), {**inputs(), "input_ids": inputs()["input_ids"].flip(0)}]
    attached_method(model).calibrate(model, batches)
    handle.remove()
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in seen])
    l1 = target.weight.abs().sum(dim=1 if mode == "row" else 0)
    expected = (l1 * feats.norm(dim=0)).topk(3).indices.sort().values
    assert target.rocoft_index.tolist() == expected.tolist()
    assert logits(model).equal(logits(tiny("llama")))  # calibration leaves the function unchanged


def test_prune_needs_calibration_before_training_and_checkpoints_keep_it():
    model = rosa_bench.apply(tiny("gpt2"), "rocoft", rank=2, select="prune").train()
    with pytest.raises(UserError, match=r"calibrate\(model, batches\)"):
        model(**inputs())
    method = attached_method(model)
    method.calibrate(model, [inputs()])
    model(**inputs())  # now allowed
    fresh = rosa_bench.apply(tiny("gpt2"), "rocoft", rank=2, select="prune").train()
    attached_method(fresh).load_checkpoint_state(fresh, method.checkpoint_state(model))
    fresh(**inputs())
    assert all(a.rocoft_index.equal(b.rocoft_index) for a, b in zip(layers(fresh), layers(model)))


def test_trainer_calibrates_before_the_first_step_and_not_on_resume(tmp_path, monkeypatch):
    calls = []
    original = RoCoFT.calibrate

    def spy(self, model, batches):
        batches = list(batches)
        calls.append(len(batches))
        original(self, model, batches)

    monkeypatch.setattr(RoCoFT, "calibrate", spy)
    run, overrides = tiny_run(tmp_path, "fnmodel=rocoft", "fnmodel.select=prune", "fnmodel.calib_batches=2",
                              "fnmodel.rank=4", "train.max_steps=2")
    folder = train(run, overrides)
    assert calls == [2]
    saved = load_file(str(folder / "checkpoints/last/model.safetensors"))
    indices = {k: v for k, v in saved.items() if k.endswith("rocoft_index")}
    assert len(indices) == 8 and any(v.tolist() != [0, 1, 2, 3] for v in indices.values())
    parts = build(resolve(run))
    parts.method.load_checkpoint_state(parts.model, saved)
    for name, layer in parts.model.named_modules():
        if isinstance(layer, RoCoFTLayer):
            assert layer.rocoft_index.equal(indices[f"{name}.rocoft_index"])
    parts.method.on_train_start(SimpleNamespace(global_step=2))  # a resumed run keeps its indices
    assert calls == [2]


def test_bad_options_are_clear_errors():
    with pytest.raises(UserError, match=r"unknown fnmodel.mode 'diag'; choose one of: column, row"):
        rosa_bench.apply(tiny("llama"), "rocoft", mode="diag")
    with pytest.raises(UserError, match=r"fnmodel.select 'best'; choose one of: first, prune, random"):
        composed(["fnmodel=rocoft", "fnmodel.select=best"])
    with pytest.raises(UserError, match=r"rank=17 is larger than layer .*k_proj .*row mode: at most 16 rows"):
        rosa_bench.apply(tiny("llama"), "rocoft", rank=17, mode="row", targets=["k_proj"])
    rosa_bench.apply(tiny("llama"), "rocoft", rank=17, mode="column", targets=["k_proj"])  # 32 columns
    with pytest.raises(UserError, match=r"calib_batches=0 must be > 0"):
        composed(["fnmodel=rocoft", "fnmodel.calib_batches=0"])
    with pytest.raises(UserError, match=r"dropout=0.1: rocoft has no dropout"):
        rosa_bench.apply(tiny("llama"), "rocoft", dropout=0.1)


@pytest.mark.slow
def test_real_minilm_prune_calibrates_on_real_sst2_rows(tmp_path):
    overrides = ["model=minilm-l6", "dataset=glue", "dataset.task=sst2", "fnmodel=rocoft",
                 "fnmodel.select=prune", "fnmodel.calib_batches=2", "fnmodel.mode=column",
                 "dataset.max_train_samples=16", "dataset.max_eval_samples=8", "train.batch_size=8",
                 "train.max_steps=1", "logging.progress=false", f"output.path={tmp_path}"]
    folder = train(composed(overrides), overrides[:-1])
    saved = load_file(str(folder / "checkpoints/last/model.safetensors"))
    indices = [v.item() for k, v in saved.items() if k.endswith("rocoft_index")]
    assert len(indices) == 6 * 6 and len(set(indices)) > 1  # one column per projection, not all the first
    metrics = rosa_bench.runs.read_metrics(folder)
    assert metrics["trainable_params"] == 6 * (3 * 384 + 384 + 1536 + 384) + (384 * 2 + 2)
