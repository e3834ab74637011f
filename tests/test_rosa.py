"""ROSA: the SVD split keeps the function, resampling keeps it too while moving the trainable
subspace, checkpoints restore edited residual weights, and the real Trainer resamples as
often as configured with a fresh optimizer state and an unbroken LR schedule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import rosa_bench
from rosa_bench import runs
from rosa_bench.errors import UserError
from rosa_bench.methods import attached_method
from rosa_bench.methods.base import AdapterLayer, Method, trainable_parameter_count
from rosa_bench.methods.rosa import ROSA, RosaLayer, pick_directions
from rosa_bench.pipeline import resolve, run_folder, train
from tests.test_methods import FAMILIES, inputs, logits, tiny
from tests.test_train import Crash, tags, tiny_run

FACTORIZE = ["equal", "add", "random"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: LAPACK's threading only adds synchronisation, which on a loaded machine
    makes a 96x32 SVD take a second instead of a millisecond."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rosa(family: str, **options) -> torch.nn.Module:
    torch.manual_seed(3)
    return rosa_bench.apply(tiny(family), "rosa", **{"rank": 4, **options})


def layers(model: torch.nn.Module) -> list[RosaLayer]:
    return [m for m in model.modules() if isinstance(m, RosaLayer)]


def perturb(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Stand in for training: move every factor (and B away from zero)."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in layers(model):
            for p in (layer.rosa_A, layer.rosa_B):
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sample", ["random", "top", "bottom"])
def test_equal_split_keeps_the_function_and_trains_singular_directions(family, sample):
    base = tiny(family)
    model = rosa(family, sample_method=sample, factorize_method="equal")
    torch.testing.assert_close(logits(model), logits(base), atol=1e-5, rtol=0)
    for layer in layers(model):
        a, b = layer.rosa_A, layer.rosa_B
        assert b.abs().max() > 0 and a.abs().max() > 0
        # The residual is orthogonal to the trainable directions on both sides.
        assert (layer.weight @ a.T).abs().max() < 1e-4
        assert (b.T @ layer.weight).abs().max() < 1e-4


@pytest.mark.parametrize("how", ["add", "random"])
def test_add_and_random_start_with_zero_effect_on_the_whole_weight(how):
    base = tiny("llama")
    model = rosa("llama", factorize_method=how)
    torch.testing.assert_close(logits(model), logits(base), atol=0, rtol=0)
    for layer in layers(model):
        assert layer.rosa_B.abs().max() == 0 and layer.rosa_A.abs().max() > 0


def test_sample_methods_pick_the_named_directions():
    g = torch.Generator().manual_seed(0)
    assert pick_directions("top", 3, 10, g).tolist() == [0, 1, 2]
    assert pick_directions("bottom", 3, 10, g).tolist() == [7, 8, 9]
    starts = {pick_directions("random", 3, 10, g)[0].item() for _ in range(200)}
    assert starts == set(range(8))  # every contiguous block, the last one included
    model = rosa("llama", sample_method="top", targets=["q_proj"])
    layer = layers(model)[0]
    s = torch.linalg.svdvals(layer.weight + layer.delta_weight())
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:4], s[:4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_changes_no_output_and_gives_a_plain_model(family):
    model = rosa(family)
    perturb(model, scale=0.5)
    before = logits(model)
    assert (before - logits(tiny(family))).abs().max() > 1e-3  # the factors matter
    merged = rosa_bench.merge(model)
    torch.testing.assert_close(logits(merged), before, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    plain = sorted(n for n, _ in tiny(family).named_parameters())
    assert sorted(n for n, _ in merged.named_parameters()) == plain


@pytest.mark.parametrize("family", FAMILIES)
def test_only_rosa_factors_and_head_get_gradients(family):
    model = rosa(family, rank=2)
    labels = torch.tensor([0, 1, 2]) if family == "bert" else inputs()["input_ids"]
    model(**inputs(), labels=labels).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all("rosa_" in n or n.startswith("classifier") for n in trainable)
    assert any(n.startswith("classifier") for n in trainable) == (family == "bert")


def test_trainable_count_is_r_times_in_plus_out_and_fractions_use_full_rank():
    model = rosa("llama", targets=["q_proj", "v_proj"])
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8), two layers
    assert trainable_parameter_count(model) == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    frac = rosa("llama", rank=0.25, targets=["q_proj", "v_proj"])  # q: 0.25*32 = 8, v: 0.25*16 = 4
    assert trainable_parameter_count(frac) == 2 * (8 * (32 + 32) + 4 * (32 + 16))


def test_default_targets_follow_the_paper_per_family():
    def wrapped(model):
        return [n for n, m in model.named_modules() if isinstance(m, RosaLayer)]

    gpt2 = wrapped(rosa("gpt2"))
    assert gpt2 == [f"transformer.h.{i}.{p}" for i in range(2)
                    for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    bert = wrapped(rosa("bert"))
    assert bert == [f"bert.encoder.layer.{i}.attention.{p}" for i in range(2)
                    for p in ("self.query", "self.key", "self.value", "output.dense")]
    layer = rosa("gpt2").transformer.h[0].attn.c_attn
    assert layer.rosa_A.shape == (4, 32) and layer.rosa_B.shape == (96, 4)


@pytest.mark.parametrize("how", FACTORIZE)
def test_resample_keeps_outputs_and_moves_the_trainable_subspace(how):
    model = rosa("gpt2", factorize_method=how)
    method = attached_method(model)
    perturb(model)
    before = logits(model)
    old_a = [layer.rosa_A.detach().clone() for layer in layers(model)]
    params = method.resample(model, count=1)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=1e-5)
    assert {id(p) for p in params} == {id(p) for layer in layers(model) for p in (layer.rosa_A, layer.rosa_B)}
    for old, layer in zip(old_a, layers(model)):
        # The new row space of A differs from the old one (a rank-4 projection comparison).
        q_old, q_new = torch.linalg.qr(old.T)[0], torch.linalg.qr(layer.rosa_A.detach().T)[0]
        assert (q_old @ q_old.T - q_new @ q_new.T).norm() > 0.5


def test_subspaces_are_reproducible_from_the_seed_and_the_resample_count():
    def first_a(count: int) -> torch.Tensor:
        model = rosa("llama", targets=["q_proj"])
        attached_method(model).resample(model, count)
        return layers(model)[0].rosa_A.detach()

    torch.testing.assert_close(first_a(2), first_a(2), atol=0, rtol=0)
    assert not torch.allclose(first_a(2), first_a(3))


def test_save_load_after_a_resample_restores_outputs(tmp_path):
    model = rosa("gpt2")
    perturb(model)
    attached_method(model).resample(model, count=1)
    perturb(model, scale=0.02)
    expected = logits(model)
    state = attached_method(model).checkpoint_state(model)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    fresh = rosa("gpt2")
    attached_method(fresh).load_checkpoint_state(fresh, load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(logits(fresh), expected, atol=0, rtol=0)
    # The residual weights are needed: the factors alone do not restore the model.
    factors_only = rosa("gpt2")
    Method.load_checkpoint_state(attached_method(factors_only), factors_only,
                                 {k: v for k, v in state.items() if "rosa_" in k})
    assert (logits(factors_only) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("options,pattern", [
    ({"rank": 1.5}, r"rank=1.5 must be a positive integer or a float in \(0, 1\)"),
    ({"rank": 0}, r"rank=0 must be"),
    ({"sample_method": "middle"}, r"sample_method 'middle'.*bottom, random, top"),
    ({"factorize_method": "mul"}, r"factorize_method 'mul'.*add, equal, random"),
    ({"factorize_level": "batch"}, r"factorize_level 'batch'.*epoch, step"),
    ({"factorize_freq": -1}, r"factorize_freq=-1 must be an integer >= 0"),
])
def test_bad_options_are_clear_errors(options, pattern):
    with pytest.raises(UserError, match=pattern):
        rosa_bench.apply(tiny("llama"), "rosa", **options)


# ---- through the real Trainer (tiny-gpt2, 8 rows / batch 4 = 2 steps an epoch) -----------------
FAST_RUN = ("fnmodel=rosa", "fnmodel.rank=2", "dataset.max_train_samples=8", "dataset.max_eval_samples=2",
            "logging.eval_every=0")


class Probe:
    """Wraps ROSA.on_step_end to record, after each step's hook, whether the factors still
    have Adam state and the scheduler's learning rate."""

    def __init__(self, monkeypatch):
        self.had_state: dict[int, bool] = {}
        original = ROSA.on_step_end

        def probed(method, trainer):
            original(method, trainer)
            inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
            factors = [p for n, p in trainer.model.named_parameters() if "rosa_" in n]
            self.had_state[trainer.global_step] = any(p in inner.state for p in factors)

        monkeypatch.setattr(ROSA, "on_step_end", probed)


