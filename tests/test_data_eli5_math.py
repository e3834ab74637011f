"""ELI5, GSM8K and MetaMathQA tasks built from the real offline files, and the E2E ROSA preset."""

from __future__ import annotations

import pytest

from rosa_bench.data import build_task
from rosa_bench.data.math import gsm8k_response
from rosa_bench.errors import UserError
from rosa_bench.metrics.math import gsm8k_prediction
from tests.test_config import composed


def task(byte_tokenizer, *overrides: str):
    run = composed(["dataset.max_train_samples=3", "dataset.max_eval_samples=3", *overrides])
    return run, build_task(run.dataset, byte_tokenizer)


def test_gsm8k_solution_becomes_metamath_format():
    response = gsm8k_response("She sold 48/2 = <<48/2=24>>24 clips.\n#### 1,024")
    assert "<<" not in response and response.endswith("#### 1,024\nThe answer is: 1,024")
    assert gsm8k_prediction(response) == 1024


@pytest.mark.parametrize("name", ["gsm8k", "metamathqa"])
def test_math_tasks(byte_tokenizer, name):
    run, t = task(byte_tokenizer, f"dataset={name}", "dataset.max_length=4096")
    assert {len(s) for s in t.splits.values()} == {3}
    assert set(t.generation_sets) == {"validation", "test", "test_math"}
    test = t.generation_sets["test"]
    assert test.metric == "gsm8k" and test.references[0] == ["18"]  # GSM8K test row 1 (Janet's ducks)
    assert test.prompts[0].endswith("### Response: Let's think step by step.")
    assert t.generation_sets["test_math"].metric == "math"
    row = t.splits["train"][0]
    target = byte_tokenizer.decode([i for i, lab in zip(row["input_ids"], row["labels"]) if lab != -100])
    assert "The answer is: " in target and target.startswith(" ")


def test_eli5_local_files(byte_tokenizer):
    run, t = task(byte_tokenizer, "dataset=eli5")
    validation = t.generation_sets["validation"]
    assert validation.metric == "rouge" and all(validation.references)
    assert t.generation_sets["test"].references[0][0].startswith("Yes. Did you watch The Social Network?")
    assert validation.prompts[0].startswith("Question: ") and validation.prompts[0].endswith("\nAnswer:")


def test_prompt_without_its_field_is_rejected():
    with pytest.raises(UserError, match="must contain the field {query}"):
        composed(["dataset=gsm8k", "dataset.prompt='Q: {question}'"])


def test_e2e_rosa_protocol_preset():
    run = composed(["dataset=e2e", "+protocol=e2e_rosa"])
    assert run.dataset.prompt == "Input: {mr} Output: " and run.dataset.generation.num_beams == 5
    assert run.dataset.generation.length_penalty == 0.9
    lora = composed(["dataset=e2e"]).dataset.generation
    assert (lora.num_beams, lora.no_repeat_ngram_size, lora.max_new_tokens) == (10, 4, 64)
