"""From a validated config to trained run folder: model, tokenizer, task and method wired
together. train.py and evaluate.py both build through here, so a run is rebuilt exactly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from rosa_bench import runs
from rosa_bench.config import RunConfig
from rosa_bench.data import build_task, default_run_subdir, task_head
from rosa_bench.data.task import Task
from rosa_bench.methods import Method, build_method
from rosa_bench.models import load_model, resolve_model_config


@dataclass
class Components:
    model: nn.Module
    tokenizer: Any
    task: Task
    method: Method


def resolve(run: RunConfig) -> RunConfig:
    """Fill in `model.name=auto` with the dataset's default model."""
    return dataclasses.replace(run, model=resolve_model_config(run.model, run.dataset.default_model))


def build(run: RunConfig) -> Components:
    """Load the model for the task's head, tokenize the data, apply the method (seeded)."""
    set_seed(run.seed)
    kind, num_labels = task_head(run.dataset)
    model, tokenizer, family = load_model(run.model, kind, num_labels)
    task = build_task(run.dataset, tokenizer, seed=run.seed)
    set_seed(run.seed)  # adapter init does not depend on how much randomness loading used
    method = build_method(run.fnmodel)
    model = method.apply(model, family)
    return Components(model, tokenizer, task, method)


def run_folder(run: RunConfig, overrides: list[str]) -> Path:
    return runs.run_dir(run, default_run_subdir(run.dataset), overrides)


def train(run: RunConfig, overrides: list[str]) -> Path:
    """Train (or resume, or skip if complete) the run named by `overrides`; returns its folder."""
    from rosa_bench.train.loop import Trainer

    run = resolve(run)
    folder = run_folder(run, overrides)
    if runs.is_complete(folder):
        print(f"run already complete: {folder} (delete it to train again)")
        return folder
    parts = build(run)  # fails on bad input before the run folder exists
    if run.train.init_from:
        from rosa_bench.train.init_from import load_initial_weights

        fresh = load_initial_weights(run, parts.model, parts.method)
        fresh_note = f" (fresh head: {', '.join(fresh)})" if fresh else ""
        print(f"starting from {run.train.init_from}{fresh_note}")
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_config(folder, run, overrides)
    summary = Trainer(run, folder, parts.model, parts.tokenizer, parts.task, parts.method).fit()
    best = summary["best"]
    print(f"done: {folder}\n  best valid {best.get('metric')}={best.get('value')} at step {best.get('step')}")
    return folder
