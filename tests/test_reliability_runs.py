"""Faults injected into real (tiny) training runs, in process: NaN losses, changed configs
and data on resume, damaged checkpoints, a locked folder, and bad inputs that must leave no
run folder behind. The kill -9 cases are in test_reliability_kill.py."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rosa_bench import pipeline, runlock, runs
from rosa_bench.cli import exit_on_user_error
from rosa_bench.methods.base import Method
from rosa_bench.train import checkpoint as ckpt
from rosa_bench.train import logger as logger_module
from tests.test_config import composed
from tests.test_train import tiny_run


@exit_on_user_error
def _cli(overrides: list[str]) -> None:
    """What train.py does after Hydra composed the config."""
    pipeline.train(composed(overrides), [o for o in overrides if not o.startswith("output.")])


def cli_train(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    """(exit code, run folder) of a tiny run (6 steps, 4 an epoch) with `extra` overrides."""
    _, base = tiny_run(tmp_path)  # its overrides without output.*; later overrides win
    try:
        _cli([*base, *extra, f"output.path={tmp_path}", "output.name=run"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, tmp_path / "e2e_nlg" / "run"


def error_line(capsys) -> str:
    """The one 'error:' line the CLI printed (progress bars of the data loading aside)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"bare {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def nan_loss_at(monkeypatch, steps: set[int]) -> None:
    """Make the training loss NaN at the given optimizer steps (one micro-batch a step)."""
    original = pipeline.build

    def build(run):
        parts = original(run)
        calls = itertools.count(1)

        def poison(module, args, output):
            if module.training and next(calls) in steps:
                output.loss = output.loss * float("nan")
            return output

        parts.model.register_forward_hook(poison)
        return parts

    monkeypatch.setattr(pipeline, "build", build)


def assert_finite(folder: Path) -> None:
    for tensor in load_file(str(folder / ckpt.MODEL_FILE)).values():
        assert torch.isfinite(tensor).all()


# ---- non-finite losses -----------------------------------------------------------------------------


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch, capsys):
    nan_loss_at(monkeypatch, {3})
    code, folder = cli_train(tmp_path, "train.save_every=2", "logging.eval_every=2")
    err = error_line(capsys)
    assert code == 3
    assert err.startswith("error: non-finite loss (nan) at step 3") and "train.skip_nonfinite=true" in err
    metrics = strict_json(folder / runs.METRICS_FILE)
    assert metrics["complete"] is False and metrics["failed"]["step"] == 3
    assert runs.read_json(folder / "checkpoints" / "last" / "state.json")["global_step"] == 2
    assert_finite(folder / "checkpoints" / "last")
    assert_finite(folder / "checkpoints" / "best")


def test_a_diverging_learning_rate_stops_with_strict_metrics(tmp_path, capsys):
    code, folder = cli_train(tmp_path, "train.lr=1e10", "train.max_grad_norm=null")
    assert code == 3 and "non-finite" in error_line(capsys)
    metrics = strict_json(folder / runs.METRICS_FILE)
    assert metrics["complete"] is False and metrics["failed"]["step"] <= 6
    best = folder / "checkpoints" / "best"
    if best.exists():  # an evaluation before the divergence
        assert_finite(best)


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {2, 5})
    code, folder = cli_train(tmp_path, "train.skip_nonfinite=true")
    assert code == 0
    metrics = strict_json(folder / runs.METRICS_FILE)
    assert metrics["complete"] and metrics["global_step"] == 6 and metrics["nonfinite_skipped"] == 2
    optimizer = load_file(str(folder / "checkpoints" / "last" / ckpt.OPTIMIZER_FILE))
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {4.0}  # 6 steps, 2 skipped
    assert_finite(folder / "checkpoints" / "last")


# ---- resume only with the same config and data ---------------------------------------------------------


def test_a_changed_config_is_refused_listing_the_keys(tmp_path, capsys):
    assert cli_train(tmp_path, "train.max_steps=2")[0] == 0
    code, folder = cli_train(tmp_path, "train.max_steps=2", "train.lr=1e-3", "fnmodel.rank=4")
    err = error_line(capsys)
    assert code == 2 and "fnmodel.rank: 8 -> 4" in err and "train.lr: 0.0002 -> 0.001" in err
    assert "train.resume=force" in err
    assert runs.read_config(folder).train.lr == 2e-4  # config.yaml still says what was trained
    # keys that do not change results do not count
    assert cli_train(tmp_path, "train.max_steps=2", "logging.progress=true", "train.num_workers=0")[0] == 0
    assert "already complete" in capsys.readouterr().out


