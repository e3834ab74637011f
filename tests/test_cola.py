"""ColA on tiny random models: gradient learning equals backprop at every step (after several
training steps, at every layer, one user, per-user `alone`, an interval) and the stated relation
under `col`; untrained adapters change nothing, merging, per-user routing (alone) and mean merging (col),
a frozen backbone, adapters outside it, checkpoints, errors, and a short trainer run."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

import rosa_bench
from rosa_bench.errors import UserError
from rosa_bench.methods.base import (
    AdapterLayer,
    attached_method,
    fixed_side_inputs,
    set_submodule,
    trainable_parameter_count,
)
from rosa_bench.methods.cola import ColaLayer
from tests.test_methods import VOCAB, tiny

ALPHA = 0.5


def batch(seed: int, n: int = 3, users: list[int] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 9), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    if users is not None:
        out["user"] = torch.tensor(users)
    return out


def no_dropout(model: nn.Module) -> nn.Module:
    """Training mode (so ColA captures) without randomness, so two models can be compared."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def cola(family: str, layers: int = 2, **options) -> nn.Module:
    return no_dropout(rosa_bench.apply(tiny(family, layers), "cola", rank=4, alpha=ALPHA, **options))


def randomize(model: nn.Module, seed: int = 3) -> None:
    """Zero-initialised adapters would hide routing and merging mistakes; give them values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in attached_method(model).optimizer_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def layers(model: nn.Module) -> list[ColaLayer]:
    return [m for m in model.modules() if isinstance(m, ColaLayer)]


def adapter_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in attached_method(model).optimizer_parameters(model)]


class InGraph(AdapterLayer):
    """The reference: the same adapter inside the backbone's graph, trained by plain backprop."""

    def __init__(self, base_layer: nn.Module, adapter: nn.Module):
        super().__init__(base_layer)
        self.adapter = adapter

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return ALPHA * self.adapter(x)


def in_graph_copy(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of a one-user ColA model with each adapter moved into the graph."""
    ref = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in ref.named_modules() if isinstance(m, ColaLayer)]:
        set_submodule(ref, name, InGraph(layer.base_layer, layer.site.adapters[0]))
    params = [p for m in ref.modules() if isinstance(m, InGraph) for p in m.adapter.parameters()]
    return ref, params


def cola_steps(model: nn.Module, batches: list[dict], lr: float) -> None:
    """What the trainer does: forward, backward, the method's hook, SGD step, per batch."""
    method = attached_method(model)
    opt = torch.optim.SGD(method.optimizer_parameters(model), lr=lr)
    for b in batches:
        model(**b).loss.backward()
        method.before_optimizer_step()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("adapter", ["lowrank", "linear", "mlp", "lowrank~linear"])
def test_untrained_adapters_leave_outputs_unchanged(family, adapter):
    base = no_dropout(tiny(family))
    with torch.no_grad():
        ref = base(**batch(0)).logits
    model = cola(family, adapter=adapter, users=2, collab="col")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(0)).logits, ref, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("adapter", ["lowrank", "linear"])
