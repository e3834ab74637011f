"""benchmarks/reproduce.py on tiny models: the plan (grid first, later runs waiting for its
learning rates), the choice of learning rate, resuming after an interruption without
retraining finished runs, and the report (partial, then complete)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmarks import reproduce
from rosa_bench import runs

PRESET = dataclasses.replace(reproduce.PRESETS["smoke"], glue_tasks=("rte",), e2e_methods=("lora", "rosa"))


class Stop(BaseException):
    """An interruption (like Ctrl-C or the end of a session), not a failed run."""


def fake_scores(folder: Path, max_samples: int | None) -> None:
    """Stands in for evaluate.py's E2E scoring (METEOR starts a JVM): the report logic only
    needs an eval_test.json in evaluate.py's layout."""
    runs.write_json(folder / "eval_test.json", {"split": "test", "max_samples": max_samples,
                                                "scores": {name: 1.0 for name in reproduce.E2E_SCORES}})


def run_id(overrides: list[str]) -> str:
    """The run folder the overrides name: output.path / (task) / output.name."""
    given = dict(o.split("=", 1) for o in overrides)
    return f"{given['output.path']}/{given.get('dataset.task', '')}/{given['output.name']}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Runs the smoke plan with an interruption after 4 trainings, writes the partial report,
    then resumes to the end and writes the final one. Returns what each stage saw."""
    out = tmp_path_factory.mktemp("repro")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trained: list[str] = []

    def counting(overrides: list[str]) -> None:
        if len(trained) == 4:
            raise Stop
        reproduce.train_in_process(overrides)
        trained.append(run_id(overrides))

    try:
        before = reproduce.plan(PRESET, out / "runs")
        before_status = [j.status() for j in before]
        with pytest.raises(Stop):
            reproduce.run_all(PRESET, out / "runs", log=lambda s: None,
                              runner=reproduce.Runner(counting, fake_scores))
        first = list(trained)
        reproduce.write_report(PRESET, out / "runs", out / "results", out / "partial.md", "cmd")
        partial_csv = pd.read_csv(out / "results" / "runs.csv")
        trained.clear()

        def recording(overrides: list[str]) -> None:
            trained.append(overrides)
            reproduce.train_in_process(overrides)

        failed = reproduce.run_all(PRESET, out / "runs", log=lambda s: None,
                                   runner=reproduce.Runner(recording, fake_scores))
        reproduce.write_report(PRESET, out / "runs", out / "results", out / "results.md", "cmd")
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "before": before, "before_status": before_status, "first": first, "second": trained,
            "failed": failed, "partial_csv": partial_csv}


def test_the_plan_runs_the_grid_first_and_later_runs_wait_for_its_rates(tree):
    before, status = tree["before"], tree["before_status"]
    grid = [j for j in before if j.experiment == "lr_grid"]
    assert before[:len(grid)] == grid
    assert len(grid) == len(PRESET.glue_methods) * 2
    assert status[:len(grid)] == ["to run"] * len(grid)
    assert set(status[len(grid):]) == {"waiting for the learning-rate grid"}
    assert all(j.lr is None for j in before[len(grid):])
    experiments = [j.experiment for j in before]
    assert experiments.index("rank_sweep") > experiments.index("glue")
    assert experiments.index("e2e") > max(i for i, e in enumerate(experiments) if e == "rank_sweep")
    seeds, methods = len(PRESET.seeds), len(PRESET.glue_methods)
    assert len(before) == len(grid) + seeds * methods + len(PRESET.e2e_methods) + 2 * seeds  # sweep: rank 1


def test_an_interruption_loses_nothing_and_the_resume_trains_only_what_is_missing(tree):
    assert tree["failed"] == []
    plan = reproduce.plan(PRESET, tree["out"] / "runs")
    assert all(j.done() for j in plan)
    assert len(tree["first"]) == 4 and len(tree["second"]) == len(plan) - 4
    # the run interrupted fifth was never started, so nothing of it is trusted or skipped
    assert not {run_id(overrides) for overrides in tree["second"]} & set(tree["first"])
    trained = []
    reproduce.run_all(PRESET, tree["out"] / "runs", log=lambda s: None,
                      runner=reproduce.Runner(trained.append, fake_scores))
    assert trained == []  # everything complete: a rerun trains nothing


def test_each_method_keeps_the_grid_rate_with_the_best_validation_score(tree):
    out = tree["out"] / "runs"
    chosen = reproduce.chosen_lrs(PRESET, out)
    for method in PRESET.glue_methods:
        rank = PRESET.rank if method.low_rank else None
        folder = out / "lr_grid" / "glue" / "rte"
        grid = {lr: runs.read_metrics(folder / reproduce.run_name(method, rank, lr, 0))
                for lr in PRESET.grid(method.key)}
        best = max(grid, key=lambda lr: (grid[lr]["best"]["value"], -lr))
        assert chosen[method.key] == best
        for job in reproduce.plan(PRESET, out):
            if job.method.key == method.key and job.experiment != "lr_grid":
                assert runs.read_config(job.folder).train.lr == pytest.approx(best)


def test_the_sweep_trains_every_rank_on_the_same_layers_and_budget(tree):
    out = tree["out"] / "runs"
    jobs = [j for j in reproduce.plan(PRESET, out) if j.method.key in PRESET.sweep_methods
            and j.task == PRESET.glue_tasks[0] and j.experiment in ("glue", "rank_sweep")]
    configs = [runs.read_config(j.folder) for j in jobs]
    assert sorted({(c.fnmodel.name, c.fnmodel.rank) for c in configs}) == [
        ("lora", 1), ("lora", 2), ("rosa", 1), ("rosa", 2)]
    assert {str(c.fnmodel.targets) for c in configs} == {"['query', 'value']"}
    assert {(c.train.max_steps, c.dataset.max_train_samples) for c in configs} == {(2, 8)}


def test_runs_made_with_other_settings_are_stale_and_stop_the_command_before_it_trains(tree):
    out = tree["out"] / "runs"
    budget = dataclasses.replace(PRESET.glue_budget,
                                 overrides=(*PRESET.glue_budget.overrides, "train.weight_decay=0.1"))
    changed = dataclasses.replace(PRESET, glue_budget=budget)
    grid = [j for j in reproduce.plan(changed, out) if j.experiment == "lr_grid"]
    assert grid and all(j.stale() and not j.done() for j in grid)
    assert {j.status() for j in grid} == {"stale: made with other settings"}
    trained = []
    with pytest.raises(reproduce.StaleRuns, match=r"only in the plan \['train.weight_decay=0.1'\]"):
        reproduce.run_all(changed, out, log=lambda s: None,
                          runner=reproduce.Runner(trained.append, fake_scores))
    assert trained == []
    assert all(runs.is_complete(j.folder) for j in grid)  # neither trusted nor overwritten
    assert all(j.done() and not j.stale() for j in reproduce.plan(PRESET, out))  # the recorded overrides
    elsewhere = Path(os.path.relpath(out))  # the same root spelled relatively: the same runs
    assert all(j.done() for j in reproduce.plan(PRESET, elsewhere))


def test_the_partial_report_says_so_and_lists_what_is_left(tree):
    text = (tree["out"] / "partial.md").read_text()
    assert "PARTIAL: 4 of" in text and "## Still to run" in text and "Resume with `cmd`" in text
    csv = tree["partial_csv"]
    assert len(csv) == len(tree["before"]) and (csv.status == "done").sum() == 4
    assert set(csv.status) <= {"done", "to run", "unfinished", "waiting for the learning-rate grid"}


def test_the_final_report_has_every_table_figure_and_number(tree):
    out, results = tree["out"], tree["out"] / "results"
    text = (out / "results.md").read_text()
    assert "Status: **complete**" in text and "Still to run" not in text
    csv = pd.read_csv(results / "runs.csv")
    assert (csv.status == "done").all() and len(csv) == len(tree["before"])
    summary = json.loads((results / "summary.json").read_text())
    assert summary["complete"] and summary["done"] == len(csv)
    assert summary["chosen_lr"] == reproduce.chosen_lrs(PRESET, out / "runs")
    # the GLUE table: one row per method with mean ± std over the two seeds of the run's best values
    glue = csv[(csv.experiment == "glue") & (csv.method == "lora")]
    mean, std = glue.best_valid.mean(), glue.best_valid.std()
    assert f"{mean:.3f} ± {std:.3f} (n=2)" in text
    for method in PRESET.glue_methods:
        assert f"| {method.key} |" in text
    assert (results / "rank_sweep" / "rank_sweep.png").is_file()
    assert (results / "e2e" / "e2e_nlg" / "curve_valid_loss.png").is_file()
    assert "![rank sweep](" in text and "![E2E validation loss](" in text
    assert text.count("ROSA ≥ LoRA at equal rank") == 2  # GLUE (per task) and E2E
    assert "Δ +0.000; one seed, no spread to judge it by" in text  # E2E: one seed each


def test_a_grid_whose_best_rate_is_on_its_edge_grows_past_it(tmp_path, monkeypatch):
    """Scores rise with the rate up to 4e-2: the grid (1e-3, 1e-2) widens to 2e-2, then 5e-2,
    and keeps 2e-2 only once a larger rate has been seen to score worse."""
    preset = dataclasses.replace(PRESET, lr_grid={"*": (1e-3, 1e-2)}, grid_widen=3)
    method = preset.glue_methods[0]
    scores = {1e-3: 0.5, 1e-2: 0.6, 2e-2: 0.7, 5e-2: 0.65}

    def finish(lr):
        job = reproduce.make_job(preset, tmp_path, "lr_grid", preset.glue_tasks[0], method, lr,
                                 preset.seeds[0])
        job.folder.mkdir(parents=True, exist_ok=True)
        runs.write_json(job.folder / "metrics.json", {"complete": True, "best": {"value": scores[lr]}})

    rates, chosen = reproduce.grid_rates(preset, tmp_path, method)
    assert (rates, chosen) == ([1e-3, 1e-2], None)
    for lr in rates:
        finish(lr)
    rates, chosen = reproduce.grid_rates(preset, tmp_path, method)
    assert (rates, chosen) == ([1e-3, 1e-2, 2e-2], None)
    finish(2e-2)
    rates, chosen = reproduce.grid_rates(preset, tmp_path, method)
    assert (rates, chosen) == ([1e-3, 1e-2, 2e-2, 5e-2], None)
    finish(5e-2)
    assert reproduce.grid_rates(preset, tmp_path, method) == ([1e-3, 1e-2, 2e-2, 5e-2], 2e-2)
    assert reproduce.chosen_lrs(preset, tmp_path)[method.key] == 2e-2


def test_a_grid_stops_widening_at_its_limit_and_keeps_its_edge(tmp_path):
    """Scores fall with the rate: the grid grows downwards once (grid_widen=1), then keeps its
    lowest rate even though it is again on the edge."""
    preset = dataclasses.replace(PRESET, lr_grid={"*": (1e-3, 2e-3)}, grid_widen=1)
    method = preset.glue_methods[0]
    for lr in (5e-4, 1e-3, 2e-3):
        job = reproduce.make_job(preset, tmp_path, "lr_grid", preset.glue_tasks[0], method, lr,
                                 preset.seeds[0])
        job.folder.mkdir(parents=True, exist_ok=True)
        runs.write_json(job.folder / "metrics.json", {"complete": True, "best": {"value": 1 - lr}})
    assert reproduce.grid_rates(preset, tmp_path, method) == ([5e-4, 1e-3, 2e-3], 5e-4)


def test_a_finished_run_of_an_earlier_grid_is_kept_and_can_win(tmp_path):
    preset = dataclasses.replace(PRESET, lr_grid={"*": (1e-3, 2e-3)}, grid_widen=0)
    method = preset.glue_methods[0]
    for lr, score in ((1e-4, 0.9), (1e-3, 0.6), (2e-3, 0.7)):
        job = reproduce.make_job(preset, tmp_path, "lr_grid", preset.glue_tasks[0], method, lr,
                                 preset.seeds[0])
        job.folder.mkdir(parents=True, exist_ok=True)
        runs.write_json(job.folder / "metrics.json", {"complete": True, "best": {"value": score}})
    assert reproduce.grid_rates(preset, tmp_path, method) == ([1e-4, 1e-3, 2e-3], 1e-4)
    assert 1e-4 in [j.lr for j in reproduce.plan(preset, tmp_path) if j.experiment == "lr_grid"]


def test_the_quiet_projection_uses_runs_that_ran_alone_and_errs_long_elsewhere():
    df = pd.DataFrame([
        # (experiment, task, status, train_s, test_s, load at start/end at most, resumed)
        ("glue", "rte", "done", 100.0, None, 2.0, False), ("glue", "rte", "done", 140.0, None, 2.2, False),
        ("glue", "rte", "done", 400.0, None, 7.0, False),  # contended: not a measure of the time alone
        ("glue", "rte", "done", 10.0, None, 2.0, True),  # resumed: its first session went unrecorded
        ("glue", "cola", "done", 90.0, None, 5.0, False), ("glue", "cola", "done", 70.0, None, 4.0, False),
        ("glue", "cola", "done", 20.0, None, 4.0, True),  # resumed: not even the fastest alone
        ("glue", "rte", "to run", None, None, None, False),  # counts rte's median alone, 120 s
        ("rank_sweep", "rte", "to run", None, None, None, False),  # no sweep run yet: the task's 120 s
        ("glue", "cola", "to run", None, None, None, False),  # no cola run ran alone: its fastest, 70 s
        ("e2e", "e2e", "to run", None, None, None, False),  # nothing measured
    ], columns=["experiment", "task", "status", "train_s", "test_s", "load_1min_max", "resumed"])
    hours, unmeasured = reproduce.quiet_projection(df, cpus=2)
    assert unmeasured == 1
    assert hours * 3600 == pytest.approx(4 * 120 + 120 + 120 + 3 * 70 + 70)


def test_a_resumed_run_is_marked_so_the_projection_leaves_it_out(tmp_path):
    def finish(job):
        return lambda overrides: runs.write_json(job.folder / runs.METRICS_FILE, {"complete": True})

    fresh, resumed = (reproduce.make_job(PRESET, tmp_path, "glue", "rte", PRESET.glue_methods[0], 1e-3, seed)
                      for seed in (0, 1))
    resumed.folder.mkdir(parents=True)
    (resumed.folder / runs.CONFIG_FILE).write_text("{}\n")  # what an interrupted run leaves
    for job in (fresh, resumed):
        reproduce.run_job(job, PRESET, False, reproduce.Runner(finish(job), fake_scores))
    assert [reproduce.job_record(job)["resumed"] for job in (fresh, resumed)] == [False, True]


def test_the_majority_class_level_is_the_dev_sets_most_frequent_label(data_root):
    """Counted here straight from the official TSVs: MRPC's label is the first column, RTE's
    the last."""
    import csv

    def share(path: Path, column: int) -> float:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        labels = [row[column] for row in rows]
        return max(labels.count(v) for v in set(labels)) / len(labels)

    assert reproduce.majority_score("mrpc") == pytest.approx(share(data_root / "glue/MRPC/dev.tsv", 0))
    assert reproduce.majority_score("rte") == pytest.approx(share(data_root / "glue/RTE/dev.tsv", -1))
    assert 0.5 < reproduce.majority_score("mrpc") < 0.75
    assert reproduce.majority_score("cola") == 0.0 and reproduce.majority_score("stsb") == 0.0


def test_two_runs_at_the_majority_class_level_say_nothing_about_a_claim():
    stuck, learned = reproduce.Stats(0.684, 0.0, 3), reproduce.Stats(0.75, 0.01, 3)
    assert "says nothing about the claim" in reproduce.verdict(stuck, stuck, "close", chance=0.684)
    assert "agrees (close)" in reproduce.verdict(stuck, stuck, "close")  # without the level: vacuous
    one_side = reproduce.verdict(learned, stuck, "close", chance=0.684)
    assert one_side.startswith("Δ +0.066, above the seed spread") and "but LoRA is within 0.010" in one_side
    other_side = reproduce.verdict(stuck, learned, "geq", chance=0.684)
    assert "disagrees" in other_side and "but the method is within 0.010" in other_side
    assert reproduce.verdict(learned, learned, "geq", chance=0.684).endswith("no advantage shown")


def test_regenerating_the_report_keeps_its_hand_written_reading(tree):
    doc = tree["out"] / "results.md"
    start, end = reproduce.READING_MARKS
    reading = f"{start}\n## Reading\n\nROSA and LoRA tie here.\n{end}"
    doc.write_text(doc.read_text().replace("## Protocol", reading + "\n\n## Protocol", 1))
    reproduce.write_report(PRESET, tree["out"] / "runs", tree["out"] / "results", doc, "cmd")
    text = doc.read_text()
    assert text.count(reading) == 1 and text.index(reading) < text.index("## Protocol")
    assert "Status: **complete**" in text and "## GLUE" in text
