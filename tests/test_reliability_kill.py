"""kill -9 at chosen points (mid-step, mid-evaluation, mid-checkpoint-write, mid-epoch), then
the same command again: the final checkpoint, optimizer state, RNG state and metrics equal an
uninterrupted run's bit for bit. Each run is a real subprocess of train.py; the fault is
installed by `main` below (FAULT=<kind>:<n>), so the product code carries no test hooks."""

from __future__ import annotations

import itertools
import os
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from rosa_bench import runs

ROOT = Path(__file__).resolve().parents[1]
# 16 rows / batch 4: 4 steps an epoch; 10 steps cross two epoch ends (4, 8); checkpoints and
# evaluations every 3 steps land mid-epoch (3, 6, 9) as well as at the epoch ends.
OVERRIDES = ["model=tiny-gpt2", "dataset=e2e", "dataset.max_train_samples=16", "dataset.max_eval_samples=4",
             "train.batch_size=4", "train.max_steps=10", "train.save_every=3", "logging.eval_every=3",
             "logging.log_every=1", "logging.sample_max_new_tokens=2", "logging.progress=false",
             "fnmodel.dropout=0.1", "output.name=run"]


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(spec: str) -> None:
    """step:n kills inside the n-th optimizer step (after backward, before the update);
    eval:n inside the n-th evaluation; ckpt:n after the n-th optimizer file of a checkpoint
    is written into its temporary folder (before its state file and the rename)."""
    import rosa_bench.train.checkpoint as ckpt
    import rosa_bench.train.loop as loop

    kind, n = spec.split(":")
    calls = itertools.count(1)
    if kind == "step":
        original_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            if next(calls) == int(n):
                _kill_self()
            return original_step(self, *args, **kwargs)

        torch.optim.AdamW.step = step
    elif kind == "eval":
        original_eval = loop.evaluate_split

        def evaluate_split(*args, **kwargs):
            if next(calls) == int(n):
                _kill_self()
            return original_eval(*args, **kwargs)

        loop.evaluate_split = evaluate_split
    elif kind == "ckpt":
        original_save = ckpt.save_file

        def save_file(tensors, path, *args, **kwargs):
            original_save(tensors, path, *args, **kwargs)
            if path.endswith(ckpt.OPTIMIZER_FILE) and next(calls) == int(n):
                _kill_self()

        ckpt.save_file = save_file
    else:
        raise ValueError(spec)


def main() -> None:
    """`python -c 'from tests.test_reliability_kill import main; main()' <overrides>`."""
    if os.environ.get("FAULT"):
        install_fault(os.environ["FAULT"])
    sys.argv[0] = str(ROOT / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")


def train_with_fault(out: Path, fault: str | None) -> int:
    env = {**os.environ, "FAULT": fault or "", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-c", "from tests.test_reliability_kill import main; main()",
           *OVERRIDES, f"output.path={out}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600).returncode


def final_state(out: Path) -> dict:
    folder = out / "e2e_nlg" / "run"
    last, best = folder / "checkpoints" / "last", folder / "checkpoints" / "best"
    return {"model": load_file(str(last / "model.safetensors")),
            "optimizer": load_file(str(last / "optimizer.safetensors")),
            "state": runs.read_json(last / "state.json"),
            "best": load_file(str(best / "model.safetensors")),
            "metrics": runs.read_metrics(folder),
            "stray": sorted(p.name for p in [*folder.glob(".*"), *(folder / "checkpoints").glob(".*")])}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_kills_at_every_point_resume_bit_identical(tmp_path):
    assert train_with_fault(tmp_path / "straight", None) == 0
    straight = final_state(tmp_path / "straight")

    killed = tmp_path / "killed"
    # mid-step 7: the last checkpoint (step 6) lies mid-epoch, so the resumed epoch skips 2 batches
    assert train_with_fault(killed, "step:7") == -signal.SIGKILL
    state = runs.read_json(killed / "e2e_nlg" / "run" / "checkpoints" / "last" / "state.json")
    assert (state["global_step"], state["batches_done"]) == (6, 2)
    # resumed at 6, killed inside the evaluation at step 9 (the first one is the epoch end, 8)
    assert train_with_fault(killed, "eval:2") == -signal.SIGKILL
    # resumed at 8, killed while writing the step-9 checkpoint: a temporary folder stays behind
    assert train_with_fault(killed, "ckpt:1") == -signal.SIGKILL
    checkpoints = killed / "e2e_nlg" / "run" / "checkpoints"
    assert [p.name for p in checkpoints.glob(".last.tmp*")]
    assert runs.read_json(checkpoints / "last" / "state.json")["global_step"] == 8
    assert train_with_fault(killed, None) == 0
    resumed = final_state(killed)

    for key in ("model", "optimizer", "best"):  # optimizer.safetensors holds the RNG states too
        assert_same_tensors(resumed[key], straight[key])
    assert resumed["state"] == straight["state"]  # loop position, schedule, checksums
    assert resumed["metrics"] == straight["metrics"] and resumed["metrics"]["complete"]
    assert resumed["stray"] == straight["stray"] == []  # the temporary folder was removed
