"""Original-code protocol options beyond the trainable sets of tests/test_presets.py: each
changes exactly what it claims (a computed value, a counted set, a gradient).

train.label_smoothing (microsoft/LoRA GPT-2 E2E), LoRA fused_slices (MergedLinear with
enable_lora=[True, False, True]), RoCoFT prune_score / prune_inputs (Kowsher/RoCoFT), ColA
head_adapter (RoBERTa GLUE), dataset.user_order (ColA's Dolly users), and ColA checkpoints
written with the old MLP names (fc1/fc2)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import rosa_bench
from rosa_bench import runs
from rosa_bench.data import build_task, dolly
from rosa_bench.data.task import REGRESSION
from rosa_bench.errors import UserError
from rosa_bench.methods.base import attached_method, is_head, trainable_parameter_count
from rosa_bench.methods.cola import ColaLayer, user_kinds
from rosa_bench.methods.lora import LoraLayer
from rosa_bench.train import checkpoint as ckpt
from rosa_bench.train.distributed import loss_items
from rosa_bench.train.loss import check_label_smoothing, training_loss
from tests.test_cola import backprop_reference, fitted_gradients, no_dropout, randomize
from tests.test_config import composed
from tests.test_data_dolly import config as dolly_config
from tests.test_methods import VOCAB, inputs, logits, tiny
from tests.test_presets import tiny as tiny_preset
from tests.test_rocoft import OneLayer, pruned

EPS = 0.1


# ---- train.label_smoothing --------------------------------------------------------------------------
def hand_smoothed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over labelled positions of (1 - eps) * -log p(label) + eps * mean_c -log p(c), one
    position at a time: the formula of microsoft/LoRA's model.py, written out."""
    total = torch.zeros((), dtype=torch.float64)
    for row, label_row in zip(logits.double(), labels):
        for position, label in zip(row, label_row):
            if label == -100:
                continue
            logp = position.log_softmax(-1)
            total += (1 - EPS) * -logp[label] + EPS * -logp.mean()
    return total


def test_label_smoothing_on_a_causal_lm_is_the_hand_computed_mean_over_label_tokens():
    model = tiny("gpt2")  # eval: no dropout, so every forward gives the same logits
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = labels[1, :5] = -100  # prompts: no loss
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        out = model(**batch)
        smoothed = training_loss(model, batch, causal=True, label_smoothing=EPS)
        plain = training_loss(model, batch, causal=True, label_smoothing=0.0)
    items = loss_items(batch, causal=True)  # the trainer's normaliser: label tokens after the shift
    assert items == (7 - 3 - 0) + (7 - 5)  # positions 3..6 and 5..6 are predicted
    expected = hand_smoothed(out.logits[:, :-1], labels[:, 1:]) / items
    torch.testing.assert_close(smoothed.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, out.loss, atol=0, rtol=0)  # 0: the model's own loss
    assert abs(float(smoothed - plain)) > 1e-4  # smoothing changes the loss


def test_label_smoothing_on_a_classifier_is_the_hand_computed_mean_over_examples():
    model = tiny("bert")  # 3 labels
    batch = {**inputs(), "labels": torch.tensor([0, 2, 1])}
    with torch.no_grad():
        got = training_loss(model, batch, causal=False, label_smoothing=EPS)
        expected = hand_smoothed(model(**inputs()).logits[:, None], batch["labels"][:, None]) / 3
    assert loss_items(batch, causal=False) == 3
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_label_smoothing_rejects_regression_and_values_outside_zero_one():
    with pytest.raises(UserError, match="train.label_smoothing=0.1 needs class labels"):
        check_label_smoothing(0.1, SimpleNamespace(kind=REGRESSION, name="glue/stsb"))
    check_label_smoothing(0.0, SimpleNamespace(kind=REGRESSION, name="glue/stsb"))
    with pytest.raises(UserError, match=r"train.label_smoothing=1.0 must be in \[0, 1\)"):
        composed(["train.label_smoothing=1.0"])
    assert composed(["+experiment=lora_e2e"]).train.label_smoothing == 0.1