def test_one_cola_step_equals_one_backprop_step(family, adapter):
    """From the zero-initialised start, as in training (later steps: the tests below)."""
    model = cola(family, adapter=adapter)
    start = adapter_weights(model)
    ref, ref_params = in_graph_copy(model)
    cola_steps(model, [batch(1)], lr=0.1)
    ref(**batch(1)).loss.backward()
    torch.optim.SGD(ref_params, lr=0.1).step()
    assert any(not torch.equal(w, s) for w, s in zip(adapter_weights(model), start))
    for ours, theirs in zip(adapter_weights(model), ref_params, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("adapter", ["lowrank", "linear"])
def test_interval_step_equals_one_step_on_summed_gradients(adapter):
    model = cola("llama", adapter=adapter, interval=3)
    start = adapter_weights(model)
    ref, ref_params = in_graph_copy(model)
    batches = [batch(s) for s in (1, 2, 3)]
    cola_steps(model, batches[:2], lr=0.1)
    for w, s in zip(adapter_weights(model), start):
        torch.testing.assert_close(w, s, atol=0, rtol=0)  # nothing moves inside the interval
    cola_steps(model, batches[2:], lr=0.1)  # counts as step 3: the buffered three are fitted
    for b in batches:
        ref(**b).loss.backward()  # gradients at the same (starting) weights, summed
    torch.optim.SGD(ref_params, lr=0.1).step()
    one_batch, one_params = in_graph_copy(cola("llama", adapter=adapter))
    one_batch(**batches[2]).loss.backward()
    torch.optim.SGD(one_params, lr=0.1).step()
    assert any(not torch.allclose(w, p) for w, p in zip(adapter_weights(model), one_params))
    for ours, theirs in zip(adapter_weights(model), ref_params, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=0)


def _in_graph_output(site, x: torch.Tensor, capture: bool) -> torch.Tensor:
    return site.routing.mix(site.adapters, x.float(), site._users(x.shape[0])).to(x.dtype)


def backprop_reference(model: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of any ColA model (users and routing included) whose adapters sit inside the
    backbone's graph, so that plain backprop gives their gradients (unfused: the fused path
    would bypass the replaced output)."""
    ref = copy.deepcopy(model)
    for layer in layers(ref):
        layer.fused = False
        layer.site.output = partial(_in_graph_output, layer.site)
    return ref, attached_method(ref).optimizer_parameters(ref)


def fitted_gradients(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """The gradients ColA's optimizer would step with after `batches` (one interval)."""
    method = attached_method(model)
    for b in batches:
        model(**b).loss.backward()
        method.before_optimizer_step()
    return [p.grad for p in method.optimizer_parameters(model)]


def trained_cola(adapter: str, users: int, **options) -> tuple[nn.Module, list[list[int] | None]]:
    """A 3-layer ColA model after random non-zero adapters and three training steps, and the
    per-batch user ids to use with it."""
    ids = [[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 1]] if users > 1 else [None] * 6
    model = cola("llama", layers=3, adapter=adapter, users=users, **options)
    randomize(model)
    cola_steps(model, [batch(s, users=u) for s, u in zip((11, 12, 13), ids)], lr=0.1)
    for layer in layers(model):
        for a in layer.site.adapters:
            assert all(p.abs().sum() > 0 for p in a.parameters())  # every adapter is non-zero
    return model, ids[3:]


@pytest.mark.parametrize("adapter", ["lowrank", "linear", "mlp"])
@pytest.mark.parametrize("users, collab", [(1, "alone"), (2, "alone")])
def test_fitted_gradient_equals_backprop_after_several_steps(adapter, users, collab):
    model, ids = trained_cola(adapter, users, collab=collab)
    ref, ref_params = backprop_reference(model)
    b = batch(14, users=ids[0])
    ours = fitted_gradients(model, [b])
    ref(**b).loss.backward()
    assert len(ours) == len(ref_params) and all(g is not None for g in ours)
    for g, p in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


def test_the_adapters_input_path_matters_so_the_test_above_can_fail(monkeypatch):
    """Cut the adapters' path to their input (the old defect): layer 0's gradients move by far
    more than the tolerance, so the equality above is a real check."""
    from rosa_bench.methods.cola import Site

    model, _ = trained_cola("linear", 1)
    ref, ref_params = backprop_reference(model)
    monkeypatch.setattr(Site, "input_gradient", lambda self, x, users, grad: torch.zeros_like(x))
    ours = fitted_gradients(model, [batch(14)])
    ref(**batch(14)).loss.backward()
    first = ours[0]  # layer 0's first adapter: every later layer's adapter path is upstream of it
    assert (first - ref_params[0].grad).norm() > 0.01 * ref_params[0].grad.norm()
    torch.testing.assert_close(ours[-1], ref_params[-1].grad, atol=1e-5, rtol=1e-5)  # the last is unaffected


@pytest.mark.parametrize("adapter", ["lowrank", "linear", "mlp"])
def test_fitted_gradient_over_an_interval_is_backprops_sum(adapter):
    model, _ = trained_cola(adapter, 1, interval=2)  # 3 steps: one fit, and one batch buffered
    method = attached_method(model)
    model(**batch(14)).loss.backward()  # completes the second interval ...
    method.before_optimizer_step()
    torch.optim.SGD(method.optimizer_parameters(model), lr=0.1).step()
    for p in method.optimizer_parameters(model):
        p.grad = None
    ref, ref_params = backprop_reference(model)  # ... so the third starts here, adapters non-zero
    batches = [batch(15), batch(16)]
    ours = fitted_gradients(model, batches)
    for b in batches:
        ref(**b).loss.backward()
    for g, p in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter", ["lowrank~linear", "mlp"])
def test_col_fits_each_user_on_its_own_examples_of_the_mean_forward(adapter):
    """The relation stated in cola.py: under col with K users, user k's fitted gradient is K times
    backprop's gradient of the batch loss restricted to user k's examples (normaliser kept)."""
    users = 2
    model, ids = trained_cola(adapter, users, collab="col")
    ref, _ = backprop_reference(model)
    b = batch(14, users=ids[0])
    ours = fitted_gradients(model, [b])
    logits = ref(**{k: v for k, v in b.items() if k != "labels"}).logits
    ce = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                     reduction="none").view(logits.shape[0], -1)
    with torch.no_grad():
        torch.testing.assert_close(ce.sum() / ce.numel(), model(**b).loss)  # HF's normaliser
    user_of = torch.tensor(ids[0])
    k_params = [[p for layer in layers(ref) for p in layer.site.adapters[k].parameters()]
                for k in range(users)]
    ours_by_user = [[p.grad for layer in layers(model) for p in layer.site.adapters[k].parameters()]
                    for k in range(users)]
    for k in range(users):
        restricted = ce[user_of == k].sum() / ce.numel()
        expected = torch.autograd.grad(restricted, k_params[k], retain_graph=True)
        for g, e in zip(ours_by_user[k], expected, strict=True):
            torch.testing.assert_close(g, users * e, atol=1e-5, rtol=1e-5)
    assert len(ours) == sum(len(p) for p in k_params)


