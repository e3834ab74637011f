"""The fused low-rank path (methods/lowrank.py) against the unfused one: outputs, input
gradients and every trainable parameter's gradient agree for LoRA, ROSA and LoRA-XS on tiny
GPT-2 (Conv1D), Llama and BERT models, with and without dropout, in float64, float32 and
bfloat16, and after several optimizer steps; and the fused path is taken exactly where it
should be."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rosa_bench
from rosa_bench.errors import UserError
from rosa_bench.methods import attached_method, lowrank
from rosa_bench.methods.lowrank import LowRankLayer
from tests.contract import randomize
from tests.test_config import composed
from tests.test_methods import FAMILIES, inputs, tiny

# method -> (options, marker of the trainable factors randomized so every update is active)
METHODS = {"lora": ({}, "lora_"), "rosa": ({}, "rosa_"), "loraxs": ({"r_init_std": 0.1}, "lora_xs_R")}
# Whole models: each tensor's gap (norm) at most this times the unfused tensor's norm. fp32 gets
# 2e-6: through a whole model fp32 itself strays that far from float64 on either path (GPT-2
# LoRA-XS with dropout: c_attn's bias gradient 1.0e-6 off on the fused path, the worst tensor
# 1.03e-6 off on the unfused one); one layer meets 1e-6 of float64 (test_one_layer_...).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6}
FUSED = lowrank._FusedLowRankLinear


class CountingFused(FUSED):
    """The fused function, counting its forwards."""

    calls = 0

    @staticmethod
    def forward(ctx, *args):  # noqa: ANN001, ANN205 (autograd API)
        CountingFused.calls += 1
        return FUSED.forward(ctx, *args)


@pytest.fixture
def count_fused(monkeypatch: pytest.MonkeyPatch) -> type[CountingFused]:
    monkeypatch.setattr(lowrank, "_FusedLowRankLinear", CountingFused)
    CountingFused.calls = 0
    return CountingFused


def layers(model: nn.Module) -> list[LowRankLayer]:
    return [m for m in model.modules() if isinstance(m, LowRankLayer)]


def make_pair(family: str, method: str, dtype: torch.dtype = torch.float32, biases: str = "targets",
              **options) -> tuple[nn.Module, nn.Module]:
    """(fused, unfused) copies of one wrapped model whose trainable factors are random."""
    extra, marker = METHODS[method]
    fused = rosa_bench.apply(tiny(family), method, rank=4, train_biases=biases, **extra, **options)
    randomize(fused, marker)
    fused.to(dtype)
    unfused = copy.deepcopy(fused)
    for layer in layers(unfused):
        layer.fused = False
    return fused, unfused


def forward_backward(model: nn.Module, family: str, seed: int = 7) -> dict[str, torch.Tensor]:
    """Output, input-embedding gradient and every trainable parameter's gradient of one
    training-mode forward/backward (the seed fixes dropout's masks)."""
    model.train()
    model.zero_grad(set_to_none=True)
    ids = inputs()["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {"output": out.detach(), "input grad": embeds.grad} | grads


def assert_agree(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float,
                 norm: bool = False) -> None:
    """Each tensor's largest gap at most `tol` times its largest magnitude (`norm`: the gap's
    norm at most `tol` times the tensor's norm). A tensor whose exact value is zero (BERT's key
    bias gradient: softmax ignores a shift shared by every key) holds only rounding noise, so
    the scale never drops below 1e-4 of the largest tensor's."""
    assert got.keys() == want.keys()
    measure = torch.linalg.vector_norm if norm else (lambda t: t.abs().max())
    floor = 1e-4 * max(float(measure(t.double())) for t in want.values())
    for name, ref in want.items():
        assert ref is not None and got[name] is not None, name
        gap, scale = measure(got[name].double() - ref.double()), measure(ref.double())
        assert gap <= tol * max(scale, floor), f"{name}: gap {gap:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_matches_unfused(family, method, dropout, dtype, count_fused):
    fused, unfused = make_pair(family, method, dtype, dropout=dropout)
    got = forward_backward(fused, family)
    assert count_fused.calls == len(layers(fused))  # every adapted layer took the fused path
    want = forward_backward(unfused, family)
    assert count_fused.calls == len(layers(fused))  # and the unfused model never did
    assert all(t.abs().max() > 0 for t in want.values())  # every compared tensor is active
    assert_agree(got, want, TOLERANCE[dtype], norm=True)
    frozen = {n for n, p in fused.named_parameters() if not p.requires_grad}
    assert all(dict(fused.named_parameters())[n].grad is None for n in frozen)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_models_are_as_close_to_float64_on_both_paths(family, method, count_fused):
    """Through a whole bf16 model each path's gradients carry 1-4% (norm, per tensor) of bf16
    rounding against the float64 result, the unfused path's as much as the fused one's. So the
    paths are held to 5e-2 per tensor of float64 and of each other, and over all tensors
    together the fused path is no further from float64 than 1.25x the unfused one and within
    3e-2 of it; one layer meets 1e-2 (below)."""
    fused, unfused = make_pair(family, method, dropout=0.2)
    ref = forward_backward(copy.deepcopy(unfused).double(), family)
    got, want = (forward_backward(model.to(torch.bfloat16), family) for model in (fused, unfused))
    assert count_fused.calls == len(layers(fused))
    for pair in ((got, ref), (want, ref), (got, want)):
        assert_agree(*pair, 5e-2, norm=True)
    assert overall_error(got, ref) <= 1.25 * overall_error(want, ref)
    assert overall_error(got, want) <= 3e-2


def overall_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """Norm of every tensor's gap together over the norm of every tensor together."""
    gaps = torch.cat([(got[n].double() - want[n].double()).flatten() for n in want])
    return float(gaps.norm() / torch.cat([t.double().flatten() for t in want.values()]).norm())


def test_dropout_is_active_and_seeded_the_same_on_both_paths():
    """With dropout the outputs differ between seeds (it is on) and agree between paths for
    one seed (the same masks), so the agreement above is not dropout being off."""
    fused, unfused = make_pair("llama", "lora", dropout=0.5)
    first, second = forward_backward(fused, "llama", seed=1), forward_backward(fused, "llama", seed=2)
    assert (first["output"] - second["output"]).abs().max() > 1e-3
    assert_agree(forward_backward(fused, "llama", seed=3), forward_backward(unfused, "llama", seed=3),
                 TOLERANCE[torch.float32])


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_steps_take_the_same_path(family, method):
    """Eight AdamW steps each way from the same init (with dropout; ROSA resamples after the
    fourth, rewriting the frozen weights the fused path reads) end at the same parameters.
    AdamW's normalised steps and ROSA's re-split (singular vectors of nearby singular values
    turn with tiny changes of W) amplify rounding, hence 1e-3 of each tensor's scale. Biases
    stay frozen: GPT-2's key bias has an exact gradient of zero, whose rounding noise AdamW
    would turn into full-size steps on either path."""
    fused, unfused = make_pair(family, method, biases="none", dropout=0.1)
    finals = []
    for model in (fused, unfused):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        for step in range(8):
            opt.zero_grad()
            forward_backward(model, family, seed=step)
            opt.step()
            if method == "rosa" and step == 3:
                attached_method(model).resample(model, count=1)
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    start = dict(make_pair(family, method, biases="none", dropout=0.1)[0].named_parameters())
    moved = max((finals[1][n] - start[n]).abs().max() for n in start)
    assert moved > 1e-2  # training changed the parameters by far more than the gap allowed
    assert_agree(finals[0], finals[1], 1e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("method", list(METHODS))
def test_one_layer_against_float64_and_in_bf16(method, dropout, count_fused):
    """One adapted Linear and one GPT-2 Conv1D: the fp32 fused and unfused paths both sit within
    1e-6 of the float64 result (output, input gradient, bias and factor gradients), and in bf16
    the two paths agree to 1e-2 of each tensor's scale."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    for base in (nn.Linear(48, 96), Conv1D(96, 48)):
        layer = one_layer(base, method, dropout)
        x = torch.randn(2, 33, 48, dtype=torch.float64)
        weights = torch.randn(2, 33, 96, dtype=torch.float64)
        runs = {"ref": (torch.float64, False), "fused": (torch.float32, True),
                "unfused": (torch.float32, False), "fused bf16": (torch.bfloat16, True),
                "unfused bf16": (torch.bfloat16, False)}
        results = {}
        for name, (dtype, fused) in runs.items():
            copied = copy.deepcopy(layer).to(dtype).train()
            copied.fused = fused
            xi = x.to(dtype, copy=True).requires_grad_(True)
            torch.manual_seed(3)
            y = copied(xi)
            (y * weights.to(dtype)).sum().backward()
            results[name] = {"y": y.detach(), "x": xi.grad} | {
                n: p.grad for n, p in copied.named_parameters() if p.requires_grad}
        assert {"y", "x", "base_layer.bias"} < set(results["ref"])
        assert_agree(results["fused"], results["ref"], 1e-6)
        assert_agree(results["unfused"], results["ref"], 1e-6)
        assert_agree(results["fused bf16"], results["unfused bf16"], 1e-2)
    assert count_fused.calls == 4


def one_layer(base: nn.Module, method: str, dropout: float) -> LowRankLayer:
    """`base` wrapped by `method` with random trainable factors and a trainable bias."""
    extra, marker = METHODS[method]
    model = nn.Sequential(base)
    rosa_bench.apply(model, method, rank=4, targets=["0"], train_biases="targets", dropout=dropout, **extra)
    randomize(model, marker)
    return model[0]


@pytest.mark.parametrize("method", list(METHODS))
def test_fused_path_is_taken_in_eval_and_no_grad(method, count_fused):
    fused, unfused = make_pair("gpt2", method)
    with torch.no_grad():
        got, want = (model.eval()(**inputs()).logits for model in (fused, unfused))
    assert count_fused.calls == len(layers(fused))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_fallback_under_autocast(count_fused):
    fused, unfused = make_pair("llama", "lora")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward_backward(fused, "llama")
        want = forward_backward(unfused, "llama")
    assert count_fused.calls == 0
    assert got["output"].dtype == torch.bfloat16
    assert_agree(got, want, 0.0)


def test_fallback_when_switched_off_by_config(count_fused):
    run = composed(["fnmodel=lora", "fnmodel.fused=off"])
    assert run.fnmodel.fused == "off"
    model = rosa_bench.apply(tiny("llama"), "lora", rank=4, fused="off")
    assert not any(layer.fused for layer in layers(model))
    model(**inputs())
    assert count_fused.calls == 0
    with pytest.raises(UserError, match="fnmodel.fused.*auto"):
        composed(["fnmodel=lora", "fnmodel.fused=sometimes"])
    with pytest.raises(UserError, match="fnmodel.fused"):
        rosa_bench.apply(tiny("llama"), "rosa", rank=4, fused="never")


@pytest.mark.parametrize(("method", "options"), [("full", {}), ("rocoft", {"rank": 2}),
                                                 ("cola", {"adapter": "linear"}), ("peft_lora", {"rank": 2})])
def test_switching_off_a_path_a_method_does_not_have_is_refused(method, options):
    only = f"fnmodel.fused='off' has no effect on {method} with these options: only cola, lora, loraxs, rosa"
    with pytest.raises(UserError, match=only):
        rosa_bench.apply(tiny("llama"), method, fused="off", **options)


def test_fallback_for_hooks_trainable_weight_and_linear_subclasses(count_fused):
    model = rosa_bench.apply(tiny("llama"), "lora", rank=4)
    first, second, third = layers(model)[:3]
    seen = []
    first.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    second.base_layer.weight.requires_grad_(True)
    third.base_layer.__class__ = type("QuantizedLinear", (nn.Linear,), {})
    x = torch.randn(2, 5, 32)
    assert [layer.fused_applies(x) for layer in (first, second, third)] == [False, False, False]
    assert layers(model)[3].fused_applies(x)
    assert not layers(model)[3].fused_applies(x.double())  # mixed dtypes
    model(**inputs())
    assert seen and count_fused.calls == len(layers(model)) - 3


def test_fallback_for_backward_hooks_and_global_module_hooks(count_fused):
    """Every hook a base layer would fire on the unfused path fires: its own backward hook,
    and global forward / backward hooks (what FLOP counters and profilers register)."""
    model = rosa_bench.apply(tiny("llama"), "lora", rank=4)
    last = layers(model)[-1]  # its input needs a gradient (the first layer's, from the frozen embedding, not)
    backward_seen, forward_seen = [], []
    last.base_layer.register_full_backward_hook(lambda m, gi, go: backward_seen.append(go[0].shape))
    model(**inputs()).logits.sum().backward()
    assert backward_seen and count_fused.calls == len(layers(model)) - 1
    count_fused.calls = 0
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: forward_seen.append(m) if type(m) is nn.Linear else None)
    try:
        model(**inputs())
    finally:
        handle.remove()
    assert count_fused.calls == 0
    assert {id(layer.base_layer) for layer in layers(model)} <= {id(m) for m in forward_seen}
    model(**inputs())
    assert count_fused.calls == len(layers(model)) - 1  # back to fused once the hook is gone


def test_merged_and_other_methods_take_no_fused_path(count_fused):
    merged = rosa_bench.merge(make_pair("llama", "lora")[0])
    merged(**inputs())
    cola = rosa_bench.apply(tiny("llama"), "cola", rank=4)
    cola(**inputs())
    assert count_fused.calls == 0 and not layers(merged) and not layers(cola)


def test_switching_the_path_does_not_block_a_resume():
    from rosa_bench.resume import config_differences

    stored = {"fnmodel": {"name": "lora", "fused": "auto", "rank": 8}}
    assert config_differences(stored, {"fnmodel": {"name": "lora", "fused": "off", "rank": 8}}) == []
    assert config_differences(stored, {"fnmodel": {"name": "lora", "fused": "off", "rank": 4}})


def test_switching_the_path_keeps_the_run_folder_but_fused_slices_do_not():
    """`fnmodel.fused` is neutral by its exact name: `fnmodel.fused_slices`, which it prefixes,
    changes what trains, so it blocks a resume and names its own folder."""
    from rosa_bench import runs
    from rosa_bench.resume import config_differences

    stored = {"fnmodel": {"name": "lora", "fused": "auto", "fused_slices": [True, False]}}
    swapped = {"fnmodel": {"name": "lora", "fused": "off", "fused_slices": [False, True]}}
    assert config_differences(stored, swapped) == [("fnmodel.fused_slices", [True, False], [False, True])]
    run = composed(["model=tiny-gpt2", "fnmodel=lora"])
    plain = runs.run_name(run, ["fnmodel=lora"])
    assert runs.run_name(run, ["fnmodel=lora", "fnmodel.fused=off"]) == plain
    assert runs.run_name(run, ["fnmodel=lora", "+fnmodel.fused=off"]) == plain
    assert runs.run_name(run, ["fnmodel=lora", "fnmodel.fused_slices=[true,false,true]"]) != plain


def test_lora_fused_slices_take_the_unfused_path(count_fused):
    model = rosa_bench.apply(tiny("gpt2"), "lora", rank=4, fused_slices=[True, False, True])
    randomize(model, "lora_")
    forward_backward(model, "gpt2")
    assert count_fused.calls == 0 and layers(model)