# ---- LoRA fused_slices: q and v of GPT-2's c_attn ------------------------------------------------------
R = 2


def sliced_gpt2() -> nn.Module:
    model = rosa_bench.apply(tiny("gpt2"), "lora", rank=R, alpha=8.0, targets=["c_attn"],
                             fused_slices=[True, False, True])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_fused_slices_train_only_the_q_and_v_pairs():
    plain = rosa_bench.apply(tiny("gpt2"), "lora", rank=R, targets=["c_attn"])
    sliced = sliced_gpt2()
    d, layers = 32, 2
    assert trainable_parameter_count(plain) == layers * (R * d + 3 * d * R)  # one pair over q, k, v
    assert trainable_parameter_count(sliced) == layers * 2 * (R * d + d * R)  # a pair for q, one for v
    assert composed(["+experiment=lora_e2e"]).fnmodel.fused_slices == [True, False, True]


def test_q_and_v_slices_equal_separate_loras_and_k_gets_nothing():
    """Each slice against its own LoRA (A_i, B_i) on a plain (d, d) Linear: outputs and the
    gradients of A and B for the same upstream gradient; k's slice: no update, no gradient."""
    model = sliced_gpt2()
    layer = attached_method(model).adapter_layers(model)[0][1]
    d = layer.slice_out
    x = torch.randn(3, 5, d, generator=torch.Generator().manual_seed(1))
    upstream = torch.randn(3, 5, 3 * d, generator=torch.Generator().manual_seed(2))
    out = layer.update(x)
    out.backward(upstream)
    for pair, part in enumerate((0, 2)):  # q is slice 0, v is slice 2
        separate = LoraLayer(nn.Linear(d, d, bias=False), R, 8.0, 0.0)
        with torch.no_grad():
            separate.lora_A.copy_(layer.lora_A[pair * R:(pair + 1) * R])
            separate.lora_B.copy_(layer.lora_B[pair * d:(pair + 1) * d])
        theirs = separate.update(x)
        theirs.backward(upstream[..., part * d:(part + 1) * d])
        torch.testing.assert_close(out[..., part * d:(part + 1) * d], theirs)
        torch.testing.assert_close(layer.lora_A.grad[pair * R:(pair + 1) * R], separate.lora_A.grad)
        torch.testing.assert_close(layer.lora_B.grad[pair * d:(pair + 1) * d], separate.lora_B.grad)
    assert out[..., d:2 * d].abs().max() == 0
    delta = layer.delta_weight()
    assert delta[d:2 * d].abs().max() == 0 and delta[:d].abs().max() > 0 and delta[2 * d:].abs().max() > 0
    torch.testing.assert_close(out, x @ delta.T)  # delta_weight (merge) is the same map


def test_fused_slices_after_training_steps_keep_k_at_its_base_weights():
    model = sliced_gpt2().train()
    base = tiny("gpt2")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for seed in range(3):
        ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    before = logits(model)
    merged = rosa_bench.merge(model)
    torch.testing.assert_close(logits(merged), before, atol=1e-5, rtol=0)
    for block, ref in zip(merged.transformer.h, base.transformer.h):
        w, w0 = block.attn.c_attn.weight, ref.attn.c_attn.weight  # Conv1D: (in, 3d)
        assert torch.equal(w[:, 32:64], w0[:, 32:64])  # k: untouched
        assert not torch.equal(w[:, :32], w0[:, :32]) and not torch.equal(w[:, 64:], w0[:, 64:])


def test_fused_slices_reject_layers_that_are_not_a_fused_projection_and_empty_choices():
    with pytest.raises(UserError, match=r"layer .*mlp.c_proj maps 128 -> 32, not 128 -> 3 x 128"):
        rosa_bench.apply(tiny("gpt2"), "lora", rank=R, targets=["mlp.c_proj"],
                         fused_slices=[True, False, True])
    with pytest.raises(UserError, match=r"attn.c_proj maps 32 -> 32, not 32 -> 2 x 32"):  # 2 divides 32
        rosa_bench.apply(tiny("gpt2"), "lora", rank=R, targets=["attn.c_proj"], fused_slices=[True, False])
    with pytest.raises(UserError, match="fused_slices"):
        composed(["fnmodel=lora", "fnmodel.fused_slices=[false,false]"])