def test_backbone_gets_no_gradients_and_adapters_stay_off_the_backbone():
    model = cola("gpt2", adapter="lowrank~linear", users=2)
    method = attached_method(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert trainable_parameter_count(model) == sum(p.numel() for p in method.optimizer_parameters(model)) > 0
    cola_steps(model, [batch(1, users=[0, 1, 1])], lr=0.1)
    assert all(p.grad is None for p in model.parameters())
    model.to("meta")  # moving the backbone leaves the adapters (and their state) where they are
    assert all(p.device == torch.device("cpu") for p in method.optimizer_parameters(model))
    assert {n for n, _ in model.named_parameters() if "cola" in n or ".A" in n} == set()


def test_alone_routes_each_example_to_its_users_adapter():
    model = cola("llama", adapter="linear", users=2, collab="alone")
    randomize(model)
    with torch.no_grad():
        mixed = model(**batch(0, n=2, users=[0, 1])).logits
        all0 = model(**batch(0, n=2, users=[0, 0])).logits
        all1 = model(**batch(0, n=2, users=[1, 1])).logits
    assert not torch.allclose(all0[1], all1[1])  # the two users' adapters differ
    torch.testing.assert_close(mixed[0], all0[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], all1[1], atol=1e-6, rtol=0)


def test_each_user_is_fitted_only_on_its_own_examples():
    model = cola("llama", adapter="linear", users=2, collab="alone")
    method = attached_method(model)
    model(**batch(1, users=[0, 0, 0])).loss.backward()
    method.before_optimizer_step()
    grads = [[p.grad for p in layer.site.adapters[k].parameters()] for layer in layers(model) for k in (0, 1)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0])
    assert all(g is None for g in grads[1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("adapter", ["lowrank", "linear"])
def test_merge_changes_no_output(family, adapter):
    model = cola(family, adapter=adapter).eval()
    randomize(model)
    with torch.no_grad():
        before = model(**batch(0)).logits
        merged = rosa_bench.merge(model)
        assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
        torch.testing.assert_close(merged(**batch(0)).logits, before, atol=1e-5, rtol=1e-5)


def test_col_merges_the_users_mean_delta():
    model = cola("llama", adapter="lowrank~linear", users=2, collab="col").eval()
    randomize(model)
    first = layers(model)[0]
    low, full = first.site.adapters
    expected = first.weight.detach() + ALPHA * (low.B @ low.A + full.weight).detach() / 2
    with torch.no_grad():
        before = model(**batch(0, users=[0, 1, 1])).logits
        merged = rosa_bench.merge(model)
        torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected)
        torch.testing.assert_close(merged(**batch(0)).logits, before, atol=1e-5, rtol=1e-5)


def test_unmergeable_cases_say_why():
    with pytest.raises(UserError, match="adapter=mlp has a nonlinear"):
        rosa_bench.merge(cola("llama", adapter="mlp"))
    with pytest.raises(UserError, match="collab=col"):
        rosa_bench.merge(cola("llama", adapter="linear", users=2))


def test_mergeable_says_when_one_weight_delta_exists():
    assert attached_method(cola("llama", adapter="lowrank~linear", users=2, collab="col")).mergeable
    assert attached_method(cola("llama", adapter="linear")).mergeable
    assert not attached_method(cola("llama", adapter="linear", users=2, collab="alone")).mergeable
    assert not attached_method(cola("llama", adapter="lowrank~mlp", users=2, collab="col")).mergeable


def test_fixed_side_inputs_route_forwards_that_name_no_user():
    model = cola("llama", adapter="linear", users=2, collab="alone").eval()
    randomize(model)
    with torch.no_grad():
        outputs = []
        for k in (0, 1):
            with fixed_side_inputs(model, user=torch.tensor([k])):
                outputs.append(model(**batch(0)).logits)
            torch.testing.assert_close(outputs[k], model(**batch(0, users=[k] * 3)).logits, atol=1e-6, rtol=0)
    assert not torch.allclose(outputs[0], outputs[1])


def test_generation_answers_each_prompt_with_its_users_adapters():
    from rosa_bench.config import GenerationConfig
    from rosa_bench.generation import generate
    from rosa_bench.models import load_model
    from tests.test_config import composed, resolve

    base, tokenizer, _ = load_model(resolve(composed(["model=tiny-llama"])).model, "causal_lm")
    model = rosa_bench.apply(base, "cola", adapter="linear", users=2, collab="alone", alpha=ALPHA).eval()
    randomize(model, seed=5)
    prompts, users = ["name[a]\n", "food[b]\n", "area[c]\n", "near[d]\n"], [1, 0, 1, 0]
    settings = GenerationConfig(max_new_tokens=6, stop_at_blank_line=False, batch_size=4)
    together = generate(model, tokenizer, prompts, settings, progress=False, users=users)
    one_by_one = [generate(model, tokenizer, [p], settings, progress=False, users=[u])[0]
                  for p, u in zip(prompts, users)]
    assert together == one_by_one and any(together)
    swapped = generate(model, tokenizer, prompts, settings, progress=False, users=[1 - u for u in users])
    assert swapped != together  # the users' adapters differ, and each prompt got its own


def test_checkpoint_round_trip_restores_outputs():
    model = cola("gpt2", adapter="lowrank~mlp", users=2, collab="col").eval()
    randomize(model)
    method = attached_method(model)
    state = method.checkpoint_state(model)
    fresh = cola("gpt2", adapter="lowrank~mlp", users=2, collab="col").eval()
    attached_method(fresh).load_checkpoint_state(fresh, state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch(0)).logits, model(**batch(0)).logits, atol=0, rtol=0)
    with pytest.raises(UserError, match="does not match"):
        attached_method(fresh).load_checkpoint_state(fresh, {**state, "bogus": torch.zeros(1)})


