"""E2E NLG challenge: generate a restaurant description from a meaning representation.

Causal LM: each row is `prompt.format(mr=mr)` followed by the reference and eos; the loss
covers the reference tokens only. `raw` keeps (mr, ref) rows, several refs per MR, for
evaluations that group references by MR.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import datasets

from rosa_bench.config import DatasetConfig
from rosa_bench.data.files import cap, load_hub, local_files, pad_id, pad_right, read_table
from rosa_bench.data.task import CAUSAL_LM, GenerationSet, Task
from rosa_bench.errors import UserError

FILES = {"train": "e2e/trainset.csv", "validation": "e2e/devset.csv", "test": "e2e/testset_w_refs.csv"}
HUB_COLUMNS = {"meaning_representation": "mr", "target": "ref"}  # GEM/e2e_nlg field names
IGNORE = -100  # label value the loss skips


def check(cfg: DatasetConfig) -> None:
    if cfg.task is not None:
        raise UserError(f"dataset.task={cfg.task!r} is not used by e2e; leave it null")
    try:
        cfg.prompt.format(mr="")
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"dataset.prompt={cfg.prompt!r} must be a format string whose only field "
                        f"is {{mr}} ({type(err).__name__}: {err})") from None


def head(cfg: DatasetConfig) -> tuple[str, int | None]:
    return CAUSAL_LM, None


def run_subdir(cfg: DatasetConfig) -> str:
    return "e2e_nlg"


def load_raw(cfg: DatasetConfig) -> dict[str, datasets.Dataset]:
    """All (mr, ref) rows per split, from the data root or else the Hub."""
    found, missing = local_files(cfg, FILES)
    if not missing:
        return {split: _read_csv(path) for split, path in found.items()}
    hub = load_hub(cfg, None, missing)
    return {split: hub[split].select_columns(list(HUB_COLUMNS)).rename_columns(HUB_COLUMNS)
            for split in FILES}


def _read_csv(path: Path) -> datasets.Dataset:
    rows = [row for _, row in read_table(path, ",", required=("mr", "ref"))]
    return datasets.Dataset.from_dict({"mr": [r["mr"] for r in rows], "ref": [r["ref"] for r in rows]})


def eos_id(tokenizer: Any) -> int:
    """The token that ends a reference; encoder tokenizers (BERT) have [SEP] instead of eos."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eos is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has no eos (or sep) token to end "
                        "the generated text")
    return eos


def encode(batch: dict[str, list], tokenizer: Any, prompt: str, max_length: int,
           eos: int, source: str = "mr", target: str = "ref") -> dict[str, list]:
    """Prompt tokens (with the tokenizer's usual special tokens) + reference tokens + eos,
    truncated to max_length; labels are IGNORE on the prompt so only the reference is learned.
    Other causal datasets reuse it with their own `source` (prompt field) and `target` columns."""
    prompts = tokenizer([prompt.format(**{source: x}) for x in batch[source]],
                        add_special_tokens=True)["input_ids"]
    refs = tokenizer(batch[target], add_special_tokens=False)["input_ids"]
    input_ids = [(p + r + [eos])[:max_length] for p, r in zip(prompts, refs)]
    labels = [([IGNORE] * len(p) + r + [eos])[:max_length] for p, r in zip(prompts, refs)]
    return {"input_ids": input_ids, "labels": labels}


def collate(rows: list[dict[str, Any]], pad: int) -> dict[str, Any]:
    """Right padding; padded positions get IGNORE labels and a zero attention mask."""
    return pad_right(rows, {"input_ids": pad, "labels": IGNORE})


def grouped(rows: datasets.Dataset, prompt: str) -> GenerationSet:
    """One prompt per distinct MR (first-seen order) with all its references, as the E2E
    evaluation scores them (the test set: 630 MRs)."""
    refs: dict[str, list[str]] = {}
    for mr, ref in zip(rows["mr"], rows["ref"]):
        refs.setdefault(mr, []).append(ref)
    return GenerationSet(prompts=[prompt.format(mr=mr) for mr in refs], references=list(refs.values()),
                         metric="e2e", sources=list(refs))


def build(cfg: DatasetConfig, tokenizer: Any, seed: int) -> Task:
    """E2E and its caps take the first rows of each file, so `seed` changes nothing here."""
    raw = load_raw(cfg)
    raw = {split: cap(rows, cfg.max_train_samples if split == "train" else cfg.max_eval_samples)
           for split, rows in raw.items()}
    fn = partial(encode, tokenizer=tokenizer, prompt=cfg.prompt, max_length=cfg.max_length,
                 eos=eos_id(tokenizer))
    splits = {split: rows.map(fn, batched=True, remove_columns=rows.column_names)
              for split, rows in raw.items()}
    prompts = dict.fromkeys(cfg.prompt.format(mr=mr) for mr in raw["validation"]["mr"])
    return Task(
        name="e2e", kind=CAUSAL_LM, run_subdir=run_subdir(cfg), splits=splits,
        collate=partial(collate, pad=pad_id(tokenizer)), validation_splits=["validation"],
        metric_name="loss", greater_is_better=False,
        sample_prompts=list(prompts)[:cfg.num_samples_to_log], raw=raw,
        generation_sets={split: grouped(raw[split], cfg.prompt) for split in ("validation", "test")},
        generation=cfg.generation,
    )
