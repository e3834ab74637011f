"""From a root of run folders to everything a paper needs, one output folder per task folder
(`runs/e2e_nlg`, `runs/glue/cola`...): curves, the rank sweep, the tables and runs.csv; with
several tasks, also the paper's layout (`paper_table.*`: a row per method, a column per task)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from rosa_bench.errors import choices_error
from rosa_bench.figures import plots, tables
from rosa_bench.figures.collect import Collection, collect
from rosa_bench.figures.groups import configurations

FIGURES_DIR = "figures"


@dataclass
class Options:
    x: str = "step"
    band: str = "minmax"
    metric: str | None = None
    name_filter: str | None = None
    group_by: list[str] = field(default_factory=list)
    min_steps: int = 0
    dpi: int = 100


@dataclass
class Report:
    written: list[Path]
    skipped: list[str]
    unfinished: list[str]


def _subset(coll: Collection, task: str) -> Collection:
    runs = coll.runs[coll.runs["task"] == task]
    return Collection(runs=runs, configs=coll.configs.loc[runs.index],
                      curves=coll.curves[coll.curves["run"].isin(runs.index)])


def _task_outputs(coll: Collection, out: Path, title: str, opts: Options) -> list[Path]:
    confs = configurations(coll.configs, opts.group_by)
    metric = tables.selection_metric(coll, opts.metric)
    table = tables.summary(coll, confs, metric)
    written = tables.write_tables(table, out)
    coll.runs.join(coll.configs).to_csv(out / "runs.csv", index_label="run")
    written.append(out / "runs.csv")
    curves = plots.with_x(coll.curves, opts.x)
    for tag in plots.plotted_tags(coll.curves):
        points = curves[curves["tag"] == tag]
        fig = plots.curve_figure(points, confs, coll.runs, tag, opts.x, opts.band, title)
        written += plots.save(fig, out, plots.tag_stem(tag), opts.dpi)
    ranks = table["fnmodel.rank"].astype(str) if "fnmodel.rank" in table else pd.Series(dtype=str)
    if ranks[ranks != "-"].nunique() > 1:  # "-": full fine-tuning has no rank
        fig = plots.rank_sweep_figure(table, tables.best_column(metric), title)
        written += plots.save(fig, out, "rank_sweep", opts.dpi)
    return written


def make_figures(root: Path, out: Path | None = None, opts: Options | None = None) -> Report:
    """Read the runs below `root` and write figures and tables into `out` (default
    `<root>/figures`), in a subfolder per task folder when `root` holds several."""
    opts = opts or Options()
    if opts.band not in plots.BANDS:
        raise choices_error("--band", opts.band, plots.BANDS)
    root = Path(root)
    out = Path(out) if out else root / FIGURES_DIR
    coll = collect(root, opts.name_filter, opts.min_steps)
    tables.check_metric(coll, opts.metric)
    written = []
    tasks = sorted(coll.runs["task"].unique())
    for task in tasks:
        title = (root / task).as_posix() if task != "." else root.as_posix()
        written += _task_outputs(_subset(coll, task), out / task, title, opts)
    if len(tasks) > 1:  # a GLUE-style table: one column per task
        metrics = {task: tables.selection_metric(_subset(coll, task), opts.metric) for task in tasks}
        written += tables.write_paper_table(tables.paper_layout(coll, metrics), out)
    unfinished = sorted(coll.runs.index[~coll.runs["complete"].astype(bool)])
    return Report(written=written, skipped=coll.skipped, unfinished=unfinished)
