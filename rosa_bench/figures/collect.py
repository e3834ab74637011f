"""Read every run folder below a root into tidy pandas tables: one row per run (status and
scores), one row per run with its flattened config, and one row per logged point. Only the
run folders are read (config, metrics.json, eval_*.json, TensorBoard events): nothing here
imports the trainer."""

from __future__ import annotations

import logging
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from rosa_bench import runs
from rosa_bench.errors import UserError

log = logging.getLogger(__name__)

EVENTS_GLOB = "events.out.tfevents.*"
EVAL_GLOB = "eval_*.json"
CURVE_COLUMNS = ["run", "tag", "step", "value"]


@dataclass
class Collection:
    """What a root holds. `runs`, `configs` are indexed by run id (the folder relative to the
    root); `curves` is long: run, tag, step, value. `skipped` says which runs were left out
    and why."""

    runs: pd.DataFrame
    configs: pd.DataFrame
    curves: pd.DataFrame
    skipped: list[str] = field(default_factory=list)


def find_run_folders(root: Path) -> list[Path]:
    """A folder holding config.yaml is a run (metrics.json is missing only while a run has not
    evaluated yet: such a run is kept and marked unfinished)."""
    return sorted(p.parent for p in Path(root).rglob(runs.CONFIG_FILE) if p.parent.name != runs.CHECKPOINTS)


def readable_event_files(folder: Path) -> list[Path]:
    """Event files with at least one readable record; empty or corrupt ones are skipped with a
    warning naming the file (the directory reader would skip them silently)."""
    good = []
    for path in sorted(folder.glob(EVENTS_GLOB)):
        try:
            readable = next(iter(EventFileLoader(str(path)).Load()), None) is not None
        except Exception as err:  # the reader raises its own DataLossError types
            log.warning("skipping event file %s: %s", path, err)
            continue
        if readable:
            good.append(path)
        else:
            log.warning("skipping event file %s: empty or corrupt (no readable event)", path)
    return good


def read_scalars(folder: Path) -> pd.DataFrame:
    """Every scalar point of a run (size_guidance 0 keeps all points; the default keeps a
    sample). The directory reader also drops points a resumed run purged."""
    if not readable_event_files(folder):
        return pd.DataFrame(columns=CURVE_COLUMNS[1:])
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    rows = [(tag, e.step, e.value) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS[1:])


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def read_evals(folder: Path) -> dict[str, float]:
    """Scores from evaluate.py's eval_<split>.json (flat, or under "scores"), named
    '<test|valid>[_<suffix>]/<metric>' after the split, like the TensorBoard tags."""
    scores: dict[str, float] = {}
    for path in sorted(folder.glob(EVAL_GLOB)):
        data = runs.read_json(path)
        split = path.stem.removeprefix("eval_").replace("validation", "valid")
        values = _numeric(data) | _numeric(data.get("scores") or {})
        scores |= {f"{split}/{k}": v for k, v in values.items()}
    return scores


def _flat_config(folder: Path) -> dict[str, Any]:
    flat = pd.json_normalize(runs.read_config_dict(folder), sep=".").iloc[0].to_dict()
    return {k: v if isinstance(v, str | numbers.Number | bool) or v is None else str(v)
            for k, v in flat.items()}


def _status(metrics: dict[str, Any], scalars: pd.DataFrame) -> dict[str, Any]:
    best = metrics.get("best") or {}
    logged = int(scalars["step"].max()) if len(scalars) else 0
    return {"complete": bool(metrics.get("complete")),
            "global_step": int(metrics.get("global_step", logged)),
            "total_steps": metrics.get("total_steps", math.nan),
            "trainable_params": metrics.get("trainable_params", math.nan),
            "best_metric": best.get("metric"), "best_value": best.get("value", math.nan),
            "best_step": best.get("step", math.nan)}


def _compile(pattern: str | None) -> re.Pattern | None:
    try:
        return re.compile(pattern) if pattern else None
    except re.error as err:
        raise UserError(f"--filter {pattern!r} is not a valid regular expression: {err}") from None


def collect(root: Path, name_filter: str | None = None, min_steps: int = 0) -> Collection:
    """Read the runs below `root` whose name matches `name_filter` (re.search) and that
    reached `min_steps` optimizer steps."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--fn {str(root)!r} does not exist or is not a folder")
    pattern = _compile(name_filter)
    folders = [f for f in find_run_folders(root) if not pattern or pattern.search(f.name)]
    if not folders:
        which = f" matching --filter {name_filter!r}" if pattern else ""
        raise UserError(f"no run folders{which} below {str(root)!r} (a run folder holds {runs.CONFIG_FILE})")
    statuses, configs, curves, skipped = {}, {}, [], []
    for folder in folders:
        run = folder.relative_to(root).as_posix()
        scalars = read_scalars(folder)
        try:
            metrics, config = runs.read_metrics(folder), _flat_config(folder)
        except runs.CorruptFile as err:
            log.warning("skipping run %s: %s", run, err)
            skipped.append(f"{run}: {err}")
            continue
        status = _status(metrics, scalars)
        if status["global_step"] < min_steps:
            skipped.append(f"{run}: {status['global_step']} steps < --min-steps {min_steps}")
            continue
        statuses[run] = {"folder": str(folder), "task": folder.parent.relative_to(root).as_posix(),
                         **status, **read_evals(folder)}
        configs[run] = config
        curves.append(scalars.assign(run=run))
    if not statuses:
        raise UserError(f"every run below {str(root)!r} was skipped: " + "; ".join(skipped))
    return Collection(runs=pd.DataFrame.from_dict(statuses, orient="index"),
                      configs=pd.DataFrame.from_dict(configs, orient="index"),
                      curves=pd.concat(curves, ignore_index=True)[CURVE_COLUMNS], skipped=skipped)