@pytest.mark.parametrize("options, message", [
    ({"adapter": "lowrank~conv"}, "unknown kind 'conv'.*lowrank, linear, mlp"),
    ({"collab": "together"}, "collab='together'.*alone, col"),
    ({"users": 0}, "users=0"),
    ({"interval": -1}, "interval=-1"),
    ({"adapter_device": "gpu9"}, "adapter_device='gpu9'.*cpu, cuda"),
    ({"train_head": True}, "frozen"),
])
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        rosa_bench.apply(tiny("llama"), "cola", **options)


def test_bad_user_ids_are_user_errors():
    model = cola("llama", users=2)
    with pytest.raises(UserError, match=r"users \[0, 5\].*fnmodel.users=2"):
        model(**batch(0, users=[0, 5, 0]))
    with pytest.raises(UserError, match="needs a user id"):
        model(**batch(0))


def test_other_methods_ignore_the_user_field():
    model = rosa_bench.apply(tiny("llama"), "lora", rank=4)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch(0, users=[1, 2, 3])).logits, model(**batch(0)).logits)


@pytest.mark.parametrize("collab", ["alone", "col"])
def test_trainer_fits_each_users_adapters_on_dolly(tmp_path, collab):
    from safetensors.torch import load_file

    from rosa_bench import runs
    from rosa_bench.evaluate import evaluate_run
    from rosa_bench.pipeline import train
    from tests.test_config import composed

    overrides = ["model=tiny-llama", "dataset=dolly", "dataset.max_train_samples=8",
                 "dataset.max_eval_samples=4", "dataset.max_length=256", "fnmodel=cola", "fnmodel.users=8",
                 f"fnmodel.collab={collab}", "fnmodel.adapter='lowrank~linear'", "train.batch_size=4",
                 "train.max_steps=2", "train.lr=0.01", "logging.sample_max_new_tokens=2",
                 "logging.progress=false"]
    folder = train(composed([*overrides, f"output.path={tmp_path}"]), overrides)
    metrics = runs.read_metrics(folder)
    assert metrics["complete"] and metrics["global_step"] == 2 and metrics["method"] == "cola"
    state = load_file(folder / "checkpoints" / "last" / "model.safetensors")
    assert state and all(".cola." in k for k in state)  # adapters only: the backbone is untouched
    moved = {k.split(".cola.")[1].split(".")[0] for k, v in state.items()
             if k.endswith((".B", ".weight")) and v.abs().sum() > 0}
    assert moved and moved <= {str(u) for u in range(8)}
    assert metrics["trainable_params"] == sum(v.numel() for v in state.values())
    # evaluate.py: ROUGE of generated responses; alone keeps one model per user (no merge)
    result = evaluate_run(folder, "validation", "last", max_samples=4, progress=False)
    assert {"rouge1", "rouge2", "rougeL", "loss"} <= set(result["scores"]) and result["metric"] == "rouge"
    assert all((folder / name).is_file() for name in result["files"].values())


