"""Score a run folder on one split: rebuild the run from its config.yaml, load a checkpoint,
merge the adapters when the method allows, then decode and score (causal tasks) or predict
(GLUE). Outputs go into the run folder: predictions, references, `eval_<split>.json`, and
TensorBoard scalars under test/ or valid/. Nothing is written until decoding has finished,
and every file is written atomically, so a crash leaves no half-written score file.

Decoding and scoring settings may be overridden (`dataset.generation.num_beams=4`); the
outputs of such an evaluation carry the overrides in their names, so two decodings of one run
never overwrite each other. Overrides that would change the trained model are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn
from torch.utils.data import DataLoader

from rosa_bench import runs
from rosa_bench.config import RunConfig, validate
from rosa_bench.data.task import GenerationSet, Task
from rosa_bench.errors import UserError, choices_error
from rosa_bench.generation import generate
from rosa_bench.metrics import GENERATION_SCORERS
from rosa_bench.train import checkpoint as ckpt
from rosa_bench.train.evaluation import evaluate_split, length_sorted_loader
from rosa_bench.train.logger import RunLogger

CHECKPOINTS = ("best", "last")
# dataset.generation.precision: decoding in bf16 takes about half the fp32 time on a CPU with
# bf16 instructions (and on GPUs), at the cost of bf16 rounding in the beams' scores.
DECODING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# What evaluate.py may change in a trained run's config: how outputs are decoded and scored,
# where data and converted models are read from. Everything else shaped the trained model.
EVAL_OVERRIDES = ("dataset.generation.", "dataset.cache", "model.cache_dir", "train.eval_batch_size",
                  "fnmodel.adapter_device")
# Overrides that change no output (only speed or file locations): not part of output names.
UNNAMED_OVERRIDES = ("dataset.cache", "model.cache_dir", "train.eval_batch_size", "fnmodel.adapter_device",
                     "dataset.generation.batch_size")


def capped(gen: GenerationSet, limit: int | None) -> GenerationSet:
    if limit is None or limit >= len(gen.prompts):
        return gen
    return dataclasses.replace(gen, prompts=gen.prompts[:limit], references=gen.references[:limit],
                               sources=gen.sources[:limit],
                               users=None if gen.users is None else gen.users[:limit])


def generation_scores(model: nn.Module, tokenizer: Any, task: Task, split: str, limit: int | None = None,
                      progress: bool = True, decode: Callable[..., list[str]] | None = None,
                      ) -> tuple[dict[str, Any], list[str], GenerationSet]:
    """Decode the split's prompts with the task's protocol and score them with its scorer.
    The trainer calls this too (logging.eval_generate_every), decoding with its processes."""
    gen = capped(task.generation_sets[split], limit)
    predictions = (decode or generate)(model, tokenizer, gen.prompts, task.generation, progress=progress,
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


def _allowed(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in EVAL_OVERRIDES)


def run_config(folder: str | Path, overrides: list[str] | tuple[str, ...] = (),
               trust_remote_code: bool = False) -> RunConfig:
    """The run's saved config with evaluation-time `overrides` (key=value) applied; an override
    that would change the trained model (method, model, rank, data, ...) is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist")
    saved = runs.read_config_dict(folder)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. dataset.generation.num_beams=4)")
        if not _allowed(key):
            raise UserError(f"override {item!r} would change the trained model or its data; evaluate.py "
                            f"accepts only: dataset.generation.<key> (num_beams, length_penalty, "
                            f"max_new_tokens, ...), {', '.join(k for k in EVAL_OVERRIDES if '.' != k[-1])}")
    try:
        merged = OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise UserError(f"bad override in {list(overrides)}: {str(err).splitlines()[0]}") from None
    return runs.refuse_untrusted(folder, validate(merged), trust_remote_code)


def decoding_tag(overrides: list[str] | tuple[str, ...]) -> str:
    """The overrides that change outputs, as a stable name part: 'length_penalty=0.8,num_beams=4'."""
    named = [o.removeprefix("dataset.generation.") for o in overrides
             if not o.partition("=")[0].startswith(UNNAMED_OVERRIDES)]
    return ",".join(sorted(named))


