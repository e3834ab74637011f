"""Score a run folder on one split: rebuild the run from its config.yaml, load a checkpoint,
merge the adapters when the method allows, then decode and score (causal tasks) or predict
(GLUE). Outputs go into the run folder: predictions, references, `eval_<split>.json`, and
TensorBoard scalars under test/ or valid/. Nothing is written until decoding has finished,
and every file is written atomically, so a crash leaves no half-written score file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from rosa_bench import runs
from rosa_bench.data.task import GenerationSet, Task
from rosa_bench.errors import UserError, choices_error
from rosa_bench.generation import generate
from rosa_bench.metrics import GENERATION_SCORERS
from rosa_bench.train import checkpoint as ckpt
from rosa_bench.train.evaluation import evaluate_split
from rosa_bench.train.logger import RunLogger

CHECKPOINTS = ("best", "last")


def capped(gen: GenerationSet, limit: int | None) -> GenerationSet:
    if limit is None or limit >= len(gen.prompts):
        return gen
    return dataclasses.replace(gen, prompts=gen.prompts[:limit], references=gen.references[:limit],
                               sources=gen.sources[:limit],
                               users=None if gen.users is None else gen.users[:limit])


def generation_scores(model: nn.Module, tokenizer: Any, task: Task, split: str, limit: int | None = None,
                      progress: bool = True) -> tuple[dict[str, Any], list[str], GenerationSet]:
    """Decode the split's prompts with the task's protocol and score them with its scorer.
    The trainer calls this too (logging.eval_generate_every)."""
    gen = capped(task.generation_sets[split], limit)
    predictions = generate(model, tokenizer, gen.prompts, task.generation, progress=progress,
                           desc=f"generate {split}", users=gen.users)
    scores = GENERATION_SCORERS[gen.metric](predictions, gen.references)
    scores["empty_predictions"] = float(sum(not p for p in predictions))
    return scores, predictions, gen


def split_choices(task: Task) -> list[str]:
    return sorted((set(task.splits) | set(task.generation_sets)) - {"train"})


def load_checkpoint(folder: Path, which: str) -> Path:
    if which not in CHECKPOINTS:
        raise choices_error("checkpoint", which, CHECKPOINTS)
    path = runs.checkpoint_dir(folder, which)
    if not ckpt.has_checkpoint(path):
        present = [c for c in CHECKPOINTS if ckpt.has_checkpoint(runs.checkpoint_dir(folder, c))]
        raise UserError(f"run {folder} has no '{which}' checkpoint ({path}); checkpoints present: "
                        f"{', '.join(present) or 'none (the run saved nothing yet)'}")
    return path


def evaluate_run(folder: str | Path, split: str = "test", checkpoint: str = "best",
                 max_samples: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Score `folder` on `split`; returns what it writes to eval_<split>.json."""
    from rosa_bench.pipeline import build

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist")
    if max_samples is not None and max_samples <= 0:
        raise UserError(f"--max-samples={max_samples} must be > 0")
    run = runs.read_config(folder)
    path = load_checkpoint(folder, checkpoint)
    # the train split is never used here: tokenize one row of it only; the training-time cap on
    # evaluation rows (a validation budget) does not cut the scored split: --max-samples does
    run = dataclasses.replace(run, dataset=dataclasses.replace(run.dataset, max_train_samples=1,
                                                               max_eval_samples=None))
    parts = build(run)
    if split not in split_choices(parts.task):
        raise choices_error(f"split of dataset {parts.task.name}", split, split_choices(parts.task))
    model = parts.model
    parts.method.load_checkpoint_state(model, ckpt.load_model_state(path))
    if parts.method.mergeable:
        model = parts.method.merge(model)
    model.eval()
    step = ckpt.load_state(path).get("global_step", 0)
    files: dict[str, str] = {}
    if parts.task.is_causal:
        scores = causal_scores(model, parts, split, max_samples, progress, folder, files)
    else:
        scores = classification_scores(model, parts.task, split, max_samples, run.train, folder, files)
    result = {"split": split, "checkpoint": checkpoint, "step": step, "task": parts.task.name,
              "method": run.fnmodel.name, "model": run.model.name, "max_samples": max_samples,
              "scores": scores, "files": files}
    if parts.task.is_causal and split in parts.task.generation_sets:
        result["generation"] = dataclasses.asdict(parts.task.generation)
        result["metric"] = parts.task.generation_sets[split].metric
    runs.write_json(folder / f"eval_{split}.json", result)
    log_scores(folder, split, scores, step)
    return result


