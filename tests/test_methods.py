"""The method contract for full, lora and peft_lora on tiny random models (GPT-2 Conv1D,
Llama, BERT): equivalences, gradients, merging, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import rosa_bench
from rosa_bench.errors import UserError
from rosa_bench.methods.base import AdapterLayer, trainable_parameter_count

VOCAB = 64


def tiny(family: str, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=2,
                                           n_positions=64, bos_token_id=0, eos_token_id=0))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=layers, num_attention_heads=4,
                                             num_key_value_heads=2, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    else:
        model = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32,
                                                         intermediate_size=48, num_hidden_layers=layers,
                                                         num_attention_heads=4, num_labels=3))
    return model.eval()


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def randomize_adapters(model: torch.nn.Module) -> None:
    """LoRA's B starts at zero; give it values so the adapter actually changes outputs."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


FAMILIES = ["gpt2", "llama", "bert"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "peft_lora"])
def test_untrained_adapter_leaves_outputs_unchanged(family, method):
    base = tiny(family)
    ref = logits(base)
    wrapped = rosa_bench.apply(copy.deepcopy(base), method, rank=4)
    torch.testing.assert_close(logits(wrapped), ref, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_our_lora_matches_peft_lora_with_same_weights(family):
    ours = rosa_bench.apply(tiny(family), "lora", rank=4, alpha=8.0)
    ref = rosa_bench.apply(tiny(family), "peft_lora", rank=4, alpha=8.0)
    randomize_adapters(ours)
    ours_state = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    ref_params = {n: p for n, p in ref.named_parameters() if "lora_" in n}
    assert len(ours_state) == len(ref_params) > 0
    with torch.no_grad():
        for name, p in ours_state.items():
            module, kind = name.rsplit(".", 1)  # '...c_attn', 'lora_A'
            ref_name = f"base_model.model.{module}.{kind}.default.weight"
            ref_params[ref_name].copy_(p)
    assert (logits(ours) - logits(tiny(family))).abs().max() > 1e-3  # the adapter is active
    torch.testing.assert_close(logits(ours), logits(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "peft_lora"])
def test_merge_keeps_outputs_and_removes_adapter(family, method):
    model = rosa_bench.apply(tiny(family), method, rank=4)
    randomize_adapters(model)
    before = logits(model)
    merged = rosa_bench.merge(model)
    torch.testing.assert_close(logits(merged), before, atol=1e-5, rtol=1e-5)
    names = [n for n, _ in merged.named_parameters()]
    assert not any("lora_" in n for n in names)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert sorted(names) == sorted(n for n, _ in tiny(family).named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "peft_lora"])
def test_only_adapter_and_head_get_gradients(family, method):
    model = rosa_bench.apply(tiny(family), method, rank=2)
    randomize_adapters(model)
    out = model(**inputs(), labels=torch.tensor([0, 1, 2]) if family == "bert" else inputs()["input_ids"])
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    for name in trainable:
        assert "lora_" in name or "classifier" in name, name
    if family == "bert":
        assert any("classifier" in n for n in trainable)


def test_lora_trainable_count_is_r_times_in_plus_out():
    model = rosa_bench.apply(tiny("llama"), "lora", rank=4, targets=["q_proj", "v_proj"])
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8), two layers
    assert trainable_parameter_count(model) == 2 * (4 * (32 + 32) + 4 * (32 + 16))


def test_lora_wraps_gpt2_conv1d_in_linear_orientation():
    model = rosa_bench.apply(tiny("gpt2"), "lora", rank=4)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, Conv1D)
    assert (layer.out_features, layer.in_features) == (96, 32)
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)


def test_lora_gradient_matches_finite_differences():
    torch.manual_seed(0)
    layer = rosa_bench.methods.lora.LoraLayer(torch.nn.Linear(5, 3).double(), rank=2, alpha=4.0, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: torch.nn.functional.linear(
        torch.nn.functional.linear(x, a), b).sum() * layer.scaling, (
        layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()))
    layer(x).pow(2).sum().backward()
    expected_b = 2 * (layer(x).detach()).T @ (x @ layer.lora_A.detach().T) * layer.scaling
    torch.testing.assert_close(layer.lora_B.grad, expected_b)


def test_full_fine_tuning_trains_everything_and_head_switch():
    model = rosa_bench.apply(tiny("bert"), "full")
    assert trainable_parameter_count(model) == sum(p.numel() for p in model.parameters())
    frozen_head = rosa_bench.apply(tiny("bert"), "full", train_head=False)
    assert not any(p.requires_grad for n, p in frozen_head.named_parameters() if n.startswith("classifier"))


def test_head_frozen_when_train_head_false():
    model = rosa_bench.apply(tiny("bert"), "lora", rank=2, train_head=False)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("method", ["lora", "peft_lora"])
def test_rank_larger_than_layer_is_a_clear_error(method):
    with pytest.raises(UserError, match=r"rank=40 is larger than layer .*32x32.*at most 32"):
        rosa_bench.apply(tiny("llama"), method, rank=40, targets=["q_proj"])


@pytest.mark.parametrize("method", ["lora", "peft_lora"])
def test_target_matching_nothing_is_a_clear_error(method):
    with pytest.raises(UserError, match=r"'qkv' matches no Linear/Conv1D.*q_proj"):
        rosa_bench.apply(tiny("llama"), method, rank=2, targets=["qkv"])


def test_regex_targets_and_unknown_method():
    model = rosa_bench.apply(tiny("llama"), "lora", rank=2, targets=[r"model\.layers\.0\.mlp\..*"])
    wrapped = [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]
    assert wrapped == [f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(UserError, match="unknown method.*'nope'.*full, lora, .*peft_lora"):
        rosa_bench.apply(tiny("llama"), "nope")