def test_fused_slices_refuse_the_peft_export_only(tmp_path):
    from rosa_bench.export import export_run

    run = composed(["model=tiny-gpt2", "fnmodel=lora", "fnmodel.fused_slices=[true,false,true]"])
    runs.write_config(tmp_path, run, [])
    with pytest.raises(UserError, match=r"fused_slices=\[True, False, True\] .* use --format merged"):
        export_run(tmp_path, tmp_path / "out", fmt="peft")

# ---- RoCoFT prune_score=signed_sum and prune_inputs=chained ------------------------------------------
def test_signed_sum_score_lets_activations_cancel():
    # column L1 [4, 1, 2, 3]; the two tokens' signed sums [0, 10, -2, 1] -> scores [0, 10, -4, 3];
    # their L2 norms [4.24, 7.07, 1.41, 0.71] -> scores [17.0, 7.07, 2.83, 2.12]
    w = [[2, 1, 1, 1], [-2, 0, 1, 2]]
    x = torch.tensor([[[3.0, 5.0, -1.0, 0.5], [-3.0, 5.0, -1.0, 0.5]]])
    model = rosa_bench.apply(OneLayer(w), "rocoft", rank=2, mode="column", select="prune",
                             prune_score="signed_sum", targets=["proj"])
    attached_method(model).calibrate(model, [{"x": x}])
    assert model.proj.rocoft_index.tolist() == [1, 3]
    assert pruned(w, [{"x": x}], "column", 2) == [0, 1]  # the default (l2) keeps others
    low = rosa_bench.apply(OneLayer(w), "rocoft", rank=1, mode="column", select="prune", targets=["proj"],
                           prune_score="signed_sum", select_largest=False)
    attached_method(low).calibrate(low, [{"x": x}])
    assert low.proj.rocoft_index.tolist() == [2]  # the most negative sum is the "lowest"