def causal_scores(model: nn.Module, parts: Any, split: str, limit: int | None, progress: bool,
                  folder: Path, files: dict[str, str]) -> dict[str, Any]:
    """Loss / perplexity on the split's references (when tokenized), then generation scores."""
    task, scores = parts.task, {}
    if split in task.splits:
        rows = task.splits[split]
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
        loader = DataLoader(rows, batch_size=task.generation.batch_size, collate_fn=task.collate)
        scores |= evaluate_split(model, task, loader, next(model.parameters()).device)
    if split in task.generation_sets:
        gen_scores, predictions, gen = generation_scores(model, parts.tokenizer, task, split, limit, progress)
        scores |= gen_scores
        files |= write_generations(folder, split, predictions, gen)
    return scores


def write_generations(folder: Path, split: str, predictions: list[str], gen: GenerationSet) -> dict[str, str]:
    """JSON Lines of (source, prompt, prediction, references); for E2E also the plain-text
    layout of the official e2e-metrics script: one prediction per line, and reference groups
    (one reference per line) separated by blank lines."""
    lines = [json.dumps({"source": s, "prompt": p, "prediction": o, "references": r}, ensure_ascii=False)
             for s, p, o, r in zip(gen.sources or gen.prompts, gen.prompts, predictions, gen.references)]
    out = {"predictions": f"predictions_{split}.jsonl"}
    runs.atomic_write_text(folder / out["predictions"], "\n".join(lines) + "\n")
    if gen.metric == "e2e":
        out |= {"e2e_predictions": f"predictions_{split}.txt", "e2e_references": f"references_{split}.txt"}
        one_line = [" ".join(p.split()) for p in predictions]
        runs.atomic_write_text(folder / out["e2e_predictions"], "\n".join(one_line) + "\n")
        groups = ["\n".join(" ".join(r.split()) for r in refs) for refs in gen.references]
        runs.atomic_write_text(folder / out["e2e_references"], "\n\n".join(groups) + "\n")
    return out


@torch.no_grad()
def predict(model: nn.Module, task: Task, rows: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Class ids (or STS-B scores) for every row, and the labels when the split has them."""
    predictions, labels = [], []
    device = next(model.parameters()).device
    for batch in DataLoader(rows, batch_size=batch_size, collate_fn=task.collate):
        gold = batch.pop("labels", None)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        predictions.append(logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1))
        if gold is not None:
            labels.append(gold)
    pred = torch.cat(predictions).cpu().numpy()
    return pred, (torch.cat(labels).numpy() if labels else None)


def classification_scores(model: nn.Module, task: Task, split: str, limit: int | None, train_cfg: Any,
                          folder: Path, files: dict[str, str]) -> dict[str, Any]:
    """The task metric on labelled splits; every split's predictions in GLUE's submission
    format (`index<TAB>prediction`, label names as in the GLUE files)."""
    rows, raw = task.splits[split], task.raw[split]
    if limit:
        rows, raw = rows.select(range(min(limit, len(rows)))), raw.select(range(min(limit, len(raw))))
    pred, labels = predict(model, task, rows, train_cfg.eval_batch_size or train_cfg.batch_size)
    name = f"predictions_{split}.tsv"
    text = [f"{i}\t{submission_label(task, p)}" for i, p in zip(raw["idx"], pred)]
    runs.atomic_write_text(folder / name, "\n".join(["index\tprediction", *text]) + "\n")
    files["predictions"] = name
    return task.compute_metrics(pred, labels, split=split) if labels is not None else {}


def submission_label(task: Task, prediction: Any) -> str:
    from rosa_bench.data.glue import TASKS

    labels = TASKS[task.name.split("/", 1)[1]].labels
    if labels is None:
        return f"{min(max(float(prediction), 0.0), 5.0):.3f}"  # STS-B scores lie in [0, 5]
    names = {index: text for text, index in labels.items()}
    return names[int(prediction)]


def log_scores(folder: Path, split: str, scores: dict[str, Any], step: int) -> None:
    """Numeric scores into the run's TensorBoard: test/<score> or valid/<score>."""
    prefix = "test" if split.startswith("test") else "valid"
    suffix = split.split("_", 1)[1] if "_" in split else ""
    logger = RunLogger(folder)
    logger.scalars({f"{prefix}{'_' + suffix if suffix else ''}/{k}": float(v) for k, v in scores.items()
                    if isinstance(v, (int, float)) and math.isfinite(v)}, step)
    logger.close()
