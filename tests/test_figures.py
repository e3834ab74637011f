"""figures.py on tiny real runs (LoRA at two ranks and full fine-tuning, two seeds each, plus
one run that crashed before its first evaluation): images, table numbers against metrics.json,
unfinished and tag-less runs, options, and bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import figures
from rosa_bench import runs
from rosa_bench.errors import UserError
from rosa_bench.figures import Options, collect, make_figures, plots
from rosa_bench.figures.groups import configurations
from rosa_bench.methods.base import Method
from rosa_bench.pipeline import train
from tests.test_config import composed

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {"lora_r2": ["fnmodel=lora", "fnmodel.rank=2"], "lora_r4": ["fnmodel=lora", "fnmodel.rank=4"],
           "full": ["fnmodel=full"]}
SEEDS = (0, 1)


def _overrides(extra: list[str], seed: int) -> list[str]:
    return ["model=tiny-gpt2", "dataset=e2e", *extra, f"seed={seed}", "dataset.max_train_samples=16",
            "dataset.max_eval_samples=6", "train.batch_size=4", "train.max_steps=6", "train.lr=0.01",
            "logging.log_every=1", "logging.eval_every=2", "logging.sample_max_new_tokens=2",
            "logging.progress=false"]


class Crash(Exception):
    pass


def _crash_at_1(self, trainer):
    if trainer.global_step == 1:
        raise Crash


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """6 complete runs (16 rows, batch 4: 4 steps an epoch, 6 steps, evaluated at 2, 4, 6),
    each with an eval_test.json as evaluate.py writes it, and a full-FT seed 2 that crashed
    at step 1: no metrics.json, only train/trainable_params at step 0 in its events."""
    out = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared CPU
    try:
        _train_all(out)
    finally:
        torch.set_num_threads(threads)
    return out


def _train_all(out: Path) -> None:
    for name, extra in CONFIGS.items():
        for seed in SEEDS:
            ov = _overrides(extra, seed)
            folder = train(composed([*ov, f"output.path={out}"]), ov)
            runs.write_json(folder / "eval_test.json", {"bleu": 10 * seed + len(name), "split": "test",
                                                        "scores": {"rouge_l": seed / 10}})
    ov = _overrides(CONFIGS["full"], 2)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Method, "on_step_end", _crash_at_1)
        with pytest.raises(Crash):
            train(composed([*ov, f"output.path={out}"]), ov)


@pytest.fixture(scope="module")
def produced(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    figures.main(["--fn", str(root), "--out", str(out)])
    return out / "e2e_nlg"


def _folders(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("config.yaml"))


def _crashed(root: Path) -> Path:
    return next(f for f in _folders(root) if not runs.read_metrics(f))


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_figures_are_png_and_pdf_of_the_expected_size_with_each_method_drawn(produced):
    for stem in ("curve_train_loss", "curve_valid_loss", "curve_valid_ppl", "rank_sweep"):
        png, pdf = produced / f"{stem}.png", produced / f"{stem}.pdf"
        with Image.open(png) as image:
            assert image.size == (640, 400)  # 6.4 x 4 inches at the default 100 dpi
            pixels = {tuple(p[:3]) for p in np.asarray(image.convert("RGB")).reshape(-1, 3)}
        assert pdf.read_bytes().startswith(b"%PDF")
        # tab10 colours: 'full' is the first method, 'lora' the second
        assert {(31, 119, 180), (255, 127, 14)} <= pixels, stem
    assert not (produced / "curve_train_lr.png").exists()  # diagnostics are not paper curves


def test_table_equals_metrics_json_mean_and_std_over_seeds(root, produced):
    table = pd.read_csv(produced / "table.csv", index_col="configuration")
    expected: dict[tuple, list] = {}
    for folder in _folders(root):
        cfg = runs.read_config_dict(folder)
        expected.setdefault((cfg["fnmodel"]["name"], cfg["fnmodel"]["rank"]), []).append(folder)
    assert len(table) == len(expected) == 3
    for (method, rank), folders in expected.items():
        shown_rank = "-" if method == "full" else str(rank)  # full fine-tuning has no rank
        same = (table["fnmodel.name"] == method) & (table["fnmodel.rank"].astype(str) == shown_rank)
        row = table[same].iloc[0]
        metrics = [runs.read_metrics(f) for f in folders]
        best = [m["best"]["value"] for m in metrics if m]
        assert row["best valid/loss mean"] == pytest.approx(np.mean(best), rel=1e-12)
        assert row["best valid/loss std"] == pytest.approx(np.std(best, ddof=1), rel=1e-9)
        assert row["trainable_params"] == metrics[0]["trainable_params"]
        assert row["seeds"] == len(folders)
        assert row["unfinished"] == sum(not m.get("complete") for m in metrics)
        evals = [f / "eval_test.json" for f in folders if (f / "eval_test.json").exists()]
        bleu = [runs.read_json(path)["bleu"] for path in evals]
        assert row["test/bleu mean"] == pytest.approx(np.mean(bleu))
        assert row["test/rouge_l mean"] == pytest.approx(0.05)  # nested "scores": seeds 0 and 1
    assert table.loc["full", "unfinished"] == 1 and table.loc["full", "seeds"] == 3
    assert table.loc["lora rank=2", "trainable_params"] * 2 == table.loc["lora rank=4", "trainable_params"]


def test_markdown_and_latex_show_mean_plus_minus_std(produced):
    table = pd.read_csv(produced / "table.csv", index_col="configuration")
    md, tex = (produced / "table.md").read_text(), (produced / "table.tex").read_text()
    row = table.loc["lora rank=4"]
    cell = f"{row['best valid/loss mean']:.4g} ± {row['best valid/loss std']:.2g}"
    assert cell in md and cell in tex
    assert "| fnmodel.name" in md.splitlines()[0]
    assert all(rule in tex for rule in ("\\toprule", "\\midrule", "\\bottomrule"))
    assert "trainable\\_params" in tex  # escaped for LaTeX


def test_every_logged_point_is_read(root):
    coll = collect.collect(root)
    for folder in _folders(root):
        run = folder.relative_to(root).as_posix()
        got = coll.curves[(coll.curves["run"] == run) & (coll.curves["tag"] == "valid/loss")]
        assert list(zip(got["step"], got["value"])) == pytest.approx(_scalars(folder, "valid/loss"))
    steps = coll.curves[coll.curves["tag"] == "train/loss"].groupby("run")["step"].apply(list)
    assert list(map(tuple, steps)) == [tuple(range(1, 7))] * 6  # the crashed run logged no train/loss


def test_thousands_of_points_are_kept_and_bad_event_files_are_skipped_by_name(root, tmp_path, caplog):
    # EventAccumulator's default keeps a 1000-point sample; figures must keep all of them
    folder = tmp_path / "e2e_nlg" / "run"
    complete = next(f for f in _folders(root) if runs.read_metrics(f))
    shutil.copytree(complete, folder)
    shutil.copytree(complete, tmp_path / "glue" / "mrpc" / "run")  # a second task folder
    with SummaryWriter(str(folder)) as writer:
        for step in range(3000):
            writer.add_scalar("valid/bleu", step / 3000, step)
    (folder / "events.out.tfevents.1.empty").touch()
    (folder / "events.out.tfevents.2.corrupt").write_bytes(b"\x07not an event file" * 20)
    coll = collect.collect(tmp_path)
    points = coll.curves[coll.curves["run"] == "e2e_nlg/run"]
    assert len(points[points["tag"] == "valid/bleu"]) == 3000
    assert len(points[points["tag"] == "train/loss"]) == 6
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "events.out.tfevents.1.empty" in warned and "events.out.tfevents.2.corrupt" in warned
    report = make_figures(tmp_path)  # one output folder per task folder
    assert (tmp_path / "figures" / "e2e_nlg" / "curve_valid_bleu.png") in report.written
    assert (tmp_path / "figures" / "glue" / "mrpc" / "table.md") in report.written
    assert (tmp_path / "figures" / "glue" / "mrpc" / "curve_valid_bleu.png") not in report.written


def test_unfinished_run_without_metrics_or_valid_tags_is_kept_and_marked(root, produced):
    crashed = _crashed(root)
    table = pd.read_csv(produced / "runs.csv", index_col="run")
    row = table.loc[crashed.relative_to(root).as_posix()]
    assert not row["complete"] and row["global_step"] == 0 and math.isnan(row["best_value"])
    coll = collect.collect(root)
    confs = configurations(coll.configs)
    points = plots.with_x(coll.curves, "step")
    fig = plots.curve_figure(points[points["tag"] == "train/loss"], confs, coll.runs, "train/loss",
                             "step", "minmax", "t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # n: runs with points of this tag; rank is not printed for full fine-tuning (only LoRA sweeps it)
    assert "full (n=2, 1 unfinished)" in labels and "lora rank=2 (n=2)" in labels
    assert fig.axes[0].get_xlabel() == "optimizer step"
    assert fig.axes[0].get_ylabel() == "train/loss (cross-entropy, nats)"


def test_min_steps_skips_unfinished_runs_and_says_which(root, tmp_path, capsys):
    figures.main(["--fn", str(root), "--out", str(tmp_path), "--min-steps", "6"])
    out = capsys.readouterr().out
    crashed = _crashed(root).relative_to(root).as_posix()
    assert f"skipped {crashed}: 0 steps < --min-steps 6" in out
    table = pd.read_csv(tmp_path / "e2e_nlg" / "table.csv", index_col="configuration")
    assert table["unfinished"].sum() == 0 and table.loc["full", "seeds"] == 2


def test_filter_and_group_by(root, tmp_path):
    make_figures(root, tmp_path / "a", Options(name_filter=r"^lora_"))
    table = pd.read_csv(tmp_path / "a" / "e2e_nlg" / "table.csv", index_col="configuration")
    assert set(table["fnmodel.name"]) == {"lora"} and list(table["seeds"]) == [2, 2]
    make_figures(root, tmp_path / "b", Options(group_by=["fnmodel.name"]))
    table = pd.read_csv(tmp_path / "b" / "e2e_nlg" / "table.csv", index_col="configuration")
    assert dict(table["seeds"]) == {"full": 3, "lora": 4}
    assert not (tmp_path / "b" / "e2e_nlg" / "rank_sweep.png").exists()  # rank is pooled here


def test_metric_selects_on_the_validation_curve(root, tmp_path):
    make_figures(root, tmp_path, Options(metric="ppl", group_by=["fnmodel.name", "fnmodel.rank"]))
    table = pd.read_csv(tmp_path / "e2e_nlg" / "table.csv", index_col="configuration")
    lora2 = [f for f in _folders(root) if runs.read_config_dict(f)["fnmodel"]["rank"] == 2]
    best = [min(v for _, v in _scalars(f, "valid/ppl")) for f in lora2]
    assert table.loc["lora rank=2", "best valid/ppl mean"] == pytest.approx(np.mean(best))


def test_epoch_axis_uses_steps_per_epoch(root):
    coll = collect.collect(root)
    points = plots.with_x(coll.curves, "epoch")
    valid = points[points["tag"] == "valid/loss"]
    assert sorted(set(valid["x"])) == pytest.approx([0.5, 1.0, 1.5])  # 4 steps an epoch


@pytest.mark.parametrize("options,pattern", [
    (Options(name_filter="(["), r"--filter '\(\[' is not a valid regular expression"),
    (Options(name_filter="^nomatch"), r"no run folders matching --filter '\^nomatch'"),
    (Options(group_by=["fnmodel.rnk"]), r"--group-by 'fnmodel.rnk' is not a config key.*fnmodel.rank"),
    (Options(metric="bleu"), r"--metric 'bleu' is not logged by any run; choose from: loss, ppl"),
    (Options(x="time"), r"--x 'time' is not allowed"),
])
def test_bad_options_name_the_value(root, tmp_path, options, pattern):
    with pytest.raises(UserError, match=pattern):
        make_figures(root, tmp_path, options)


def test_folder_without_runs_exits_non_zero(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        figures.main(["--fn", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"no run folders below '{tmp_path}'" in capsys.readouterr().err


def test_cli_missing_folder_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nope"
    proc = subprocess.run([sys.executable, "figures.py", "--fn", str(missing)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: --fn '{missing}' does not exist or is not a folder"


def test_eval_json_scores_take_numbers_flat_or_nested(tmp_path):
    (tmp_path / "eval_validation_matched.json").write_text(json.dumps(
        {"accuracy": 0.5, "split": "validation_matched", "ok": True, "scores": {"f1": 0.25}}))
    assert collect.read_evals(tmp_path) == {"valid_matched/accuracy": 0.5, "valid_matched/f1": 0.25}


def test_test_scores_and_diagnostics_are_not_curves():
    from rosa_bench.figures.plots import plotted_tags

    tags = ["train/loss", "train/lr", "valid/loss", "valid_mismatched/accuracy", "test/rougeL", "test/loss"]
    curves = pd.DataFrame({"tag": tags, "step": range(len(tags)), "value": 0.0})
    assert plotted_tags(curves) == ["train/loss", "valid/loss", "valid_mismatched/accuracy"]
