"""`train.gradient_checkpointing=true` gives every method the gradients it gets without it, at
every optimizer step through the real trainer (ROSA across a resample, ColA's fitted adapter
gradients, dropout replayed), every block is really recomputed, ColA records each (x, grad)
pair once, and a model without support is one clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from safetensors.torch import load_file
from torch import nn

from rosa_bench.errors import UserError
from rosa_bench.models import enable_gradient_checkpointing
from rosa_bench.pipeline import train
from rosa_bench.train import distributed
from tests.test_cola import backprop_reference, batch, fitted_gradients, layers, trained_cola
from tests.test_config import composed

STEPS = 4
LAYERS = 2  # tiny-llama and tiny-bert
# Per method: options that exercise what checkpointing could break.
METHOD_OPTIONS = {
    "full": [],
    "lora": ["fnmodel.dropout=0.1"],  # the recompute must draw the same dropout masks
    "peft_lora": [],
    "rosa": ["fnmodel.factorize_level=step", "fnmodel.factorize_freq=2"],  # resample after step 2
    "loraxs": [],
    "rocoft": [],
    "cola": [],  # its hooks: gradients captured in the backward, fitted before each step
}


def traced_run(tmp_path: Path, monkeypatch,
               overrides: list[str]) -> tuple[list[list[torch.Tensor]], int, Path]:
    """Train through `pipeline.train`; returns the gradients the optimizer steps with at each
    step (after the method's own hook, so ColA's are the fitted ones), the number of
    checkpointed block calls, and the run folder."""
    grads: list[list[torch.Tensor]] = []
    calls = [0]
    monkeypatch.undo()  # the previous run's spies
    average = distributed.average_unsynced_gradients
    checkpoint = transformers.modeling_utils.checkpoint

    def record(params, model):
        grads.append([p.grad.detach().clone() for p in params if p.grad is not None])
        return average(params, model)

    def counted(*args, **kwargs):
        calls[0] += 1
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(distributed, "average_unsynced_gradients", record)
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counted)
    overrides = [*overrides, f"train.max_steps={STEPS}", "train.batch_size=4", "logging.progress=false",
                 "logging.sample_max_new_tokens=2", "dataset.max_eval_samples=4"]
    folder = train(composed([*overrides, f"output.path={tmp_path}"]), overrides)
    return grads, calls[0], folder


def assert_same_training(tmp_path: Path, monkeypatch, overrides: list[str]) -> None:
    plain, plain_calls, plain_dir = traced_run(tmp_path / "plain", monkeypatch, overrides)
    ckpt, ckpt_calls, ckpt_dir = traced_run(tmp_path / "ckpt", monkeypatch,
                                            [*overrides, "train.gradient_checkpointing=true"])
    assert plain_calls == 0 and ckpt_calls == LAYERS * STEPS  # every block of every step recomputed
    assert len(plain) == len(ckpt) == STEPS
    for step, (ours, ref) in enumerate(zip(ckpt, plain, strict=True), start=1):
        assert len(ours) == len(ref) and any(g.abs().sum() > 0 for g in ref), step
        for g, r in zip(ours, ref, strict=True):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")
    saved = [load_file(d / "checkpoints" / "last" / "model.safetensors") for d in (ckpt_dir, plain_dir)]
    assert saved[0].keys() == saved[1].keys()
    for key in saved[1]:
        torch.testing.assert_close(saved[0][key], saved[1][key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_every_method_steps_with_the_same_gradients_through_the_trainer(tmp_path, monkeypatch, method):
    overrides = ["model=tiny-llama", "dataset=e2e", "dataset.max_train_samples=16", f"fnmodel={method}",
                 *METHOD_OPTIONS[method]]
    assert_same_training(tmp_path, monkeypatch, overrides)


@pytest.mark.parametrize("method", ["lora", "cola"])
def test_encoder_with_frozen_embeddings_steps_with_the_same_gradients(tmp_path, monkeypatch, method):
    """BERT on GLUE: the first block's input needs no gradient, yet its adapters get theirs."""
    overrides = ["model=tiny-bert", "dataset=glue", "dataset.task=mrpc", "dataset.max_train_samples=16",
                 f"fnmodel={method}", "fnmodel.targets=[query,value]"]
    assert_same_training(tmp_path, monkeypatch, overrides)


def test_cola_records_each_pair_once_and_fits_backprops_gradient():
    """A checkpointed block runs its forward twice; the recompute must not capture again, or
    the fitted gradient would count each batch twice. After several steps under checkpointing,
    the fitted gradient still equals plain backprop's."""
    model, ids = trained_cola("lowrank", users=2, collab="alone")
    ref, ref_params = backprop_reference(model)
    enable_gradient_checkpointing(model, "tiny-llama")
    b = batch(14, users=ids[0])
    model(**b).loss.backward()
    assert [len(layer.site.pairs) for layer in layers(model)] == [1] * len(layers(model))
    for layer in layers(model):
        layer.site.pairs.clear()
    ours = fitted_gradients(model, [b])
    ref(**b).loss.backward()
    for g, p in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)


def test_a_model_without_support_is_one_clear_error():
    from tests.test_methods import tiny

    model = tiny("llama")
    model.supports_gradient_checkpointing = False
    with pytest.raises(UserError, match=r"model 'my-model' \(LlamaForCausalLM\) does not support gradient "
                                        r"checkpointing; set train.gradient_checkpointing=false"):
        enable_gradient_checkpointing(model, "my-model")
    with pytest.raises(UserError, match=r"model 'plain' \(Linear\) does not support"):
        enable_gradient_checkpointing(nn.Linear(2, 2), "plain")
