"""Faults injected one at a time, without training: damaged checkpoints, the run-folder lock,
strict JSON, failing disks, values that would silently train something else, bad data files,
untrusted run folders. Each bad input must give one UserError line naming it."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rosa_bench import runlock, runs
from rosa_bench.data.files import read_table
from rosa_bench.errors import UserError
from rosa_bench.train import checkpoint as ckpt
from tests.test_config import ROOT, composed

# ---- values that would silently train something else, and other bad inputs -------------------


@pytest.mark.parametrize(("override", "named"), [
    ("train.max_grad_norm=-1", "train.max_grad_norm=-1"),
    ("train.weight_decay=-1", "train.weight_decay=-1"),
    ("train.lr=inf", "train.lr=inf"),
    ("train.lr=nan", "train.lr=nan"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints=0"),
    ("train.resume=sometimes", "train.resume='sometimes'"),
    ("fnmodel.alpha=0", "fnmodel.alpha=0"),
    ("fnmodel.targets=[]", "fnmodel.targets=[]"),
    ("fnmodel.targets=['[']", "'['"),
    ("seed=abc", "seed='abc'"),
    ("seed=1.5", "seed=1.5"),
    ("seed=-1", "seed=-1"),
    ("seed=4294967296", "seed=4294967296"),
    ("output.name=../../x", "output.name='../../x'"),
    ("output.name=/tmp/x", "output.name='/tmp/x'"),
    ("output.name=a/b", "output.name='a/b'"),
])
def test_values_that_would_train_something_else_are_refused(override, named):
    with pytest.raises(UserError) as err:
        composed([override])
    message = str(err.value)
    assert named in message.replace(".0", ""), message
    assert "\n" not in message


@pytest.mark.parametrize(("override", "expected"), [
    ("train.lrr=1e-3", "unknown option 'train.lrr'; train has: batch_size, "),
    ("foo=bar", "unknown option 'foo'; the config has: dataset, fnmodel, "),
    ("train.lr=[", "cannot parse the override 'train.lr=[': "),
])
def test_a_typo_hydra_cannot_compose_is_one_line_from_the_cli(tmp_path, override, expected):
    """Hydra's own composition errors (a misspelt key, bad override syntax) in a real train.py."""
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), override, f"output.path={tmp_path}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(f"error: {expected}")
    assert list(tmp_path.iterdir()) == []


def test_a_config_error_raised_inside_the_run_keeps_its_traceback(capsys):
    """Only an error composing the overrides is a bad input; the same exception type raised by
    the training code is a bug and must surface whole, not as a one-line 'unknown option'."""
    from omegaconf.errors import ConfigAttributeError

    from rosa_bench.cli import exit_on_config_error, exit_on_user_error

    def composing():
        raise ConfigAttributeError("Key 'lrr' is not in struct")

    @exit_on_user_error
    def task():
        composing()

    with pytest.raises(SystemExit) as ended:
        exit_on_config_error(composing)()
    assert ended.value.code == 2 and capsys.readouterr().err.startswith("error: ")
    with pytest.raises(ConfigAttributeError, match="lrr"):
        exit_on_config_error(task)()
    assert capsys.readouterr().err == ""


def test_legitimate_edge_values_are_accepted():
    run = composed(["train.max_grad_norm=0", "train.weight_decay=0", "fnmodel.targets=[c_attn]",
                    "output.name=my-run"])
    assert run.train.max_grad_norm == 0 and run.fnmodel.targets == ["c_attn"]


# ---- checkpoints: checksums, named damage, fallback -----------------------------------------------


def _write_checkpoint(folder: Path, step: int, keep: int = 2) -> None:
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"global_step": step, "epoch": 0, "batches_done": step, "best": {}, "nonfinite_skipped": 0}
    ckpt.save_checkpoint(folder / "checkpoints" / "last", dict(layer.state_dict()), state, optimizer,
                         keep=keep)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _without(key: str):
    def damage(folder: Path) -> None:
        state = runs.read_json(folder / ckpt.STATE_FILE)
        runs.write_json(folder / ckpt.STATE_FILE, {k: v for k, v in state.items() if k != key})

    return damage


