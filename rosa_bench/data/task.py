"""The Task: everything the trainer and evaluator need to know about a dataset, in one object.

A dataset module turns a `DatasetConfig` and a tokenizer into a Task; nothing downstream
knows which dataset it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets

CAUSAL_LM = "causal_lm"
CLASSIFICATION = "classification"
REGRESSION = "regression"


@dataclass
class GenerationSet:
    """One split's inputs for scoring generated text: formatted prompts, all references of
    each prompt (E2E groups references by meaning representation), and the name of the
    scorer in rosa_bench.metrics.GENERATION_SCORERS ("e2e", "rouge", "gsm8k", "math")."""

    prompts: list[str]
    references: list[list[str]]
    metric: str
    sources: list[str] = field(default_factory=list)  # the unformatted input (MR, question), for files
    users: list[int] | None = None  # the user of each prompt (dolly), for per-user adapters


@dataclass
class Task:
    name: str  # "e2e", "glue/sst2"
    kind: str  # CAUSAL_LM | CLASSIFICATION | REGRESSION
    run_subdir: str  # folder under output.path: "e2e_nlg", "glue/sst2"
    # Tokenized splits. Keys: "train", one or more validation splits, optionally "test".
    # Rows hold input_ids (+ token_type_ids), and `labels` (token labels with -100 on the prompt
    # for causal tasks; int class or float score for GLUE). Test rows may lack labels.
    splits: dict[str, datasets.Dataset]
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    validation_splits: list[str]  # e.g. ["validation"] or ["validation_matched", "validation_mismatched"]
    metric_name: str  # the validation metric that picks the best checkpoint ("loss", "accuracy", ...)
    greater_is_better: bool
    num_labels: int | None = None  # classification classes; 1 for regression; None for causal
    # classification/regression: (predictions, labels, split=None) -> {metric: value}
    compute_metrics: Callable[..., dict[str, float]] | None = None
    # causal tasks: raw prompts (already formatted) whose generations are logged as text samples
    sample_prompts: list[str] = field(default_factory=list)
    raw: dict[str, datasets.Dataset] = field(default_factory=dict)  # untokenized rows, same keys
    # causal tasks scored on generated text: split -> prompts/references/scorer (may hold splits,
    # such as "test_math", that have no tokenized counterpart), and how to decode them
    generation_sets: dict[str, GenerationSet] = field(default_factory=dict)
    generation: Any = None  # config.GenerationConfig

    @property
    def is_causal(self) -> bool:
        return self.kind == CAUSAL_LM
