"""GLUE: nine sentence and sentence-pair tasks, classification (STS-B: regression).

Local files are the original GLUE TSVs (`<root>/glue/SST-2/train.tsv`, ...). Rows are turned
into the Hugging Face `nyu-mll/glue` schema (same column names, same label integers, an
`idx` column), so `raw` looks the same whether it came from disk or from the Hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch

from rosa_bench.config import DatasetConfig
from rosa_bench.data.files import cap, load_hub, local_files, malformed, pad_id, pad_right, read_table
from rosa_bench.data.task import CLASSIFICATION, REGRESSION, Task
from rosa_bench.errors import choices_error
from rosa_bench.metrics.glue import glue_metrics

BINARY = {"0": 0, "1": 1}
NLI = {"entailment": 0, "not_entailment": 1}
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
MNLI_FILES = {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
              "validation_mismatched": "dev_mismatched.tsv", "test_matched": "test_matched.tsv",
              "test_mismatched": "test_mismatched.tsv"}


@dataclass(frozen=True)
class GlueSpec:
    folder: str  # the original GLUE folder name
    texts: dict[str, str]  # TSV header -> HF column, in model input order
    label: str  # TSV header of the label
    labels: dict[str, int] | None  # label text -> HF class id; None: a float score (STS-B)
    metric: str  # the validation metric that picks the best checkpoint
    files: dict[str, str] = field(default_factory=lambda: SPLIT_FILES)  # split -> file name
    headerless: tuple[str, ...] | None = None  # column names of labelled files without a header

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    @property
    def validation_splits(self) -> list[str]:
        return [split for split in self.files if split.startswith("validation")]


TASKS = {
    "cola": GlueSpec("CoLA", {"sentence": "sentence"}, "label", BINARY, "matthews_correlation",
                     headerless=("source", "label", "annotation", "sentence")),
    "sst2": GlueSpec("SST-2", {"sentence": "sentence"}, "label", BINARY, "accuracy"),
    "mrpc": GlueSpec("MRPC", {"#1 String": "sentence1", "#2 String": "sentence2"}, "Quality", BINARY,
                     "accuracy"),
    "qqp": GlueSpec("QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate",
                    BINARY, "accuracy"),
    "stsb": GlueSpec("STS-B", {"sentence1": "sentence1", "sentence2": "sentence2"}, "score", None,
                     "pearson"),
    "mnli": GlueSpec("MNLI", {"sentence1": "premise", "sentence2": "hypothesis"}, "gold_label",
                     {"entailment": 0, "neutral": 1, "contradiction": 2}, "accuracy", files=MNLI_FILES),
    "qnli": GlueSpec("QNLI", {"question": "question", "sentence": "sentence"}, "label", NLI, "accuracy"),
    "rte": GlueSpec("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", NLI, "accuracy"),
    "wnli": GlueSpec("WNLI", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", BINARY,
                     "accuracy"),
}
INDEX_COLUMNS = ("index", "id")  # the row id GLUE submissions are keyed by


def check(cfg: DatasetConfig) -> None:
    if cfg.task not in TASKS:
        raise choices_error("glue task (dataset.task)", cfg.task, list(TASKS))


def head(cfg: DatasetConfig) -> tuple[str, int]:
    spec = TASKS[cfg.task]
    return (CLASSIFICATION if spec.labels else REGRESSION), spec.num_labels


def run_subdir(cfg: DatasetConfig) -> str:
    return f"glue/{cfg.task}"


def load_raw(cfg: DatasetConfig) -> dict[str, datasets.Dataset]:
    """Rows in the HF glue schema per split, from the data root or else the Hub. Test splits
    (unlabelled) are optional locally; train and validation files are required."""
    spec = TASKS[cfg.task]
    wanted = {split: f"glue/{spec.folder}/{name}" for split, name in spec.files.items()}
    found, missing = local_files(cfg, wanted)
    missing = [path for path in missing if not Path(path).name.startswith("test")]
    if not missing:
        return {split: read_split(path, spec, labelled=not split.startswith("test"))
                for split, path in found.items()}
    hub = load_hub(cfg, cfg.task, missing)
    return {split: _from_hub(hub[split], spec, labelled=not split.startswith("test"))
            for split in spec.files if split in hub}


def _from_hub(rows: datasets.Dataset, spec: GlueSpec, labelled: bool) -> datasets.Dataset:
    """Keep the schema columns; Hub test splits carry label -1, which is dropped."""
    keep = [*spec.texts.values(), *(["label"] if labelled else []), "idx"]
    return rows.select_columns(keep)


def read_split(path: Path, spec: GlueSpec, labelled: bool) -> datasets.Dataset:
    """One GLUE TSV as HF-schema rows; a bad label is a UserError naming file and line."""
    names = spec.headerless if labelled else None
    required = (*spec.texts, *([spec.label] if labelled else []))
    columns: dict[str, list] = {name: [] for name in (*spec.texts.values(), "label", "idx")}
    for number, (line, row) in enumerate(read_table(path, "\t", names=names, required=required)):
        for header, name in spec.texts.items():
            columns[name].append(row[header])
        if labelled:
            columns["label"].append(parse_label(row[spec.label], spec, path, line))
        columns["idx"].append(_index(row, number, path, line))
    if not labelled:
        del columns["label"]
    return datasets.Dataset.from_dict(columns)


def parse_label(text: str, spec: GlueSpec, path: Path, line: int) -> int | float:
    if spec.labels is None:
        try:
            return float(text)
        except ValueError:
            raise malformed(path, line, f"label {text!r} is not a number") from None
    if text not in spec.labels:
        raise malformed(path, line, f"label {text!r} is not one of {sorted(spec.labels)}")
    return spec.labels[text]


def _index(row: dict[str, str], number: int, path: Path, line: int) -> int:
    """The file's own index/id column when it has one (test submissions use it), else the
    0-based row number, as in the HF copy."""
    text = next((row[col] for col in INDEX_COLUMNS if col in row), None)
    if text is None:
        return number
    try:
        return int(text)
    except ValueError:
        raise malformed(path, line, f"index {text!r} is not an integer") from None


def encode(batch: dict[str, list], tokenizer: Any, texts: list[str], max_length: int) -> dict[str, list]:
    """Single sentences or pairs, truncated to max_length; the label becomes `labels`."""
    enc = tokenizer(*(batch[name] for name in texts), truncation=True, max_length=max_length,
                    return_attention_mask=False)
    if "label" in batch:
        enc["labels"] = batch["label"]
    return dict(enc)


def collate(rows: list[dict[str, Any]], pad: int, label_dtype: torch.dtype) -> dict[str, Any]:
    """Dynamic right padding; labels long (classes) or float (STS-B scores); test rows have none."""
    batch = pad_right(rows, {"input_ids": pad, "token_type_ids": 0})
    if "labels" in rows[0]:
        batch["labels"] = torch.tensor([row["labels"] for row in rows], dtype=label_dtype)
    return batch


def build(cfg: DatasetConfig, tokenizer: Any, seed: int) -> Task:
    """Caps take the first rows (eval cap: every non-train split), so `seed` changes nothing."""
    spec = TASKS[cfg.task]
    raw = {split: cap(rows, cfg.max_train_samples if split == "train" else cfg.max_eval_samples)
           for split, rows in load_raw(cfg).items()}
    fn = partial(encode, tokenizer=tokenizer, texts=list(spec.texts.values()), max_length=cfg.max_length)
    splits = {split: rows.map(fn, batched=True, remove_columns=rows.column_names)
              for split, rows in raw.items()}
    kind, num_labels = head(cfg)
    label_dtype = torch.long if kind == CLASSIFICATION else torch.float32
    return Task(
        name=f"glue/{cfg.task}", kind=kind, run_subdir=run_subdir(cfg), splits=splits,
        collate=partial(collate, pad=pad_id(tokenizer), label_dtype=label_dtype),
        validation_splits=spec.validation_splits, metric_name=spec.metric, greater_is_better=True,
        num_labels=num_labels, compute_metrics=partial(glue_metrics, cfg.task), raw=raw,
    )
