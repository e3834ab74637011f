"""The trainer end to end on tiny random models and real data rows: run-folder contents,
TensorBoard tags, checkpoints, resume after a crash, skip when complete."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rosa_bench import runs
from rosa_bench.methods.base import Method
from rosa_bench.pipeline import build, resolve, run_folder, train
from tests.test_config import composed


def tiny_run(tmp_path: Path, *extra: str) -> tuple:
    overrides = ["model=tiny-gpt2", "dataset=e2e", "dataset.max_train_samples=16",
                 "dataset.max_eval_samples=6", "train.batch_size=4", "train.max_steps=6",
                 "logging.log_every=1", "logging.eval_every=3", "logging.sample_max_new_tokens=4",
                 "logging.progress=false", f"output.path={tmp_path}", *extra]
    return composed(overrides), [o for o in overrides if not o.startswith("output.")]


def tags(folder: Path) -> dict[str, list]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    found = {t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    found |= {t: [e.step for e in acc.Tensors(t)] for t in acc.Tags()["tensors"]}
    return found


def test_causal_run_writes_a_complete_run_folder(tmp_path):
    run, overrides = tiny_run(tmp_path)
    folder = train(run, overrides)
    assert folder.parent == tmp_path / "e2e_nlg"
    assert folder.name.startswith("lora_tiny-gpt2,dataset.max_eval_samples=6,dataset.max_train_samples=16,")
    metrics = runs.read_metrics(folder)
    assert metrics["complete"] and metrics["global_step"] == 6
    assert metrics["best"]["metric"] == "loss" and metrics["best"]["step"] in (3, 6)
    assert metrics["trainable_params"] == 2 * 8 * (32 + 96)  # rank 8 on c_attn (32 -> 96), 2 layers
    assert (folder / "config.yaml").is_file()
    for which in ("last", "best"):
        assert (folder / "checkpoints" / which / "model.safetensors").is_file()
    found = tags(folder)
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "train/peak_mem_mb",
                "train/trainable_params", "valid/loss", "valid/ppl", "valid/sample/text_summary"):
        assert tag in found, (tag, sorted(found))
    assert found["train/loss"] == [1, 2, 3, 4, 5, 6]
    assert found["valid/loss"] == [3, 4, 6]  # every 3 steps, the epoch end (4), the end


def test_rerunning_a_complete_run_does_nothing(tmp_path, capsys):
    run, overrides = tiny_run(tmp_path, "train.max_steps=2")
    folder = train(run, overrides)
    before = (folder / "checkpoints" / "last" / "model.safetensors").stat().st_mtime_ns
    train(run, overrides)
    assert "already complete" in capsys.readouterr().out
    assert (folder / "checkpoints" / "last" / "model.safetensors").stat().st_mtime_ns == before


class Crash(Exception):
    pass


def test_resume_after_crash_reaches_the_same_weights(tmp_path, monkeypatch):
    # dropout exercises the RNG restore; 16 rows / batch 4 = 4 steps an epoch, so 6 steps
    # cross an epoch boundary; the crash comes after the step-4 checkpoint.
    extra = ("fnmodel.dropout=0.1", "train.save_every=2")
    run, overrides = tiny_run(tmp_path / "straight", *extra)
    straight = load_file(str(train(run, overrides) / "checkpoints" / "last" / "model.safetensors"))

    run, overrides = tiny_run(tmp_path / "crashed", *extra)

    def crash_at_5(self, trainer):
        if trainer.global_step == 5:
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(Method, "on_step_end", crash_at_5)
        with pytest.raises(Crash):
            train(run, overrides)
    folder = run_folder(resolve(run), overrides)
    assert not runs.is_complete(folder)
    assert runs.read_json(folder / "checkpoints" / "last" / "state.json")["global_step"] == 4
    resumed = load_file(str(train(run, overrides) / "checkpoints" / "last" / "model.safetensors"))
    assert runs.read_metrics(folder)["global_step"] == 6
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=0, rtol=0)


def test_checkpoint_round_trip_restores_outputs(tmp_path):
    run, overrides = tiny_run(tmp_path, "train.max_steps=3")
    folder = train(run, overrides)
    parts = build(resolve(run))
    batch = parts.task.collate([parts.task.splits["validation"][i] for i in range(3)])
    with torch.no_grad():
        untrained = parts.model(**batch).logits
    saved = load_file(str(folder / "checkpoints/last/model.safetensors"))
    parts.method.load_checkpoint_state(parts.model, saved)
    with torch.no_grad():
        restored = parts.model(**batch).logits
    assert (restored - untrained).abs().max() > 0
    again = build(resolve(run))
    again.method.load_checkpoint_state(again.model, saved)
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, restored, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["full", "lora", "peft_lora"])
def test_glue_classification_logs_the_task_metric(tmp_path, method):
    overrides = ["model=tiny-bert", "dataset=glue", "dataset.task=mrpc", f"fnmodel={method}",
                 "dataset.max_train_samples=16", "dataset.max_eval_samples=8", "train.batch_size=8",
                 "train.max_steps=2", "logging.progress=false", f"output.path={tmp_path}"]
    folder = train(composed(overrides), overrides[:-1])
    assert folder.parent == tmp_path / "glue" / "mrpc"
    found = tags(folder)
    assert {"valid/accuracy", "valid/f1", "valid/loss"} <= set(found)
    metrics = runs.read_metrics(folder)
    assert metrics["best"]["metric"] == "accuracy"
    assert 0.0 <= metrics["final"]["validation"]["accuracy"] <= 1.0