class TwoLayers(nn.Module):
    """a -> ReLU -> b: the real forward has a nonlinearity that the original's chain skips."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3, bias=False)
        self.b = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-3.0, 0.0]]))
            self.b.weight.fill_(1.0)  # equal column L1 norms: the inputs alone decide

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(("inputs_from", "expected"), [("model", [0]), ("chained", [2])])
def test_chained_inputs_feed_each_layer_the_previous_layers_output(inputs_from, expected):
    # a x = (2, 1, -6) for x = (2, 1): b sees (2, 1, 0) after ReLU, (2, 1, -6) chained
    model = rosa_bench.apply(TwoLayers(), "rocoft", rank=1, mode="column", select="prune",
                             prune_inputs=inputs_from, targets=["a", "b"])
    attached_method(model).calibrate(model, [{"x": torch.tensor([[[2.0, 1.0]]])}])
    assert model.b.rocoft_index.tolist() == expected
    assert model.a.rocoft_index.tolist() == [0]  # the first layer sees the real input either way


@pytest.mark.parametrize("mode", ["row", "column"])
def test_chained_scores_on_bert_match_a_hand_written_chain(mode):
    model = rosa_bench.apply(tiny("bert"), "rocoft", rank=3, mode=mode, select="prune",
                             prune_inputs="chained")
    layers = [layer for _, layer in attached_method(model).adapter_layers(model)]
    assert len(layers) == 12  # 2 blocks x (q, k, v, attention out, intermediate, out)
    first_inputs = []
    handle = layers[0].base_layer.register_forward_hook(lambda m, args, out: first_inputs.append(args[0]))
    padded = torch.tensor([[1] * 11, [1] * 6 + [0] * 5, [1] * 11])
    batches = [inputs(), {**inputs(), "attention_mask": padded}]
    attached_method(model).calibrate(model, batches)
    handle.remove()
    expected = []
    with torch.no_grad():
        feats = [[] for _ in layers]
        for x, b in zip(first_inputs, batches):
            x = x.reshape(-1, x.shape[-1])[b["attention_mask"].reshape(-1).bool()]  # real tokens only
            for i, layer in enumerate(layers):
                y = x @ layer.weight.T + layer.base_layer.bias
                feats[i].append(y if mode == "row" else x)
                x = y
        for layer, f in zip(layers, feats):
            l1 = layer.weight.abs().sum(dim=1 if mode == "row" else 0)
            expected.append((l1 * torch.cat(f).norm(dim=0)).topk(3).indices.sort().values.tolist())
    assert [layer.rocoft_index.tolist() for layer in layers] == expected


def test_chained_inputs_refuse_a_chain_that_breaks():
    model = rosa_bench.apply(tiny("llama"), "rocoft", rank=1, select="prune", prune_inputs="chained")
    with pytest.raises(UserError, match="prune_inputs=chained: a layer with 32 inputs follows one with 16"):
        attached_method(model).calibrate(model, [inputs()])
    with pytest.raises(UserError, match="prune_score"):
        composed(["fnmodel=rocoft", "fnmodel.prune_score=mean"])


# ---- ColA head_adapter=linear_bias --------------------------------------------------------------------
def test_head_adapter_adds_a_linear_adapter_with_bias_per_user_on_each_head_linear():
    plain = rosa_bench.apply(tiny_preset("tiny-roberta", num_labels=3), "cola", users=2, collab="col")
    model = rosa_bench.apply(tiny_preset("tiny-roberta", num_labels=3), "cola", users=2, collab="col",
                             head_adapter="linear_bias")
    # RoBERTa's head: dense 32 -> 32 and out_proj 32 -> 3, each W and b per user
    added = trainable_parameter_count(model) - trainable_parameter_count(plain)
    assert added == 2 * (32 * 32 + 32 + 3 * 32 + 3)
    heads = {n: [type(a).__name__ for a in m.site.adapters] for n, m in model.named_modules()
             if isinstance(m, ColaLayer) and is_head(n)}
    assert heads == {"classifier.dense": ["FullLinear"] * 2, "classifier.out_proj": ["FullLinear"] * 2}
    assert not any(p.requires_grad for p in model.parameters())  # the head itself stays frozen
    assert composed(["+experiment=cola_glue"]).fnmodel.head_adapter == "linear_bias"
    with pytest.raises(UserError, match="head_adapter=linear_bias: this model has no classification head"):
        rosa_bench.apply(tiny("gpt2"), "cola", head_adapter="linear_bias")


def classify(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (4, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 2, 1, 2])}


def test_head_adapter_gradient_is_backprops_and_merge_adds_its_bias():
    model = no_dropout(rosa_bench.apply(tiny("bert"), "cola", rank=4, alpha=0.5, head_adapter="linear_bias"))
    randomize(model)
    ref, ref_params = backprop_reference(model)
    ours = fitted_gradients(model, [classify(1)])
    ref(**classify(1)).loss.backward()
    head_bias = model.classifier.site.adapters[0].bias
    assert head_bias.grad is not None and head_bias.grad.abs().sum() > 0
    for mine, theirs in zip(ours, ref_params, strict=True):
        torch.testing.assert_close(mine, theirs.grad, atol=1e-6, rtol=0)
    model.eval()
    with torch.no_grad():
        before = model(**inputs()).logits
    merged = rosa_bench.merge(copy.deepcopy(model))
    torch.testing.assert_close(merged(**inputs()).logits, before, atol=1e-5, rtol=0)


# ---- dataset.user_order: ColA's Dolly users -------------------------------------------------------------
def test_cola_user_order_numbers_users_as_the_cola_code_and_changes_their_kinds(data_root, byte_tokenizer):
    sets = {}
    for order in ("sorted", "cola"):
        task = build_task(dolly_config(data_root, max_train_samples=16, max_eval_samples=8, max_length=8192,
                                       user_order=order), byte_tokenizer)
        rows = task.raw["train"]
        sets[order] = [row["user"] for row in task.splits["train"]]
        assert sets[order] == [dolly.USER_ORDERS[order].index(c) for c in rows["category"]]
        assert task.generation_sets["validation"].users == \
            [dolly.USER_ORDERS[order].index(c) for c in task.raw["validation"]["category"]]
    assert sets["sorted"] != sets["cola"]
    kinds = user_kinds(["lowrank", "linear"], 8, "blocks")
    of = {order: dict(zip(dolly.USER_ORDERS[order], kinds)) for order in ("sorted", "cola")}
    assert of["cola"]["brainstorming"] == "lowrank" and of["sorted"]["creative_writing"] == "lowrank"
    assert of["cola"]["creative_writing"] == "linear" and of["sorted"]["summarization"] == "linear"
    assert composed(["+experiment=cola_dolly"]).dataset.user_order == "cola"
    with pytest.raises(UserError, match="dataset.user_order='cola': dataset e2e names no users"):
        composed(["dataset=e2e", "+dataset.user_order=cola"])
    with pytest.raises(UserError, match="unknown dataset.user_order 'shuffled'"):
        composed(["dataset=dolly", "dataset.user_order=shuffled"])


# ---- ColA checkpoints with the old MLP names ----------------------------------------------------------
def old_named(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state as the MLP adapter named it before mlp_layers: fc1 (hidden) and fc2 (out)."""
    return {k.replace(".hidden.0.", ".fc1.").replace(".out.", ".fc2."): v for k, v in state.items()}


