"""Dolly-15k from the shared data root: fixed splits, response-only labels, the user field,
and errors that name the bad value."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rosa_bench.config import DatasetConfig
from rosa_bench.data import build_task, dolly
from rosa_bench.data.e2e import IGNORE
from rosa_bench.errors import UserError

PROMPT = "Instruction:\n{instruction}\n{context}Response:\n"


def config(root, **extra) -> DatasetConfig:
    return DatasetConfig(name="dolly", cache=str(root), prompt=PROMPT, hub_id=None, **extra)


def test_splits_are_fixed_disjoint_and_cover_the_file(data_root):
    raw = dolly.load_raw(config(data_root))
    sizes = {split: len(rows) for split, rows in raw.items()}
    assert sizes == {"train": 14184, "validation": 747, "test": 80}  # 15,011 rows in the file
    assert Counter(raw["test"]["category"]) == dict.fromkeys(dolly.CATEGORIES, 10)
    keys = {split: {(r["instruction"], r["response"]) for r in rows} for split, rows in raw.items()}
    assert not keys["validation"] & keys["test"]
    for rows in raw.values():  # interleaved: any prefix (what caps keep) has every category
        assert rows["category"][:8] == list(dolly.CATEGORIES)


def test_rows_learn_the_response_and_carry_their_user(data_root, byte_tokenizer):
    task = build_task(config(data_root, max_train_samples=6, max_eval_samples=4, max_length=8192),
                      byte_tokenizer)
    raw, row = task.raw["train"][0], task.splits["train"][0]
    prompt = dolly.format_prompt(PROMPT, raw["instruction"], raw["context"])
    assert (raw["context"] != "") == ("Context:\n" in prompt)
    n = len(byte_tokenizer(prompt)["input_ids"])
    assert row["labels"][:n] == [IGNORE] * n
    assert byte_tokenizer.decode(row["labels"][n:-1]) == raw["response"]
    assert row["labels"][-1] == byte_tokenizer.eos_token_id
    assert row["user"] == dolly.CATEGORIES.index(raw["category"])
    batch = task.collate([task.splits["train"][i] for i in range(4)])
    assert batch["user"].tolist() == [dolly.CATEGORIES.index(c) for c in task.raw["train"]["category"][:4]]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert task.metric_name == "loss" and len(task.raw["validation"]) == 4


def test_rows_whose_response_is_cut_off_are_dropped(data_root, byte_tokenizer):
    task = build_task(config(data_root, max_train_samples=40, max_length=400), byte_tokenizer)
    kept = task.splits["train"]
    assert 0 < len(kept) < 40  # byte tokens: long contexts leave no room for the response
    assert all(any(label != IGNORE for label in row["labels"]) for row in kept)


def test_bad_prompt_is_a_user_error():
    with pytest.raises(UserError, match=r"dataset.prompt='\{mr\}'.*\{instruction\} and \{context\}"):
        dolly.check(DatasetConfig(name="dolly", prompt="{mr}"))


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not JSON"),
    (json.dumps({"instruction": "a", "context": "", "response": "b"}),
     r"missing text field\(s\) \['category'\]"),
    (json.dumps({"instruction": "a", "context": "", "response": "b", "category": "poetry"}),
     "category 'poetry' is not one of"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, problem):
    path = tmp_path / dolly.FILE
    path.parent.mkdir(parents=True)
    good = json.dumps({"instruction": "a", "context": "", "response": "b", "category": "open_qa"})
    path.write_text(f"{good}\n{line}\n")
    with pytest.raises(UserError, match=f"{path}, line 2: {problem}"):
        dolly.load_raw(config(tmp_path))


def test_missing_file_without_hub_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="dolly/databricks-dolly-15k.jsonl"):
        dolly.load_raw(config(tmp_path))


def test_a_max_length_that_leaves_no_response_is_a_user_error(data_root, byte_tokenizer):
    with pytest.raises(UserError, match=r"dataset.max_length=8 leaves no response token.*'train'"):
        build_task(config(data_root, max_train_samples=4, max_eval_samples=4, max_length=8), byte_tokenizer)