def adamw_steps(model: nn.Module, params: list[nn.Parameter], batches: list[dict], interval: int,
                before_step=None) -> None:
    """AdamW steps as the trainer takes them; `before_step` is ColA's hook (None: plain autograd,
    whose gradients then accumulate over the interval and are stepped at its end)."""
    opt = torch.optim.AdamW(params, lr=0.01)
    for i, b in enumerate(batches, start=1):
        model(**b).loss.backward()
        if before_step is not None:
            before_step()
        if before_step is not None or i % interval == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("adapter, interval, checkpointing", [
    ("lowrank", 1, False), ("lowrank", 2, False), ("lowrank", 1, True), ("linear", 1, False),
    ("mlp", 2, False)])
def test_several_adamw_steps_match_plain_autograd(monkeypatch, adapter, interval, checkpointing):
    """Gradients computed in the backward that captures them (by hand in LowRankCapture for a
    one-user low-rank site, by autograd per pair otherwise) and added into .grad at the fit leave
    the same adapters, after several AdamW steps, as plain autograd with the adapters in the graph."""
    from rosa_bench.methods.cola import AdapterOutput, LowRankCapture
    from rosa_bench.models import enable_gradient_checkpointing

    model = cola("llama", layers=3, adapter=adapter, interval=interval)
    randomize(model)
    start = adapter_weights(model)
    ref, ref_params = in_graph_copy(model)
    if checkpointing:
        enable_gradient_checkpointing(model, "tiny-llama")
    calls = {LowRankCapture: 0, AdapterOutput: 0}

    def counted(fn, apply, *args):
        calls[fn] += 1
        return apply(*args)

    for fn in calls:
        monkeypatch.setattr(fn, "apply", partial(counted, fn, fn.apply))
    batches = [batch(s) for s in range(20, 26)]
    method = attached_method(model)
    adamw_steps(model, method.optimizer_parameters(model), batches, interval, method.before_optimizer_step)
    adamw_steps(ref, ref_params, batches, interval)
    paths = (LowRankCapture, AdapterOutput)
    taken, avoided = paths if adapter == "lowrank" else paths[::-1]
    assert calls[taken] > 0 and calls[avoided] == 0
    ours = adapter_weights(model)
    assert all((w - s).abs().max() > 1e-3 for w, s in zip(ours, start))
    for w, p in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(w, p.detach(), atol=1e-6, rtol=0)


