"""ELI5: answer a Reddit "explain like I'm five" question; scored by perplexity on the
reference answers and ROUGE-1/2/L of greedy generations.

Local files (<root>/eli5/, no ELI5 train split exists offline): train on ELI5-Category's test
file (`eli5_category_test.json`, the Engineering questions), validate on its validation-2
file (`eli5_category_validation2.json`), test on the ALCE ELI5 subset (`eli5.json`, 1,000
questions). Category rows train on their best-scored answer and are scored against all their
answers. Hub (`dataset.hub_id`, default sentence-transformers/eli5: question/answer pairs, one
train split): the last 2 x HUB_HELD_OUT rows become validation and test.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import datasets

from rosa_bench.config import DatasetConfig
from rosa_bench.data import e2e
from rosa_bench.data.files import cap, load_hub, local_files, pad_id, read_json_rows
from rosa_bench.data.task import CAUSAL_LM, GenerationSet, Task
from rosa_bench.errors import UserError

FILES = {"train": "eli5/eli5_category_test.json", "validation": "eli5/eli5_category_validation2.json",
         "test": "eli5/eli5.json"}
HUB_HELD_OUT = 1000


def check(cfg: DatasetConfig) -> None:
    if cfg.task is not None:
        raise UserError(f"dataset.task={cfg.task!r} is not used by eli5; leave it null")
    if "{question}" not in cfg.prompt:
        raise UserError(f"dataset.prompt={cfg.prompt!r} must contain the field {{question}}")


def head(cfg: DatasetConfig) -> tuple[str, int | None]:
    return CAUSAL_LM, None


def run_subdir(cfg: DatasetConfig) -> str:
    return "eli5"


def _rows(path: Path) -> datasets.Dataset:
    """(question, answer, answers) rows from an ELI5-Category file or the ALCE file."""
    if "answers" in read_json_rows(path, ())[0]:
        rows = read_json_rows(path, ("title", "answers"))
        pairs = [(r["title"], [t for _, t in sorted(zip(r["answers"]["score"], r["answers"]["text"]),
                                                    key=lambda st: -st[0])]) for r in rows]
    else:
        pairs = [(r["question"], [r["answer"]]) for r in read_json_rows(path, ("question", "answer"))]
    pairs = [(q, [a for a in answers if a.strip()]) for q, answers in pairs]
    pairs = [(q, answers) for q, answers in pairs if answers]
    return datasets.Dataset.from_dict({"question": [q for q, _ in pairs], "answer": [a[0] for _, a in pairs],
                                       "answers": [a for _, a in pairs]})


def load_raw(cfg: DatasetConfig) -> dict[str, datasets.Dataset]:
    found, missing = local_files(cfg, FILES)
    if not missing:
        return {split: _rows(path) for split, path in found.items()}
    rows = load_hub(cfg, None, missing)["train"].select_columns(["question", "answer"])
    rows = rows.map(lambda r: {"answers": [r["answer"]]})
    if len(rows) <= 2 * HUB_HELD_OUT:
        raise UserError(f"hub copy {cfg.hub_id!r} has {len(rows)} rows; need more than {2 * HUB_HELD_OUT}")
    n = len(rows)
    return {"train": rows.select(range(n - 2 * HUB_HELD_OUT)),
            "validation": rows.select(range(n - 2 * HUB_HELD_OUT, n - HUB_HELD_OUT)),
            "test": rows.select(range(n - HUB_HELD_OUT, n))}


def build(cfg: DatasetConfig, tokenizer: Any, seed: int) -> Task:
    """Caps take the first rows of each split, so `seed` changes nothing here."""
    raw = {split: cap(rows, cfg.max_train_samples if split == "train" else cfg.max_eval_samples)
           for split, rows in load_raw(cfg).items()}
    fn = partial(e2e.encode, tokenizer=tokenizer, prompt=cfg.prompt, max_length=cfg.max_length,
                 eos=e2e.eos_id(tokenizer), source="question", target="answer")
    splits = {split: rows.map(lambda r: {"answer": " " + r["answer"]}).map(
        fn, batched=True, remove_columns=rows.column_names) for split, rows in raw.items()}
    sets = {split: GenerationSet(prompts=[cfg.prompt.format(question=q) for q in raw[split]["question"]],
                                 references=list(raw[split]["answers"]), metric="rouge",
                                 sources=list(raw[split]["question"]))
            for split in ("validation", "test")}
    return Task(
        name="eli5", kind=CAUSAL_LM, run_subdir=run_subdir(cfg), splits=splits,
        collate=partial(e2e.collate, pad=pad_id(tokenizer)), validation_splits=["validation"],
        metric_name="loss", greater_is_better=False,
        sample_prompts=sets["validation"].prompts[:cfg.num_samples_to_log], raw=raw,
        generation_sets=sets, generation=cfg.generation,
    )