def test_a_longer_budget_on_a_complete_run_is_refused_or_extended(tmp_path, capsys, caplog):
    assert cli_train(tmp_path, "train.max_steps=2")[0] == 0
    code, folder = cli_train(tmp_path, "train.max_steps=4")
    err = error_line(capsys)
    assert code == 2 and "complete run" in err and "train.max_steps: 2 -> 4" in err and "budget" in err
    with caplog.at_level(logging.WARNING):
        assert cli_train(tmp_path, "train.max_steps=4", "train.resume=force")[0] == 0
    assert "extending the complete run" in caplog.text
    metrics = runs.read_metrics(folder)
    assert metrics["complete"] and metrics["global_step"] == 4
    assert runs.read_config(folder).train.max_steps == 4


def _e2e_copy(root: Path, data_root: Path, edit_first_row: bool) -> Path:
    (root / "e2e").mkdir(parents=True)
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        lines = (data_root / "e2e" / name).read_text(encoding="utf-8").splitlines(keepends=True)[:60]
        if edit_first_row and name == "trainset.csv":
            lines[1] = lines[1].replace("pub", "cafe", 1)
        (root / "e2e" / name).write_text("".join(lines), encoding="utf-8")
    return root


class Crash(Exception):
    pass


def _crash_at(step: int):
    def on_step_end(self, trainer):
        if trainer.global_step == step:
            raise Crash

    return on_step_end


def test_other_data_under_the_same_run_is_refused(tmp_path, data_root, monkeypatch, capsys):
    first = _e2e_copy(tmp_path / "first", data_root, edit_first_row=False)
    same = _e2e_copy(tmp_path / "same", data_root, edit_first_row=False)
    other = _e2e_copy(tmp_path / "other", data_root, edit_first_row=True)
    with monkeypatch.context() as m:
        m.setattr(Method, "on_step_end", _crash_at(3))
        with pytest.raises(Crash):
            cli_train(tmp_path, f"dataset.cache={first}", "train.save_every=2")
    code, folder = cli_train(tmp_path, f"dataset.cache={other}", "train.save_every=2")
    err = error_line(capsys)
    assert code == 2 and "data of split(s) train differs" in err and str(other) in err  # not validation
    assert runs.read_json(folder / "checkpoints" / "last" / "state.json")["global_step"] == 2
    # the same rows under another path resume
    assert cli_train(tmp_path, f"dataset.cache={same}", "train.save_every=2")[0] == 0
    assert runs.read_metrics(folder)["complete"]


# ---- damaged checkpoints in a real run ---------------------------------------------------------------


def test_a_damaged_last_checkpoint_falls_back_and_reaches_the_same_weights(tmp_path, monkeypatch, caplog):
    extra = ("fnmodel.dropout=0.1", "train.save_every=2")
    code, straight_folder = cli_train(tmp_path / "straight", *extra)
    assert code == 0
    straight = load_file(str(straight_folder / "checkpoints" / "last" / ckpt.MODEL_FILE))
    with monkeypatch.context() as m:
        m.setattr(Method, "on_step_end", _crash_at(5))
        with pytest.raises(Crash):
            cli_train(tmp_path / "damaged", *extra)
    checkpoints = tmp_path / "damaged" / "e2e_nlg" / "run" / "checkpoints"
    data = bytearray((checkpoints / "last" / ckpt.MODEL_FILE).read_bytes())
    data[-3] ^= 0x10  # one flipped bit inside the tensor data
    (checkpoints / "last" / ckpt.MODEL_FILE).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert cli_train(tmp_path / "damaged", *extra)[0] == 0
    assert f"{checkpoints / 'last' / ckpt.MODEL_FILE} fails its checksum" in caplog.text
    assert "resuming from the older checkpoint" in caplog.text and "last.1" in caplog.text
    resumed = load_file(str(checkpoints / "last" / ckpt.MODEL_FILE))
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name