BAD_MODEL = "model.safetensors fails its checksum"
DAMAGE = {
    "truncated model": (lambda c: (c / ckpt.MODEL_FILE).write_bytes((c / ckpt.MODEL_FILE).read_bytes()[:40]),
                        BAD_MODEL),
    "empty model": (lambda c: (c / ckpt.MODEL_FILE).write_bytes(b""), BAD_MODEL),
    "flipped tensor byte": (lambda c: _flip_last_byte(c / ckpt.MODEL_FILE), BAD_MODEL),
    "flipped optimizer byte": (lambda c: _flip_last_byte(c / ckpt.OPTIMIZER_FILE),
                               "optimizer.safetensors fails its checksum"),
    "missing optimizer": (lambda c: (c / ckpt.OPTIMIZER_FILE).unlink(), "optimizer.safetensors is missing"),
    "missing state": (lambda c: (c / ckpt.STATE_FILE).unlink(), "state.json is missing"),
    "garbage state": (lambda c: (c / ckpt.STATE_FILE).write_text("{garbage"), "state.json is not valid JSON"),
    "state without a key": (_without("global_step"), "['global_step']"),
    "state without checksums": (_without("files"), "holds no checksums"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, damage, caplog):
    _write_checkpoint(tmp_path, 2)
    _write_checkpoint(tmp_path, 4)
    last = tmp_path / "checkpoints" / "last"
    assert ckpt.find_resumable(tmp_path) == last
    apply, expected = DAMAGE[damage]
    apply(last)
    with pytest.raises(ckpt.CheckpointError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        ckpt.check_resumable(last)
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resumable(tmp_path) == tmp_path / "checkpoints" / "last.1"
    assert str(last) in caplog.text and expected in caplog.text
    # when the previous one is damaged too, the run stops instead of starting over
    apply(tmp_path / "checkpoints" / "last.1")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint .*delete the run folder"):
        ckpt.find_resumable(tmp_path)


def _as_before_checksums(folder: Path) -> None:
    """Rewrite a checkpoint's state as versions before the checksums wrote it."""
    state = runs.read_json(folder / ckpt.STATE_FILE)
    runs.write_json(folder / ckpt.STATE_FILE, {k: v for k, v in state.items()
                                               if k not in (ckpt.CHECKSUMS, *ckpt.SINCE_CHECKSUMS)})


def test_a_checkpoint_from_before_checksums_loads_with_a_warning(tmp_path, caplog):
    _write_checkpoint(tmp_path, 2)
    last = tmp_path / "checkpoints" / "last"
    _as_before_checksums(last)
    with caplog.at_level(logging.WARNING):
        assert ckpt.find_resumable(tmp_path) == last
        assert set(ckpt.load_model_state(last)) == {"weight", "bias"}
    assert caplog.text.count("predates checksums: its files cannot be verified") == 1
    # unverified is not unchecked: a missing or unparsable file is still refused
    (last / ckpt.OPTIMIZER_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors is missing"):
        ckpt.check_resumable(last)
    (last / ckpt.MODEL_FILE).write_bytes((last / ckpt.MODEL_FILE).read_bytes()[:40])
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_model_state(last)


def test_checkpoint_tensors_must_fit_the_model_by_name_and_shape():
    from rosa_bench.methods.base import copy_checked

    own = {"weight": torch.zeros(2, 3)}
    with pytest.raises(UserError, match=r"weight \(3,\) \(model \(2, 3\)\)"):
        copy_checked(own, {"weight": torch.ones(3)})  # copy_ alone would broadcast it
    assert torch.equal(own["weight"], torch.zeros(2, 3))
    copy_checked(own, {"weight": torch.ones(2, 3)})
    assert torch.equal(own["weight"], torch.ones(2, 3))


def test_loading_model_weights_verifies_them(tmp_path):
    _write_checkpoint(tmp_path, 1)
    last = tmp_path / "checkpoints" / "last"
    assert set(ckpt.load_model_state(last)) == {"weight", "bias"}
    _flip_last_byte(last / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors fails its checksum"):
        ckpt.load_model_state(last)


def test_keep_checkpoints_rotates_and_no_checkpoint_means_a_fresh_start(tmp_path):
    assert ckpt.find_resumable(tmp_path) is None
    for step in (1, 2, 3, 4):
        _write_checkpoint(tmp_path, step, keep=3)
    history = runs.checkpoint_history(tmp_path, "last")
    assert [h.name for h in history] == ["last", "last.1", "last.2"]
    assert [runs.read_json(h / ckpt.STATE_FILE)["global_step"] for h in history] == [4, 3, 2]
    _write_checkpoint(tmp_path, 5, keep=1)  # a lowered keep_checkpoints drops the extra ones
    assert [h.name for h in runs.checkpoint_history(tmp_path, "last")] == ["last"]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_the_previous_one(tmp_path, monkeypatch):
    _write_checkpoint(tmp_path, 2)
    original = ckpt.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if path.endswith(ckpt.OPTIMIZER_FILE):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(UserError, match="cannot write .*optimizer.safetensors: No space left on device"):
        _write_checkpoint(tmp_path, 4)
    assert ckpt.find_resumable(tmp_path) == tmp_path / "checkpoints" / "last"
    assert runs.read_json(tmp_path / "checkpoints" / "last" / ckpt.STATE_FILE)["global_step"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last"]  # no temporary left


def test_a_full_disk_during_a_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / runs.METRICS_FILE
    runs.write_json(path, {"complete": False})

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(UserError, match=f"cannot write {path}: No space left on device"):
        runs.write_json(path, {"complete": True})
    assert runs.read_json(path) == {"complete": False}
    assert [p.name for p in tmp_path.iterdir()] == [runs.METRICS_FILE]


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    (tmp_path / "checkpoints" / ".last.tmpab12").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".last.tmpab12" / ckpt.MODEL_FILE).write_bytes(b"x")
    (tmp_path / ".metrics.json.x1y2").write_text("{")
    (tmp_path / runs.METRICS_FILE).write_text("{}")
    removed = runs.remove_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".last.tmpab12", ".metrics.json.x1y2"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["checkpoints", runs.METRICS_FILE]


# ---- strict JSON ------------------------------------------------------------------------------


def test_metrics_json_never_holds_a_bare_nan(tmp_path):
    path = tmp_path / "m.json"
    runs.write_json(path, {"best": {"value": float("nan"), "scores": [float("inf"), 1.0]}, "ok": 2.5})

    def refuse(constant):
        raise AssertionError(f"bare {constant} in JSON")

    expected = {"best": {"value": None, "scores": [None, 1.0]}, "ok": 2.5}
    assert json.loads(path.read_text(), parse_constant=refuse) == expected


# ---- one process per run folder -----------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_owner(tmp_path):
    fd = runlock.acquire(tmp_path)
    try:
        owner = json.loads((tmp_path / runlock.LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"in use by process {os.getpid()} on host {owner['host']}"):
            runlock.acquire(tmp_path)
    finally:
        runlock.release(tmp_path, fd)
    assert not (tmp_path / runlock.LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / runlock.LOCK_FILE).write_text(json.dumps({"host": "gpu-node-7", "pid": 4242}))
    with caplog.at_level(logging.WARNING):
        fd = runlock.acquire(tmp_path)
    runlock.release(tmp_path, fd)
    assert "taking over the stale lock" in caplog.text and "process 4242 on host gpu-node-7" in caplog.text


# ---- bad data files ------------------------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [
    (b"sentence\tlabel\nfine\t1\nbad \xff byte\t0\n", r"line 3: not UTF-8 text \(byte 0xff"),
    (b"sentence\tlabel\nok\t1\n\x00\x01\x02\x00\t1\n", r"line 3: binary data"),
])
def test_binary_or_non_utf8_tables_name_the_file_and_line(tmp_path, content, expected):
    path = tmp_path / "train.tsv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"{path}, {expected}"):
        list(read_table(path, "\t", required=("sentence", "label")))


# ---- untrusted run folders, readers of damaged folders, hub loads ----------------------------------


def _run_folder(tmp_path: Path, **model: object) -> Path:
    run = composed(["model=tiny-gpt2", f"output.path={tmp_path}"])
    runs.write_config(tmp_path, run, [])
    cfg = OmegaConf.load(tmp_path / runs.CONFIG_FILE)
    for key, value in model.items():
        cfg.model[key] = value
    (tmp_path / runs.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    return tmp_path


def test_trust_remote_code_from_a_run_folder_needs_the_command_line(tmp_path):
    folder = _run_folder(tmp_path, trust_remote_code=True)
    with pytest.raises(UserError, match="sets model.trust_remote_code=true.*pass --trust-remote-code"):
        runs.read_config(folder)
    assert runs.read_config(folder, trust_remote_code=True).model.trust_remote_code
    from rosa_bench.evaluate import evaluate_run

    with pytest.raises(UserError, match="--trust-remote-code"):
        evaluate_run(folder)


def test_evaluating_a_folder_whose_config_is_not_yaml_is_one_line(tmp_path):
    from rosa_bench.evaluate import evaluate_run

    (tmp_path / runs.CONFIG_FILE).write_text("model: [unclosed\n  : :")
    with pytest.raises(UserError, match=f"{tmp_path / runs.CONFIG_FILE} is not a valid config"):
        evaluate_run(tmp_path)


def test_figures_skip_a_run_whose_metrics_json_is_corrupt(tmp_path, caplog):
    from rosa_bench.figures.collect import collect

    good, bad = _run_folder(tmp_path / "good"), _run_folder(tmp_path / "bad")
    runs.write_json(good / runs.METRICS_FILE, {"complete": True, "global_step": 3})
    (bad / runs.METRICS_FILE).write_text('{"complete": tru')
    with caplog.at_level(logging.WARNING):
        found = collect(tmp_path)
    assert list(found.runs.index) == ["good"]
    assert "skipping run bad" in caplog.text and len(found.skipped) == 1


def test_model_loads_insist_on_safetensors(monkeypatch):
    from rosa_bench import models

    seen = {}

    class Recorder:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.update(kwargs)
            raise OSError("stop here")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    with pytest.raises(OSError):
        models._from_folder("some/hub-id", composed([]).model, Recorder, {}, torch.float32)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


def test_the_gradients_decide_what_is_non_finite():
    from rosa_bench.train.guard import NonFiniteError, NonFiniteGuard

    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.zeros(2)  # a batch whose labels are all ignored: NaN mean loss, zero gradients
    assert NonFiniteGuard(skip=False).skip_step(torch.tensor(float("nan")), [param], 1) is False
    param.grad = torch.tensor([float("inf"), 0.0])
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 2"):
        NonFiniteGuard(skip=False).skip_step(torch.tensor(1.0), [param], 2)
    skipping = NonFiniteGuard(skip=True)
    assert skipping.skip_step(torch.tensor(1.0), [param], 3) and skipping.skipped == 1
    no_grads = torch.nn.Parameter(torch.ones(2))  # update made later (ColA): the loss decides
    with pytest.raises(NonFiniteError, match=r"non-finite loss \(nan\) at step 4"):
        NonFiniteGuard(skip=False).skip_step(torch.tensor(float("nan")), [no_grads], 4)