def restore(folder: Path, checkpoint: str, run: RunConfig) -> tuple[Any, int]:
    """The run's model as trained (adapters still separate) with `checkpoint` loaded, as
    pipeline Components, and the checkpoint's step. The train split is never used: one row
    of it is tokenized."""
    from rosa_bench.pipeline import build

    path = load_checkpoint(folder, checkpoint)
    run = dataclasses.replace(run, dataset=dataclasses.replace(run.dataset, max_train_samples=1))
    parts = build(run)
    parts.method.load_checkpoint_state(parts.model, ckpt.load_model_state(path))
    parts.model.eval()
    return parts, ckpt.load_state(path).get("global_step", 0)


def evaluate_run(folder: str | Path, split: str = "test", checkpoint: str = "best",
                 max_samples: int | None = None, progress: bool = True,
                 overrides: list[str] | tuple[str, ...] = (),
                 trust_remote_code: bool = False, loss: bool = True) -> dict[str, Any]:
    """Score `folder` on `split`; returns what it writes to eval_<split>[,<overrides>].json.
    `loss=False` skips a causal task's loss over the split's reference rows (E2E test: 4,693
    rows, as long as a third of the decoding on a CPU) and keeps only the generation scores."""
    folder = Path(folder)
    if max_samples is not None and max_samples <= 0:
        raise UserError(f"--max-samples={max_samples} must be > 0")
    run = run_config(folder, overrides, trust_remote_code)
    # The training-time cap (dataset.max_eval_samples, for quick validation) never shrinks the
    # split scored here: --max-samples is the only cap, and it counts inputs.
    run = dataclasses.replace(run, dataset=dataclasses.replace(run.dataset, max_eval_samples=None))
    parts, step = restore(folder, checkpoint, run)
    if split not in split_choices(parts.task):
        raise choices_error(f"split of dataset {parts.task.name}", split, split_choices(parts.task))
    model = parts.method.merge(parts.model) if parts.method.mergeable else parts.model
    tag = decoding_tag(overrides)
    name = f"{split},{tag}" if tag else split
    files: dict[str, str] = {"eval": f"eval_{name}.json"}
    if parts.task.is_causal:
        scores, scored = causal_scores(model, parts, split, max_samples, progress, folder, name, files, loss)
    else:
        scores, scored = classification_scores(model, parts.task, split, max_samples, run.train, folder,
                                               name, files)
    result = {"split": split, "checkpoint": checkpoint, "step": step, "task": parts.task.name,
              "method": run.fnmodel.name, "model": run.model.name, "max_samples": max_samples,
              "overrides": list(overrides), "scored": scored, "scores": scores, "files": files}
    if parts.task.is_causal and split in parts.task.generation_sets:
        result["generation"] = dataclasses.asdict(parts.task.generation)
        result["metric"] = parts.task.generation_sets[split].metric
    runs.write_json(folder / files["eval"], result)
    log_scores(folder, split, scores, step, tag)
    return result


INPUT_UNITS = {"e2e": "meaning representations", "gsm8k": "questions", "math": "problems"}


def summary(result: dict[str, Any]) -> str:
    """One line saying what was scored: how many inputs of how many (E2E: meaning
    representations, with their references), and on how many rows loss was measured."""
    scored = result["scored"]
    unit = INPUT_UNITS.get(result.get("metric", ""), "inputs")
    text = f"{result['split']}: scored {scored['inputs']} of {scored['inputs_in_split']} {unit}"
    if "references" in scored:
        text += f" ({scored['references']} references)"
    if "loss_rows" in scored:
        text += f"; loss on {scored['loss_rows']} reference rows"
    return f"{text}; checkpoint {result['checkpoint']} (step {result['step']}) -> {result['files']['eval']}"


def loss_rows(rows: Any, gen: GenerationSet | None, limit: int | None) -> Any:
    """The rows whose loss is measured: with a limit, those of the scored inputs. A split with
    one row per reference in input order (E2E: several references per MR) keeps the first N
    inputs' references; otherwise the first N rows."""
    if not limit:
        return rows
    count = limit
    if gen is not None and sum(map(len, gen.references)) == len(rows):
        count = sum(len(refs) for refs in gen.references[:limit])
    return rows.select(range(min(count, len(rows))))