def test_old_fc1_fc2_checkpoints_load_into_todays_mlp_adapters(tmp_path):
    model = no_dropout(rosa_bench.apply(tiny("gpt2"), "cola", adapter="mlp", hidden=4, users=2, collab="col"))
    randomize(model)
    state = attached_method(model).checkpoint_state(model)
    old = old_named(state)
    assert any(".fc1." in k for k in old) and not any(".hidden." in k for k in old)
    ckpt.save_checkpoint(runs.checkpoint_dir(tmp_path, "last"), old, {"global_step": 1})
    fresh = no_dropout(rosa_bench.apply(tiny("gpt2"), "cola", adapter="mlp", hidden=4, users=2, collab="col"))
    loaded = ckpt.load_model_state(runs.checkpoint_dir(tmp_path, "last"))
    attached_method(fresh).load_checkpoint_state(fresh, loaded)
    model.eval(), fresh.eval()
    torch.testing.assert_close(logits(fresh), logits(model), atol=0, rtol=0)
    two = rosa_bench.apply(tiny("gpt2"), "cola", adapter="mlp", hidden=4, mlp_layers=2)
    with pytest.raises(UserError, match="old fc1/fc2 names .* set fnmodel.mlp_layers=1 fnmodel.mlp_act"):
        attached_method(two).load_checkpoint_state(two, old)


def test_a_backbone_layer_named_fc1_is_not_renamed():
    state = {"model.fc1.cola.0.A": torch.zeros(1), "x.cola.0.fc2.bias": torch.zeros(1)}
    method = attached_method(rosa_bench.apply(tiny("gpt2"), "cola", adapter="mlp", hidden=4))
    assert set(method._renamed_old_mlp(state)) == {"model.fc1.cola.0.A", "x.cola.0.out.bias"}



def test_head_adapter_merge_into_a_bias_free_head_keeps_the_heads_dtype():
    """Llama's `score` head has no bias: merging creates one in the head's dtype (bf16 here), not
    the fp32 adapters', so the merged model still runs and gives the unmerged outputs."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, num_labels=3))
    model = rosa_bench.apply(llama, "cola", rank=4, head_adapter="linear_bias")
    assert model.score.base_layer.bias is None
    for adapter in model.score.site.adapters:
        torch.nn.init.normal_(adapter.bias)
    model.to(torch.bfloat16).eval()
    with torch.no_grad():
        before = model(**inputs()).logits
        merged = rosa_bench.merge(copy.deepcopy(model))
        assert merged.score.bias.dtype == torch.bfloat16
        torch.testing.assert_close(merged(**inputs()).logits, before, atol=5e-2, rtol=5e-2)
