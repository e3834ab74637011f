"""figures.py's paper layout: runs of several tasks become one table with a row per method and
rank and a column per task, each cell the task's own best validation value (mean ± std)."""

from __future__ import annotations

import pandas as pd

from rosa_bench import runs
from rosa_bench.figures import make_figures
from rosa_bench.pipeline import train
from tests.test_config import composed
from tests.test_presets import SMALL


def test_runs_of_several_tasks_give_the_papers_layout(tmp_path):
    root = tmp_path / "runs"
    best = {}
    for task in ("rte", "mrpc"):
        for rank, seeds in ((2, (0, 1)), (4, (0,))):
            for seed in seeds:
                ov = ["model=tiny-roberta", "dataset=glue", f"dataset.task={task}", "fnmodel=lora",
                      f"fnmodel.rank={rank}", f"seed={seed}", *SMALL]
                folder = train(composed([*ov, f"output.path={root}"]), ov)
                best.setdefault((task, rank), []).append(runs.read_metrics(folder)["best"]["value"])
    written = make_figures(root, tmp_path / "fig").written
    assert tmp_path / "fig" / "paper_table.csv" in written
    table = pd.read_csv(tmp_path / "fig" / "paper_table.csv")
    assert set(table.columns) == {"fnmodel.name", "fnmodel.rank", "rte (accuracy)", "mrpc (accuracy)", "mean"}
    assert len(table) == 2
    for _, row in table.iterrows():
        rank = int(row["fnmodel.rank"])
        for task in ("rte", "mrpc"):
            values = pd.Series(best[(task, rank)])
            mean = float(row[f"{task} (accuracy)"].split(" ± ")[0])
            assert abs(mean - values.mean()) < 1e-3
        means = [pd.Series(best[(t, rank)]).mean() for t in ("rte", "mrpc")]
        assert abs(float(row["mean"]) - sum(means) / 2) < 1e-3