def causal_scores(model: nn.Module, parts: Any, split: str, limit: int | None, progress: bool,
                  folder: Path, name: str, files: dict[str, str],
                  loss: bool = True) -> tuple[dict[str, Any], dict[str, int]]:
    """Loss / perplexity on the split's references (when tokenized and `loss`), then generation
    scores; and how many inputs, references and rows were scored."""
    task, scores, scored = parts.task, {}, {}
    full_gen = task.generation_sets.get(split)
    if split in task.splits and (loss or full_gen is None):
        rows = loss_rows(task.splits[split], full_gen, limit)
        loader = length_sorted_loader(rows, task.generation.batch_size, task.collate)
        scores |= evaluate_split(model, task, loader, next(model.parameters()).device)
        scored |= {"loss_rows": len(rows), "inputs": len(rows), "inputs_in_split": len(task.splits[split])}
    if full_gen is not None:
        model.to(DECODING_DTYPES[task.generation.precision])  # after the loss pass, which stays fp32
        gen_scores, predictions, gen = generation_scores(model, parts.tokenizer, task, split, limit, progress)
        scores |= gen_scores
        files |= write_generations(folder, name, predictions, gen)
        scored |= {"inputs": len(gen.prompts), "inputs_in_split": len(full_gen.prompts),
                   "references": sum(map(len, gen.references))}
    return scores, scored


def write_generations(folder: Path, name: str, predictions: list[str], gen: GenerationSet) -> dict[str, str]:
    """JSON Lines of (source, prompt, prediction, references); for E2E also the plain-text
    layout of the official e2e-metrics script: one prediction per line, and reference groups
    (one reference per line) separated by blank lines. `name`: the split, plus any decoding
    overrides."""
    lines = [json.dumps({"source": s, "prompt": p, "prediction": o, "references": r}, ensure_ascii=False)
             for s, p, o, r in zip(gen.sources or gen.prompts, gen.prompts, predictions, gen.references)]
    out = {"predictions": f"predictions_{name}.jsonl"}
    runs.atomic_write_text(folder / out["predictions"], "\n".join(lines) + "\n")
    if gen.metric == "e2e":
        out |= {"e2e_predictions": f"predictions_{name}.txt", "e2e_references": f"references_{name}.txt"}
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
                          folder: Path, name: str,
                          files: dict[str, str]) -> tuple[dict[str, Any], dict[str, int]]:
    """The task metric on labelled splits; every split's predictions in GLUE's submission
    format (`index<TAB>prediction`, label names as in the GLUE files)."""
    rows, raw = task.splits[split], task.raw[split]
    if limit:
        rows, raw = rows.select(range(min(limit, len(rows)))), raw.select(range(min(limit, len(raw))))
    pred, labels = predict(model, task, rows, train_cfg.eval_batch_size or train_cfg.batch_size)
    files["predictions"] = f"predictions_{name}.tsv"
    text = [f"{i}\t{submission_label(task, p)}" for i, p in zip(raw["idx"], pred)]
    runs.atomic_write_text(folder / files["predictions"], "\n".join(["index\tprediction", *text]) + "\n")
    scored = {"inputs": len(rows), "inputs_in_split": len(task.splits[split])}
    return (task.compute_metrics(pred, labels) if labels is not None else {}), scored


def submission_label(task: Task, prediction: Any) -> str:
    from rosa_bench.data.glue import TASKS

    labels = TASKS[task.name.split("/", 1)[1]].labels
    if labels is None:  # STS-B scores lie in [0, 5]; a diverged model's NaN/inf stays visible as nan
        value = float(prediction)
        return f"{min(max(value, 0.0), 5.0):.3f}" if math.isfinite(value) else "nan"
    names = {index: text for text, index in labels.items()}
    return names[int(prediction)]


def log_scores(folder: Path, split: str, scores: dict[str, Any], step: int, tag: str = "") -> None:
    """Numeric scores into the run's TensorBoard: test/<score> or valid/<score>, with the
    decoding overrides after the split (test,num_beams=4/BLEU). They also appear as metric
    columns of the HParams table."""
    prefix = "test" if split.startswith("test") else "valid"
    suffix = split.split("_", 1)[1] if "_" in split else ""
    group = f"{prefix}{'_' + suffix if suffix else ''}{',' + tag if tag else ''}"
    logger = RunLogger(folder)
    logger.scalars({f"{group}/{k}": float(v) for k, v in scores.items()
                    if isinstance(v, (int, float)) and math.isfinite(v)}, step)
    logger.close()
