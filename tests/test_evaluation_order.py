"""Validation in batches of similar length: the same scores as the split in its own order, with
less padding (real SST-2 and E2E dev rows, tiny random models)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from rosa_bench.data import build_task
from rosa_bench.train.evaluation import evaluate_split, length_sorted_loader
from tests.test_data import e2e_cfg, glue_cfg


def padded_tokens(loader: DataLoader) -> int:
    return sum(batch["input_ids"].numel() for batch in loader)


@pytest.fixture(scope="module")
def sst2(data_root, bert_tokenizer):
    task = build_task(glue_cfg(data_root, "sst2", max_train_samples=4, max_eval_samples=96), bert_tokenizer)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(bert_tokenizer), hidden_size=32,
                                                     intermediate_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, num_labels=2))
    return task, model.eval()


@pytest.fixture(scope="module")
def e2e(data_root, byte_tokenizer):
    task = build_task(e2e_cfg(data_root, max_train_samples=2, max_eval_samples=40), byte_tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_tokenizer), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    return task, model.eval()


@pytest.mark.parametrize("name", ["sst2", "e2e"])
def test_length_sorted_validation_scores_as_the_split_in_order(name, request):
    task, model = request.getfixturevalue(name)
    rows = task.splits["validation"]
    in_order = DataLoader(rows, batch_size=8, collate_fn=task.collate)
    sorted_ = length_sorted_loader(rows, 8, task.collate)
    expected = evaluate_split(model, task, in_order, torch.device("cpu"))
    got = evaluate_split(model, task, sorted_, torch.device("cpu"))
    assert got.keys() == expected.keys() and len(expected) >= 2
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert sorted(i for batch in sorted_.batch_sampler for i in batch) == list(range(len(rows)))
    assert padded_tokens(sorted_) < padded_tokens(in_order)