def test_no_usable_checkpoint_stops_instead_of_starting_over(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as m:
        m.setattr(Method, "on_step_end", _crash_at(5))
        with pytest.raises(Crash):
            cli_train(tmp_path, "train.save_every=2")
    checkpoints = tmp_path / "e2e_nlg" / "run" / "checkpoints"
    for which in ("last", "last.1"):
        (checkpoints / which / ckpt.STATE_FILE).unlink()
    code, _ = cli_train(tmp_path, "train.save_every=2")
    err = error_line(capsys)
    assert code == 2 and "no usable checkpoint" in err and "state.json is missing" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best", "last", "last.1"]  # untouched


# ---- one process per folder; nothing left behind by bad input ---------------------------------------------


def test_a_folder_in_use_is_refused(tmp_path, capsys):
    folder = tmp_path / "e2e_nlg" / "run"
    folder.mkdir(parents=True)
    fd = runlock.acquire(folder)
    try:
        code, _ = cli_train(tmp_path)
    finally:
        runlock.release(folder, fd)
    assert code == 2 and "is in use by process" in error_line(capsys)
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("extra", [
    ("fnmodel=cola", "fnmodel.users=3"),  # e2e names no users: found at the first step
    ("train.lr=nan",),
    ("dataset.cache={empty}",),  # a train file with only its header line
])
def test_bad_input_leaves_no_run_folder(tmp_path, data_root, capsys, extra):
    empty = _e2e_copy(tmp_path / "data", data_root, edit_first_row=False)
    (empty / "e2e" / "trainset.csv").write_text("mr,ref\n")
    out = tmp_path / "out"
    code, _ = cli_train(out, *(e.format(empty=empty) for e in extra))
    error_line(capsys)
    assert code == 2
    assert not out.exists() or list(out.rglob("*")) == []


def test_an_output_path_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _ = cli_train(tmp_path / "file" / "runs")
    assert code == 2 and error_line(capsys).startswith("error: cannot write")


def _fails_once_checkpointed(original, error: int, only=lambda *args: True):
    """`original` raising OSError(`error`) on every call (that `only` picks) once the run has a
    'last' checkpoint: the disk fills up (or turns read-only) in the middle of the run."""

    def failing(*args, **kwargs):
        if list(Path(failing.folder).glob("checkpoints/last")) and only(*args):
            raise OSError(error, os.strerror(error))
        return original(*args, **kwargs)

    return failing


FULL_DISK_AT = {  # what is being written when the disk fills up: (module, attribute, only)
    "event file": (logger_module._Descriptor, "write", lambda *args: True),
    "metrics.json": (runs.os, "fsync", lambda *args: True),
    "checkpoint": (ckpt, "save_file", lambda tensors, path, *rest: path.endswith(ckpt.OPTIMIZER_FILE)),
}


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
@pytest.mark.parametrize("where", list(FULL_DISK_AT))
def test_a_full_disk_anywhere_in_a_run_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch, capsys,
                                                                          where, error):
    owner, name, only = FULL_DISK_AT[where]
    failing = _fails_once_checkpointed(getattr(owner, name), error, only)
    failing.folder = tmp_path / "e2e_nlg" / "run"
    with monkeypatch.context() as m:
        m.setattr(owner, name, failing)
        code, folder = cli_train(tmp_path, "train.save_every=2")
    line = error_line(capsys)
    assert code == 2 and line.startswith("error: cannot write ") and os.strerror(error) in line, line
    last = ckpt.find_resumable(folder)  # the previous checkpoint stays whole and verifiable
    assert last is not None and ckpt.check_resumable(last)["global_step"] >= 2
    assert cli_train(tmp_path, "train.save_every=2")[0] == 0  # room again: the same command resumes
    assert runs.read_metrics(folder)["complete"] and "resuming" in capsys.readouterr().out
    leftovers = [p.name for p in [*folder.glob(".*"), *(folder / "checkpoints").glob(".*")]]
    assert leftovers == []


def test_stray_temporary_files_are_removed_at_the_next_start(tmp_path):
    folder = tmp_path / "e2e_nlg" / "run"
    (folder / "checkpoints" / ".last.tmp1234").mkdir(parents=True)
    (folder / ".metrics.json.abcd").write_text("{")
    assert cli_train(tmp_path, "train.max_steps=2")[0] == 0
    leftovers = [p.name for p in [*folder.glob(".*"), *(folder / "checkpoints").glob(".*")]]
    assert leftovers == []
