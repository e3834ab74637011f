"""Datasets: a registry from `dataset.name` to the module that turns files into a Task.

A dataset module provides four functions; adding a dataset is one more module and one more
entry in DATASETS:

- `check(cfg)`: reject bad dataset options without touching the file system (it runs
  before the model is loaded);
- `head(cfg) -> (kind, num_labels)`: the model head the task needs (Task.kind constants);
- `run_subdir(cfg) -> str`: the task's folder under output.path;
- `build(cfg, tokenizer, seed) -> Task`: read (or download) and tokenize the data.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from rosa_bench.config import DatasetConfig
from rosa_bench.data import dolly, e2e, eli5, glue
from rosa_bench.data import math as math_problems
from rosa_bench.data.task import Task
from rosa_bench.errors import UserError, choices_error

DATASETS: dict[str, ModuleType] = {"e2e": e2e, "glue": glue, "eli5": eli5, "gsm8k": math_problems,
                                   "metamathqa": math_problems, "dolly": dolly}


def dataset_names() -> list[str]:
    return list(DATASETS)


def _module(cfg: DatasetConfig) -> ModuleType:
    if cfg.name not in DATASETS:
        raise choices_error("dataset", cfg.name, dataset_names())
    return DATASETS[cfg.name]


def check_dataset_config(cfg: DatasetConfig) -> None:
    """Options every dataset shares, then the dataset's own; no file system access."""
    module = _module(cfg)
    for key in ("max_train_samples", "max_eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise UserError(f"dataset.{key}={value!r} must be > 0 (or null for every row)")
    if cfg.max_length <= 0:
        raise UserError(f"dataset.max_length={cfg.max_length!r} must be > 0")
    if cfg.num_samples_to_log < 0:
        raise UserError(f"dataset.num_samples_to_log={cfg.num_samples_to_log!r} must be >= 0")
    if cfg.user_order != "sorted" and not hasattr(module, "USER_ORDERS"):
        raise UserError(f"dataset.user_order={cfg.user_order!r}: dataset {cfg.name} names no users; "
                        "leave it sorted")
    module.check(cfg)


def task_head(cfg: DatasetConfig) -> tuple[str, int | None]:
    """(Task kind, num_labels) so the right model head is loaded before the data is read."""
    check_dataset_config(cfg)
    return _module(cfg).head(cfg)


def build_task(cfg: DatasetConfig, tokenizer: Any, seed: int = 0) -> Task:
    """The tokenized Task for `cfg`; raises UserError for bad options or unavailable data."""
    check_dataset_config(cfg)
    task = _module(cfg).build(cfg, tokenizer, seed)
    for split in ["train", *task.validation_splits]:
        if len(task.splits[split]) == 0:
            raise UserError(f"dataset {task.name}: the {split} split has no rows "
                            f"(dataset.cache={cfg.cache!r}); check its file")
    return task


def default_run_subdir(cfg: DatasetConfig) -> str:
    """Folder under output.path for this dataset/task: "e2e_nlg", "glue/sst2"."""
    check_dataset_config(cfg)
    return _module(cfg).run_subdir(cfg)


__all__ = ["build_task", "check_dataset_config", "dataset_names", "default_run_subdir", "task_head"]
