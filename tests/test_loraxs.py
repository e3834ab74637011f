"""LoRA-XS on tiny random models (GPT-2 Conv1D, Llama, BERT): the SVD factors, step-0
function, merge, gradients, r^2 counts, checkpoints, options and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rosa_bench
from rosa_bench.errors import UserError
from rosa_bench.methods.base import AdapterLayer, trainable_parameter_count, truncated_svd
from rosa_bench.methods.loraxs import LoraXSConfig, LoraXSLayer
from tests.contract import check_merge_keeps_outputs, check_round_trip, gradient_sets, randomize
from tests.test_config import composed
from tests.test_methods import FAMILIES, logits, tiny


def layers(model: nn.Module) -> list[LoraXSLayer]:
    return [m for m in model.modules() if isinstance(m, LoraXSLayer)]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_init_is_exactly_the_base_model(family):
    ref = logits(tiny(family))
    wrapped = rosa_bench.apply(tiny(family), "loraxs", rank=4, r_init_std=0.0)
    torch.testing.assert_close(logits(wrapped), ref, atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_init_changes_outputs_only_at_the_init_scale(family):
    ref = logits(tiny(family))
    gaps = {std: (logits(rosa_bench.apply(tiny(family), "loraxs", rank=4, r_init_std=std)) - ref).abs().max()
            for std in (1e-5, 1e-2)}
    assert 0 < gaps[1e-5] < 1e-3
    assert gaps[1e-2] > 100 * gaps[1e-5]  # the gap is driven by R's scale, nothing else
    r = torch.cat([m.lora_xs_R.flatten() for m in layers(rosa_bench.apply(tiny(family), "loraxs", rank=4))])
    assert 0.5e-5 < r.std() < 2e-5 and abs(r.mean()) < 1e-5


def test_svd_factors_are_the_best_rank_r_approximation():
    model = rosa_bench.apply(tiny("llama"), "loraxs", rank=4, r_init_std=0.0)
    for layer in layers(model):
        b, a, w = layer.lora_xs_B, layer.lora_xs_A, layer.weight
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)  # B = U_r: orthonormal
        torch.testing.assert_close(a @ a.T, torch.diag(s[:4] ** 2), atol=1e-5, rtol=1e-5)  # A = S_r V_r^T
        torch.testing.assert_close(b @ a, u[:, :4] @ torch.diag(s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)
        assert not b.requires_grad and not a.requires_grad


def test_randomized_svd_matches_exact_on_a_low_rank_matrix():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(60, 5, generator=g) @ torch.randn(5, 40, generator=g)
    exact = truncated_svd(w, 5)
    fast = truncated_svd(w, 5, randomized=True)
    torch.testing.assert_close(fast[1], exact[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(fast[0] * fast[1] @ fast[2], w, atol=1e-3, rtol=1e-4)
    model = rosa_bench.apply(tiny("bert"), "loraxs", rank=3, svd="randomized", r_init_std=0.0)
    for layer in layers(model):
        _, s, _ = torch.linalg.svd(layer.weight, full_matrices=False)
        torch.testing.assert_close(torch.linalg.svdvals(layer.lora_xs_A), s[:3], atol=0.05, rtol=0.05)


def test_update_is_scaled_b_r_a_and_matches_delta_weight():
    torch.manual_seed(0)
    cfg = LoraXSConfig(alpha=6.0, r_init_std=0.3)
    layer = LoraXSLayer(nn.Linear(7, 5).double(), rank=3, cfg=cfg)
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    expected = 2.0 * (layer.lora_xs_B @ layer.lora_xs_R @ layer.lora_xs_A)  # alpha / r = 2
    torch.testing.assert_close(layer.delta_weight(), expected)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ expected.T)
    r = layer.lora_xs_R.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda r: (x @ (layer.lora_xs_B @ r @ layer.lora_xs_A).T).sum(), (r,))


def test_random_init_uses_frozen_kaiming_uniform_factors():
    model = rosa_bench.apply(tiny("llama"), "loraxs", rank=4, init="random")
    for layer in layers(model):
        b, a = layer.lora_xs_B, layer.lora_xs_A
        assert b.abs().max() <= 4 ** -0.5 and a.abs().max() <= layer.in_features ** -0.5  # 1/sqrt(fan_in)
        assert (b.T @ b - torch.eye(4)).abs().max() > 0.05  # not the SVD's orthonormal U


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_keeps_outputs(family):
    model = rosa_bench.apply(tiny(family), "loraxs", rank=4)
    randomize(model, "lora_xs_R")
    check_merge_keeps_outputs(model, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_r_and_head_get_gradients(family):
    model = rosa_bench.apply(tiny(family), "loraxs", rank=2)
    randomize(model, "lora_xs_R")
    with_grad, trainable = gradient_sets(model, family)
    assert with_grad == trainable
    assert all(n.endswith("lora_xs_R") or n.startswith("classifier") for n in trainable)
    assert any(n.startswith("classifier") for n in trainable) == (family == "bert")


@pytest.mark.parametrize(("family", "per_layer"), [("llama", 7), ("bert", 4), ("gpt2", 3)])
def test_default_targets_and_count_is_r_squared_per_matrix(family, per_layer):
    model = rosa_bench.apply(tiny(family), "loraxs", rank=3)
    head = 32 * 3 + 3 if family == "bert" else 0  # BERT classifier: 32 -> 3 with bias
    assert len(layers(model)) == 2 * per_layer
    assert trainable_parameter_count(model) == 2 * per_layer * 3 ** 2 + head
    if family == "bert":
        names = {n.split("layer.0.")[-1] for n, m in model.named_modules()
                 if isinstance(m, AdapterLayer) and "layer.0." in n}
        assert names == {"attention.self.query", "attention.self.value", "attention.output.dense",
                         "output.dense"}


@pytest.mark.parametrize("init", ["svd", "random"])
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_checkpoint_round_trip_restores_outputs(family, init):
    def make(seed: int) -> nn.Module:
        base = tiny(family)
        torch.manual_seed(seed)  # init=random: another seed draws other frozen factors
        return rosa_bench.apply(base, "loraxs", rank=4, init=init)

    if init == "random":
        assert not layers(make(0))[0].lora_xs_B.equal(layers(make(1))[0].lora_xs_B)
    check_round_trip(family, make, "lora_xs_R")
    model = make(0)
    keys = rosa_bench.methods.attached_method(model).checkpoint_state(model).keys()
    assert {k.rsplit(".", 1)[-1] for k in keys} >= {"lora_xs_A", "lora_xs_B", "lora_xs_R"}


def test_bad_options_are_clear_errors():
    with pytest.raises(UserError, match=r"unknown fnmodel.init 'qr'; choose one of: random, svd"):
        rosa_bench.apply(tiny("llama"), "loraxs", init="qr")
    with pytest.raises(UserError, match=r"unknown fnmodel.svd 'fast'; choose one of: exact, randomized"):
        composed(["fnmodel=loraxs", "fnmodel.svd=fast"])
    with pytest.raises(UserError, match=r"r_init_std=-1.0 must be >= 0"):
        rosa_bench.apply(tiny("llama"), "loraxs", r_init_std=-1.0)
    with pytest.raises(UserError, match=r"rank=40 is larger than layer .*at most"):
        rosa_bench.apply(tiny("llama"), "loraxs", rank=40)


def test_config_composes_with_paper_defaults():
    run = composed(["fnmodel=loraxs"])
    assert (run.fnmodel.init, run.fnmodel.r_init_std, run.fnmodel.svd) == ("svd", 1e-5, "exact")
    model = rosa_bench.apply(copy.deepcopy(tiny("llama")), "loraxs", rank=2, targets=["q_proj"])
    assert len(layers(model)) == 2


@pytest.mark.slow
def test_real_minilm_paper_targets_counts_and_merge():
    from rosa_bench.models import load_model, resolve_model_config

    cfg = resolve_model_config(composed(["model=minilm-l6"]).model, "minilm-l6")
    base, _, _ = load_model(cfg, "classification", num_labels=2)
    ids = torch.randint(100, 1000, (2, 16))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        model = rosa_bench.apply(copy.deepcopy(base), "loraxs", rank=8, r_init_std=0.0)
        torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=0, rtol=0)
        assert trainable_parameter_count(model) == 6 * 4 * 8 ** 2 + (384 * 2 + 2)
        randomize(model, "lora_xs_R", scale=1e-3)
        wrapped = model(input_ids=ids).logits
        assert (wrapped - ref).abs().max() > 1e-4
        merged = rosa_bench.merge(model)(input_ids=ids).logits
        torch.testing.assert_close(merged, wrapped, atol=1e-5, rtol=1e-4)
