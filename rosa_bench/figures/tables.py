"""The paper table: one row per configuration with its trainable parameters, the best
validation score of the selection metric (chosen on validation only), the scores from
eval_*.json, each as mean and std over seeds, and how many seeds (and unfinished runs)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd

from rosa_bench.errors import UserError
from rosa_bench.figures.collect import Collection

LOWER_IS_BETTER = ("loss", "ppl", "perplexity")
PARAMS = "trainable_params"
SEEDS = "seeds"
UNFINISHED = "unfinished"
log = logging.getLogger(__name__)


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def default_metric(runs: pd.DataFrame) -> str:
    """The metric the trainer selected its best checkpoint on (the most common one)."""
    chosen = runs["best_metric"].dropna()
    return str(chosen.mode().iloc[0]) if len(chosen) else "loss"


def best_column(metric: str) -> str:
    return f"best valid/{metric}"


def best_validation(coll: Collection, metric: str) -> pd.Series:
    """Per run, the best value of valid/<metric>: the trainer's own choice when it selected on
    this metric, else the best point of the logged validation curve."""
    tag = f"valid/{metric}"
    curve = coll.curves[coll.curves["tag"] == tag].groupby("run")["value"]
    from_curve = curve.min() if lower_is_better(metric) else curve.max()
    from_metrics = coll.runs["best_value"].where(coll.runs["best_metric"] == metric)
    return from_metrics.fillna(from_curve.reindex(coll.runs.index)).rename(best_column(metric))


def logged_metrics(coll: Collection) -> set[str]:
    """Metrics a selection can use: validation tags and the trainer's own selection metric."""
    tags = {t.removeprefix("valid/") for t in coll.curves["tag"].unique() if t.startswith("valid/")}
    return tags | set(coll.runs["best_metric"].dropna())


def selection_metric(coll: Collection, requested: str | None) -> str:
    """`requested` (with or without 'valid/') if these runs log it, else their own choice."""
    metric = requested.removeprefix("valid/") if requested else None
    if metric in logged_metrics(coll):
        return metric
    if metric:
        log.warning("--metric %r is not logged by the runs in %s; using %r", metric,
                    ", ".join(sorted(coll.runs["task"].unique())), default_metric(coll.runs))
    return default_metric(coll.runs)


def check_metric(coll: Collection, requested: str | None) -> None:
    """A metric no run logs is a typo, not a task without it."""
    metric = requested.removeprefix("valid/") if requested else None
    if metric and metric not in logged_metrics(coll):
        raise UserError(f"--metric {requested!r} is not logged by any run; choose from: "
                        + ", ".join(sorted(logged_metrics(coll))))


def summary(coll: Collection, confs: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Numeric table, one row per configuration: the shown config columns, then
    '<score> mean' / '<score> std' columns, seeds and unfinished counts."""
    scores = [c for c in coll.runs.columns if "/" in c]
    per_run = pd.concat([confs, coll.runs[[PARAMS, *scores]], best_validation(coll, metric),
                         (~coll.runs["complete"].astype(bool)).rename(UNFINISHED)], axis=1)
    shown = [c for c in confs.columns if c not in ("configuration", "colour_key")]
    value_columns = [best_column(metric), *scores]
    grouped = per_run.groupby("configuration", sort=False)
    stats = grouped[value_columns].agg(["mean", "std"])
    stats.columns = [f"{col} {stat}" for col, stat in stats.columns]
    table = pd.concat([grouped[[*shown, "colour_key"]].first(), grouped[PARAMS].mean(), stats,
                       grouped.size().rename(SEEDS), grouped[UNFINISHED].sum()], axis=1)
    return table.sort_values(["colour_key", PARAMS]).drop(columns="colour_key")


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4g}" if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table as a reader sees it: 'mean ± std' cells, parameter counts with separators."""
    out = table.drop(columns=[c for c in table.columns if c.endswith((" mean", " std"))])
    out[PARAMS] = table[PARAMS].map(lambda v: "–" if math.isnan(v) else f"{int(v):,}")
    for column in [c.removesuffix(" mean") for c in table.columns if c.endswith(" mean")]:
        out[column] = [_mean_std(m, s) for m, s in zip(table[f"{column} mean"], table[f"{column} std"])]
    return out[[*[c for c in out.columns if c not in (SEEDS, UNFINISHED)], SEEDS, UNFINISHED]]


def write_tables(table: pd.DataFrame, out: Path, stem: str = "table") -> list[Path]:
    """CSV keeps the numbers; Markdown and LaTeX (booktabs rules) show mean ± std."""
    out.mkdir(parents=True, exist_ok=True)
    shown = formatted(table)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "tex": out / f"{stem}.tex"}
    table.to_csv(paths["csv"])
    paths["md"].write_text(shown.to_markdown(index=False) + "\n")
    paths["tex"].write_text(shown.to_latex(index=False, escape=True))
    return list(paths.values())


# What makes a row of a paper table (a column per task): the method, and these when they vary.
PAPER_ROW_KEYS = ("model.name", "fnmodel.name", "fnmodel.adapter", "fnmodel.mode", "fnmodel.rank")


def paper_layout(coll: Collection, metric_of_task: dict[str, str]) -> pd.DataFrame:
    """The papers' layout of a multi-task table: one row per method (and model, adapter kind,
    mode, rank where they vary), one column per task holding its own selection metric's best
    validation value as 'mean ± std' over seeds, and the mean over tasks where a row has all."""
    keys = [k for k in PAPER_ROW_KEYS if k in coll.configs
            and (k == "fnmodel.name" or coll.configs[k].astype(str).nunique() > 1)]
    values = pd.Series(float("nan"), index=coll.runs.index)
    for task, metric in metric_of_task.items():
        runs = coll.runs.index[coll.runs["task"] == task]
        subset = Collection(runs=coll.runs.loc[runs], configs=coll.configs.loc[runs],
                            curves=coll.curves[coll.curves["run"].isin(runs)])
        values.loc[runs] = best_validation(subset, metric)
    task_names = coll.runs["task"].map(lambda t: t.rsplit("/", 1)[-1])
    frame = coll.configs[keys].astype(str).assign(task=task_names, value=values)
    stats = frame.groupby([*keys, "task"], sort=False)["value"].agg(["mean", "std"])
    cells = pd.Series([_mean_std(m, s) for m, s in zip(stats["mean"], stats["std"])], index=stats.index)
    table = cells.unstack("task")
    means = stats["mean"].unstack("task")
    table["mean"] = [_mean_std(m, float("nan")) for m in means.mean(axis=1).where(means.notna().all(axis=1))]
    short = {task.rsplit("/", 1)[-1]: metric for task, metric in metric_of_task.items()}
    table.columns = [*(f"{t} ({short[t]})" for t in table.columns[:-1]), "mean"]
    return table.reset_index()


def write_paper_table(table: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "paper_table.csv", "md": out / "paper_table.md", "tex": out / "paper_table.tex"}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(table.to_markdown(index=False) + "\n")
    paths["tex"].write_text(table.to_latex(index=False, escape=True))
    return list(paths.values())
