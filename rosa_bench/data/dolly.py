"""Databricks Dolly-15k: instruction following, with a user per example (its category).

Causal LM: the prompt shows the instruction (and the context when there is one), the loss covers
the response tokens only. Each row also carries `user`, the index of its category in the order
`dataset.user_order` names (USER_ORDERS), which the collate passes as a batch field so ColA can
give each category its own adapters. `sorted` is alphabetical; `cola` is the ColA code's list
(diaoenmao/ColA-..., src/dataset/dataset.py `task_value`), which decides which categories get
which adapter kind when kinds are given to users in blocks (fnmodel.assign=blocks).

Splits are fixed, whatever the seed: the file's last 80 rows (Shepherd's held-out sample, 10 per
category) are `test`; every 20th remaining row is `validation`; the rest is `train`. Each split
is then interleaved by category, so `max_*_samples` caps keep all eight users.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch

from rosa_bench.config import DatasetConfig
from rosa_bench.data import e2e
from rosa_bench.data.files import cap, load_hub, local_files, malformed, pad_id
from rosa_bench.data.task import CAUSAL_LM, GenerationSet, Task
from rosa_bench.errors import UserError, choices_error

FILE = "dolly/databricks-dolly-15k.jsonl"
FIELDS = ("instruction", "context", "response", "category")
CATEGORIES = ("brainstorming", "classification", "closed_qa", "creative_writing", "general_qa",
              "information_extraction", "open_qa", "summarization")
USER_ORDERS = {"sorted": CATEGORIES,
               "cola": ("classification", "information_extraction", "summarization", "brainstorming",
                        "creative_writing", "open_qa", "closed_qa", "general_qa")}
TEST_ROWS = 80
VALIDATION_EVERY = 20


def check(cfg: DatasetConfig) -> None:
    if cfg.task is not None:
        raise UserError(f"dataset.task={cfg.task!r} is not used by dolly; leave it null")
    if cfg.user_order not in USER_ORDERS:
        raise choices_error("dataset.user_order", cfg.user_order, tuple(USER_ORDERS))
    try:
        cfg.prompt.format(instruction="", context="")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"dataset.prompt={cfg.prompt!r} must be a format string whose fields are "
                        f"{{instruction}} and {{context}} ({type(err).__name__}: {err})") from None


def head(cfg: DatasetConfig) -> tuple[str, int | None]:
    return CAUSAL_LM, None


def run_subdir(cfg: DatasetConfig) -> str:
    return "dolly"


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise malformed(path, line_no, f"not JSON ({err})") from None
            absent = [f for f in FIELDS if not isinstance(row.get(f), str)]
            if absent:
                raise malformed(path, line_no, f"missing text field(s) {absent}")
            if row["category"] not in CATEGORIES:
                raise malformed(path, line_no, f"category {row['category']!r} is not one of {CATEGORIES}")
            rows.append({f: row[f] for f in FIELDS})
    return rows


def interleave(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Round-robin over categories (file order within each). The file is grouped by federated
    client, so its first rows are nearly one category; interleaved, any cap keeps every user."""
    by_category = [[r for r in rows if r["category"] == c] for c in CATEGORIES]
    ranked = [(i, k, r) for k, group in enumerate(by_category) for i, r in enumerate(group)]
    return [r for _, _, r in sorted(ranked, key=lambda t: (t[0], t[1]))]


def split_rows(rows: list[dict[str, str]]) -> dict[str, datasets.Dataset]:
    """train / validation / test by position (see the module docstring), each interleaved."""
    rest, test = rows[:-TEST_ROWS], rows[-TEST_ROWS:]
    parts = {"train": [r for i, r in enumerate(rest) if i % VALIDATION_EVERY],
             "validation": rest[::VALIDATION_EVERY], "test": test}
    return {split: datasets.Dataset.from_list(interleave(part)) for split, part in parts.items()}


def load_raw(cfg: DatasetConfig) -> dict[str, datasets.Dataset]:
    """All rows, from the data root or else the Hub (whose single split is cut the same way)."""
    found, missing = local_files(cfg, {"all": FILE})
    if not missing:
        return split_rows(_read_jsonl(found["all"]))
    hub = load_hub(cfg, None, missing)["train"]
    return split_rows([{f: row[f] for f in FIELDS} for row in hub])


def format_prompt(prompt: str, instruction: str, context: str) -> str:
    """The context block appears only when the row has one."""
    return prompt.format(instruction=instruction, context=f"Context:\n{context}\n" if context else "")


def user_ids(categories: list[str], order: str) -> list[int]:
    """Each row's user: its category's position in USER_ORDERS[order]."""
    return [USER_ORDERS[order].index(c) for c in categories]


def encode(batch: dict[str, list], tokenizer: Any, prompt: str, max_length: int, eos: int,
           user_order: str) -> dict[str, list]:
    """e2e's prompt + response + eos encoding (loss on the response), plus the user id."""
    prompts = [format_prompt(prompt, i, c) for i, c in zip(batch["instruction"], batch["context"])]
    out = e2e.encode({"mr": prompts, "ref": batch["response"]}, tokenizer, "{mr}", max_length, eos)
    out["user"] = user_ids(batch["category"], user_order)
    return out


def learns_something(row: dict[str, Any]) -> bool:
    """False for rows whose long context pushed the whole response past max_length: they would
    add no loss (and a batch of only such rows a NaN one)."""
    return any(label != e2e.IGNORE for label in row["labels"])


def collate(rows: list[dict[str, Any]], pad: int) -> dict[str, Any]:
    batch = e2e.collate(rows, pad)
    batch["user"] = torch.tensor([row["user"] for row in rows])
    return batch


def build(cfg: DatasetConfig, tokenizer: Any, seed: int) -> Task:
    """Caps take the first rows of each split (before rows without response tokens are
    dropped), so `seed` changes nothing here."""
    raw = load_raw(cfg)
    raw = {split: cap(rows, cfg.max_train_samples if split == "train" else cfg.max_eval_samples)
           for split, rows in raw.items()}
    fn = partial(encode, tokenizer=tokenizer, prompt=cfg.prompt, max_length=cfg.max_length,
                 eos=e2e.eos_id(tokenizer), user_order=cfg.user_order)
    splits = {split: rows.map(fn, batched=True, remove_columns=rows.column_names).filter(learns_something)
              for split, rows in raw.items()}
    empty = [split for split, rows in splits.items() if len(rows) == 0]
    if empty:
        raise UserError(f"dataset.max_length={cfg.max_length} leaves no response token in any row of "
                        f"{empty}: raise it (or the sample caps)")
    sets = {split: generation_set(raw[split], cfg.prompt, cfg.user_order) for split in ("validation", "test")}
    return Task(
        name="dolly", kind=CAUSAL_LM, run_subdir=run_subdir(cfg), splits=splits,
        collate=partial(collate, pad=pad_id(tokenizer)), validation_splits=["validation"],
        metric_name="loss", greater_is_better=False,
        sample_prompts=sets["validation"].prompts[:cfg.num_samples_to_log], raw=raw,
        generation_sets=sets, generation=cfg.generation,
    )


def generation_set(rows: datasets.Dataset, prompt: str, user_order: str) -> GenerationSet:
    """Prompts scored by ROUGE against the one reference response, each with its user, so
    per-user adapters (ColA, collab=alone) answer their own category's prompts."""
    return GenerationSet(
        prompts=[format_prompt(prompt, i, c) for i, c in zip(rows["instruction"], rows["context"])],
        references=[[r] for r in rows["response"]], metric="rouge", sources=list(rows["instruction"]),
        users=user_ids(rows["category"], user_order))
