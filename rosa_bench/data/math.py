"""Math word problems, MetaMath's protocol: train on MetaMathQA (or on GSM8K train, which
works offline), score greedy generations on GSM8K test and, when its files are present, on
MATH test.

Every example is an Alpaca-style prompt ending "### Response: Let's think step by step."
followed by the worked solution, which ends "The answer is: <answer>". GSM8K solutions are
put in the same form (calculator annotations removed, "The answer is: " after "#### ").
The last VALIDATION_ROWS rows of the training source are held out as the validation split.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from rosa_bench.config import DatasetConfig
from rosa_bench.data import e2e
from rosa_bench.data.files import cap, load_hub, local_files, pad_id, read_json_rows
from rosa_bench.data.task import CAUSAL_LM, GenerationSet, Task
from rosa_bench.errors import UserError
from rosa_bench.metrics.math import ANSWER_MARKER, GSM8K_GOLD_MARKER, last_boxed

VALIDATION_ROWS = 200
GSM8K_FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}
GSM8K_HUB = ("openai/gsm8k", "main")
MATH_TEST = "math/test.jsonl"
METAMATHQA_DIR = "metamathqa"


def check(cfg: DatasetConfig) -> None:
    if cfg.task is not None:
        raise UserError(f"dataset.task={cfg.task!r} is not used by {cfg.name}; leave it null")
    if "{query}" not in cfg.prompt:
        raise UserError(f"dataset.prompt={cfg.prompt!r} must contain the field {{query}}")


def head(cfg: DatasetConfig) -> tuple[str, int | None]:
    return CAUSAL_LM, None


def run_subdir(cfg: DatasetConfig) -> str:
    return cfg.name


def gsm8k_response(answer: str) -> str:
    """A GSM8K solution in MetaMathQA's form: no <<48/2=24>> annotations, answer stated."""
    body = re.sub(r"<<[^>]*>>", "", answer)
    gold = body.rsplit(GSM8K_GOLD_MARKER, 1)[-1].strip()
    return f"{body}\n{ANSWER_MARKER}{gold}"


def _gsm8k(cfg: DatasetConfig) -> dict[str, datasets.Dataset]:
    """GSM8K train and test as (query, response) rows, from the data root or the Hub."""
    found, missing = local_files(cfg, GSM8K_FILES)
    if missing:
        hub = load_hub(replace(cfg, hub_id=GSM8K_HUB[0]), GSM8K_HUB[1], missing)
        rows = {split: hub[split].to_list() for split in GSM8K_FILES}
    else:
        rows = {split: read_json_rows(path, ("question", "answer")) for split, path in found.items()}
    return {split: datasets.Dataset.from_dict({"query": [r["question"] for r in split_rows],
                                               "response": [gsm8k_response(r["answer"]) for r in split_rows]})
            for split, split_rows in rows.items()}


def _metamathqa(cfg: DatasetConfig) -> datasets.Dataset:
    """Every *.json under <root>/metamathqa/ (MetaMathQA's own file format), else the Hub."""
    folder = Path(cfg.cache).expanduser() / METAMATHQA_DIR if cfg.cache else Path(METAMATHQA_DIR)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return load_hub(cfg, None, [f"{folder}/*.json"])["train"].select_columns(["query", "response"])
    rows = [row for path in files for row in read_json_rows(path, ("query", "response"))]
    return datasets.Dataset.from_dict({"query": [r["query"] for r in rows],
                                       "response": [r["response"] for r in rows]})


def _math_test(cfg: DatasetConfig) -> list[dict[str, Any]] | None:
    found, _ = local_files(cfg, {"test": MATH_TEST})
    return read_json_rows(found["test"], ("problem", "solution")) if found else None


def load_raw(cfg: DatasetConfig) -> dict[str, datasets.Dataset]:
    """train / validation (held out from the training source) / test (GSM8K test)."""
    gsm8k = _gsm8k(cfg)
    source = _metamathqa(cfg) if cfg.name == "metamathqa" else gsm8k["train"]
    if len(source) <= VALIDATION_ROWS:
        raise UserError(f"dataset {cfg.name}: {len(source)} training rows, need more than "
                        f"{VALIDATION_ROWS} (the held-out validation rows)")
    cut = len(source) - VALIDATION_ROWS
    return {"train": source.select(range(cut)), "validation": source.select(range(cut, len(source))),
            "test": gsm8k["test"]}


def answer_of(response: str) -> str:
    """The gold answer stated in a training-format response."""
    return response.rsplit(ANSWER_MARKER, 1)[-1].strip()


def build(cfg: DatasetConfig, tokenizer: Any, seed: int) -> Task:
    """Caps take the first rows of each split, so `seed` changes nothing here."""
    raw = {split: cap(rows, cfg.max_train_samples if split == "train" else cfg.max_eval_samples)
           for split, rows in load_raw(cfg).items()}
    fn = partial(e2e.encode, tokenizer=tokenizer, prompt=cfg.prompt, max_length=cfg.max_length,
                 eos=e2e.eos_id(tokenizer), source="query", target="response")
    targets = {split: rows.map(lambda r: {"response": " " + r["response"]}) for split, rows in raw.items()}
    splits = {split: rows.map(fn, batched=True, remove_columns=rows.column_names)
              for split, rows in targets.items()}
    sets = {split: GenerationSet(prompts=[cfg.prompt.format(query=q) for q in raw[split]["query"]],
                                 references=[[answer_of(r)] for r in raw[split]["response"]],
                                 metric="gsm8k", sources=list(raw[split]["query"]))
            for split in ("validation", "test")}
    math_rows = _math_test(cfg)
    if math_rows is not None:
        math_rows = math_rows[:cfg.max_eval_samples] if cfg.max_eval_samples else math_rows
        sets["test_math"] = GenerationSet(
            prompts=[cfg.prompt.format(query=r["problem"]) for r in math_rows],
            references=[[last_boxed(r["solution"]) or r["solution"]] for r in math_rows],
            metric="math", sources=[r["problem"] for r in math_rows])
    return Task(
        name=cfg.name, kind=CAUSAL_LM, run_subdir=run_subdir(cfg), splits=splits,
        collate=partial(e2e.collate, pad=pad_id(tokenizer)), validation_splits=["validation"],
        metric_name="loss", greater_is_better=False,
        sample_prompts=sets["validation"].prompts[:cfg.num_samples_to_log], raw=raw,
        generation_sets=sets, generation=cfg.generation,
    )