def lr_values(folder) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [e.value for e in acc.Scalars("train/lr")]


@pytest.mark.parametrize("level,freq,steps,expected", [
    ("step", 2, 6, [2, 4]),  # after steps 2 and 4, not after the last one
    ("epoch", 1, 6, [2, 4]),  # at the start of epochs 1 and 2 (2 steps an epoch)
    ("epoch", 2, 6, [4]),  # epoch 2 only
])
def test_trainer_resamples_as_configured(tmp_path, monkeypatch, level, freq, steps, expected):
    probe = Probe(monkeypatch)
    run, overrides = tiny_run(tmp_path, *FAST_RUN, f"fnmodel.factorize_level={level}",
                              f"fnmodel.factorize_freq={freq}", f"train.max_steps={steps}")
    folder = train(run, overrides)
    assert tags(folder)["train/factorize_seconds"] == expected
    if level == "step":  # the factors' Adam state is gone right after each resample, only then
        assert [s for s, had in probe.had_state.items() if not had] == expected
    lr = lr_values(folder)  # linear decay from 2e-4 to 0, no restart at the resamples
    linear = 2e-4 * (1 - torch.arange(1, steps + 1) / steps)
    torch.testing.assert_close(torch.tensor(lr), linear, atol=1e-9, rtol=0)


def test_resumed_run_resamples_the_same_subspaces(tmp_path, monkeypatch):
    # Resamples after steps 2, 4 and 6; the run crashes at step 5 and resumes from the step-4
    # checkpoint (written after step 4's resample), so step 6's resample must come out the same.
    extra = (*FAST_RUN, "fnmodel.factorize_level=step", "fnmodel.factorize_freq=2", "train.max_steps=7",
             "train.save_every=2")
    run, overrides = tiny_run(tmp_path / "straight", *extra)
    straight = load_file(str(train(run, overrides) / "checkpoints" / "last" / "model.safetensors"))

    run, overrides = tiny_run(tmp_path / "crashed", *extra)
    original = ROSA.on_step_end

    def crash_at_5(self, trainer):
        original(self, trainer)
        if trainer.global_step == 5:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(ROSA, "on_step_end", crash_at_5)
        with pytest.raises(Crash):
            train(run, overrides)
    folder = run_folder(resolve(run), overrides)
    assert runs.read_json(folder / "checkpoints" / "last" / "state.json")["global_step"] == 4
    resumed = load_file(str(train(run, overrides) / "checkpoints" / "last" / "model.safetensors"))
    assert any("base_layer.weight" in k for k in straight)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=0, rtol=0)

