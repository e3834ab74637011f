"""Short real-data trainings with the real offline models, one per task family (slow)."""

from __future__ import annotations

import pytest

from rosa_bench import runs
from rosa_bench.pipeline import train
from tests.test_config import composed

pytestmark = pytest.mark.slow


def short_run(tmp_path, *overrides: str) -> dict:
    args = ["train.max_steps=4", "train.batch_size=4", "dataset.max_train_samples=64",
            "dataset.max_eval_samples=16", "logging.progress=false", *overrides]
    folder = train(composed([*args, f"output.path={tmp_path}"]), args)
    return runs.read_metrics(folder)


def test_smollm2_lora_on_e2e(tmp_path):
    metrics = short_run(tmp_path, "fnmodel.name=lora", "dataset.name=e2e")
    assert metrics["complete"] and metrics["model"] == "smollm2-135m"
    # q_proj 576->576 and v_proj 576->192, rank 8, 30 layers
    assert metrics["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))
    # a real pretrained LM finds E2E references far likelier than chance (ppl ~ vocab 49k)
    assert metrics["final"]["validation"]["ppl"] < 60


@pytest.mark.parametrize("task,metric", [("sst2", "accuracy"), ("stsb", "pearson")])
def test_minilm_on_glue(tmp_path, task, metric):
    metrics = short_run(tmp_path, "fnmodel.name=lora", "dataset.name=glue", f"dataset.task={task}",
                        "train.lr=1e-3")
    assert metrics["complete"] and metrics["model"] == "minilm-l6"
    labels = 1 if task == "stsb" else 2
    # query and value 384->384 at rank 8 in 6 layers, plus the head (384 x labels + bias)
    assert metrics["trainable_params"] == 6 * 2 * 8 * (384 + 384) + 384 * labels + labels
    assert metrics["best"]["metric"] == metric
    assert -1.0 <= metrics["final"]["validation"][metric] <= 1.0