def test_the_low_rank_shortcut_leaves_autocast_and_other_devices_to_the_general_path():
    """LowRankCapture does no dtype or device conversion: under autocast, or for an input off
    the adapters' device or dtype, the site takes AdapterOutput's converting path."""
    site = layers(cola("llama", adapter="lowrank"))[0].site
    x = torch.ones(2, 3, site.adapters[0].A.shape[1])
    assert site._lowrank_applies(x)
    assert not site._lowrank_applies(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not site._lowrank_applies(x)
    assert not layers(cola("llama", adapter="lowrank", users=2))[0].site.lowrank


@pytest.mark.parametrize("adapter", ["lowrank", "linear"])
def test_a_skipped_step_leaves_nothing_in_the_next_fit(adapter):
    """train.skip_nonfinite: a skipped step's captured gradients are dropped (discard_step), the
    interval's accepted steps' kept, so the fit equals backprop over the accepted batches only."""
    model, _ = trained_cola(adapter, 1, interval=2)  # 3 steps: one fit, and one batch buffered
    method = attached_method(model)
    model(**batch(14)).loss.backward()  # completes the second interval
    method.before_optimizer_step()
    torch.optim.SGD(method.optimizer_parameters(model), lr=0.1).step()
    for p in method.optimizer_parameters(model):
        p.grad = None
    ref, ref_params = backprop_reference(model)
    model(**batch(15)).loss.backward()
    method.before_optimizer_step()  # first step of the interval: buffered
    model(**batch(16)).loss.backward()
    method.discard_step()  # skipped (as if its loss were NaN)
    ours = fitted_gradients(model, [batch(17)])  # second accepted step: the fit
    for b in (batch(15), batch(17)):
        ref(**b).loss.backward()
    for g, p in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_fused_layer_trains_as_the_separate_adapter_output(monkeypatch, family):
    """A one-user low-rank site fuses the frozen layer into LowRankCapture (its weight passed) at
    every adapted layer, GPT-2's Conv1D included; with `fused` off it adds LowRankCapture's separate
    output instead (weight None). Several AdamW steps leave the same adapters on both paths."""
    from rosa_bench.methods.cola import LowRankCapture

    fused = cola(family, layers=3)
    randomize(fused)
    unfused = copy.deepcopy(fused)
    for layer in layers(unfused):
        layer.fused = False
    took_weight = []
    apply = LowRankCapture.apply

    def counted(x, anchor, site, weight, bias):
        took_weight.append(weight is not None)
        return apply(x, anchor, site, weight, bias)

    monkeypatch.setattr(LowRankCapture, "apply", counted)
    batches = [batch(s) for s in range(30, 34)]
    start = adapter_weights(fused)
    for model in (fused, unfused):
        method = attached_method(model)
        adamw_steps(model, method.optimizer_parameters(model), batches, 1, method.before_optimizer_step)
    calls = len(layers(fused)) * len(batches)
    assert took_weight == [True] * calls + [False] * calls
    assert all((w - s).abs().max() > 1e-3 for w, s in zip(adapter_weights(fused), start))
    for ours, theirs in zip(adapter_weights(fused), adapter_weights(unfused), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_the_fused_layer_leaves_hooks_users_and_the_off_switch_to_the_separate_output():
    """Fused only where the result is the separate path's: not for a hooked base layer, another
    dtype, autocast, several users, or with the switch off."""
    x = torch.randn(2, 3, 32)
    first, second, third = layers(cola("llama"))[:3]
    assert all(layer.fused_applies(x) for layer in (first, second, third))
    first.base_layer.register_forward_hook(lambda module, args, out: None)
    second.fused = False
    assert not first.fused_applies(x) and not second.fused_applies(x)
    assert not third.fused_applies(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not third.fused_applies(x)
    assert not layers(cola("llama", users=2))[0].fused_applies(x)


def test_fused_off_is_accepted_where_a_low_rank_adapter_can_fuse():
    """fnmodel.fused=off switches ColA's low-rank sites to the separate output (linear: refused,
    tests/test_fused.py)."""
    x = torch.randn(2, 3, 32)
    assert not any(layer.fused_applies(x) for layer in layers(cola("llama", fused="off")))
    assert all(layer.fused_applies(x) for layer in layers(cola("llama", fused="auto")))
