"""kill -9 at chosen points (mid-step, mid-evaluation, mid-checkpoint-write, mid-epoch), then
the same command again: the final checkpoint, optimizer state, RNG state and metrics equal an
uninterrupted run's bit for bit. Each run is a real process running train.py's `__main__`,
killed for real; the fault is installed by `main` below, so the product code carries no test
hooks. The processes fork from one forkserver that imported torch, transformers and the
package once, so the five runs do not pay five interpreter starts."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import runpy
import signal
import sys
from pathlib import Path

import pytest
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


def main(fault: str | None, argv: list[str], log: str) -> None:
    """One `python train.py <argv>` run in this (forked) process, with `fault` installed and
    its output in `log`."""
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    if fault:
        install_fault(fault)
    sys.argv = [str(ROOT / "train.py"), *argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


PRELOAD = ["tests.test_reliability_kill", "rosa_bench.pipeline", "rosa_bench.train.loop",
           "transformers.models.gpt2.modeling_gpt2", "hydra"]


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing context whose processes fork from a server that imported PRELOAD."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    yield context


def train_with_fault(context, out: Path, fault: str | None) -> int:
    """The exit code of one run (negative: killed by that signal); its output is in out/*.log."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / f"{len(list(out.glob('*.log')))}-{fault or 'clean'}.log"
    process = context.Process(target=main, args=(fault, [*OVERRIDES, f"output.path={out}"], str(log)))
    process.start()
    process.join(timeout=600)
    if process.is_alive():  # hung: kill it, so that close() works and no child is left behind
        process.kill()
        process.join()
    code = process.exitcode
    process.close()
    return code


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


def test_kills_at_every_point_resume_bit_identical(tmp_path, forkserver):
    def train_with(out: Path, fault: str | None) -> int:
        return train_with_fault(forkserver, out, fault)

    assert train_with(tmp_path / "straight", None) == 0
    straight = final_state(tmp_path / "straight")

    killed = tmp_path / "killed"
    # mid-step 7: the last checkpoint (step 6) lies mid-epoch, so the resumed epoch skips 2 batches
    assert train_with(killed, "step:7") == -signal.SIGKILL
    state = runs.read_json(killed / "e2e_nlg" / "run" / "checkpoints" / "last" / "state.json")
    assert (state["global_step"], state["batches_done"]) == (6, 2)
    # resumed at 6, killed inside the evaluation at step 9 (the first one is the epoch end, 8)
    assert train_with(killed, "eval:2") == -signal.SIGKILL
    # resumed at 8, killed while writing the step-9 checkpoint: a temporary folder stays behind
    assert train_with(killed, "ckpt:1") == -signal.SIGKILL
    checkpoints = killed / "e2e_nlg" / "run" / "checkpoints"
    assert [p.name for p in checkpoints.glob(".last.tmp*")]
    assert runs.read_json(checkpoints / "last" / "state.json")["global_step"] == 8
    assert train_with(killed, None) == 0
    final_log = sorted(killed.glob("*.log"))[-1].read_text()
    assert "warning: removed 1 temporary file(s) left in" in final_log  # and said so on stderr
    resumed = final_state(killed)

    for key in ("model", "optimizer", "best"):  # optimizer.safetensors holds the RNG states too
        assert_same_tensors(resumed[key], straight[key])
    assert resumed["state"] == straight["state"]  # loop position, schedule, checksums
    assert resumed["metrics"] == straight["metrics"] and resumed["metrics"]["complete"]
    assert resumed["stray"] == straight["stray"] == []  # the temporary folder was removed
