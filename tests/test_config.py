"""Config composition: every group option composes and validates; both override forms mean
the same; bad names fail with the choices listed, before any model loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rosa_bench.cli import CONF_DIR, group_options, normalize_overrides
from rosa_bench.config import RunConfig, validate
from rosa_bench.errors import UserError
from rosa_bench.pipeline import resolve
from rosa_bench.runs import run_name

ROOT = Path(__file__).resolve().parents[1]


def composed(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=normalize_overrides(overrides))
    return validate(cfg)


@pytest.mark.parametrize("group", ["model", "dataset", "fnmodel", "train", "logging"])
def test_every_group_option_composes_and_validates(group):
    options = group_options(group)
    assert options, group
    for option in options:
        run = composed([f"{group}={option}"])
        if group in ("model", "dataset", "fnmodel"):
            assert getattr(run, group).name == option


def test_seed_form_and_group_form_are_the_same():
    seed = composed(["fnmodel.name=lora", "dataset.name=glue", "dataset.task=rte", "train.max_steps=20"])
    group = composed(["fnmodel=lora", "dataset=glue", "dataset.task=rte", "train.max_steps=20"])
    assert OmegaConf.structured(seed) == OmegaConf.structured(group)
    assert normalize_overrides(["fnmodel.name=peft_lora"]) == ["fnmodel=peft_lora"]
    assert normalize_overrides(["fnmodel.name=lora,full"]) == ["fnmodel=lora,full"]  # multirun sweeps


def test_cola_mixes_need_no_quotes():
    assert normalize_overrides(["fnmodel.adapter=lowrank~linear"]) == ["fnmodel.adapter='lowrank~linear'"]
    sweep = normalize_overrides(["fnmodel.adapter=lowrank~linear,mlp"])
    assert sweep == ["fnmodel.adapter='lowrank~linear','mlp'"]
    quoted = ["fnmodel.adapter='lowrank~mlp'", "~seed"]  # already quoted, and Hydra's deletion
    assert normalize_overrides(quoted) == quoted
    assert composed(["fnmodel=cola", "fnmodel.adapter=lowrank~linear"]).fnmodel.adapter == "lowrank~linear"


def test_selecting_a_method_brings_its_defaults():
    run = composed(["fnmodel.name=full"])
    assert run.fnmodel.name == "full"
    assert composed(["fnmodel.name=lora", "fnmodel.rank=4"]).fnmodel.rank == 4


def test_unknown_hub_model_name_stays_a_hub_id():
    assert normalize_overrides(["model.name=EleutherAI/pythia-70m"]) == ["model.name=EleutherAI/pythia-70m"]
    assert normalize_overrides(["model=gpt2"]) == ["model=gpt2"]
    run = composed(["model.name=EleutherAI/pythia-70m"])
    assert run.model.name == "EleutherAI/pythia-70m" and run.model.source == "hub"


@pytest.mark.parametrize("arg,pattern", [
    ("fnmodel.name=nope", r"unknown fnmodel.*'nope'.*full, lora, .*peft_lora"),
    ("fnmodel=nope", r"unknown fnmodel.*'nope'.*full, lora"),
    ("dataset.name=imdb", r"unknown dataset.*'imdb'.*e2e, eli5, glue"),
])
def test_unknown_names_list_the_choices(arg, pattern):
    with pytest.raises(UserError, match=pattern):
        normalize_overrides([arg])


@pytest.mark.parametrize("overrides,pattern", [
    (["train.scheduler=step"], r"train.scheduler='step'.*linear, cosine, constant"),
    (["train.precision=fp8"], r"train.precision='fp8'.*fp32, bf16, fp16"),
    (["fnmodel.rank=0"], r"fnmodel.rank=0 must be a positive integer"),
    (["train.lr=-1"], r"train.lr=-1.0 must be > 0"),
    (["train.batch_size=abc"], r"invalid config in 'train'"),
    (["dataset=glue", "dataset.task=qqq"], r"unknown .*task.*'qqq'.*cola.*wnli"),
])
def test_bad_values_are_rejected(overrides, pattern):
    with pytest.raises(UserError, match=pattern):
        composed(overrides)


def test_run_name_is_readable_and_the_same_for_both_forms():
    a = ["fnmodel.name=lora", "dataset.name=e2e", "train.max_steps=20", "fnmodel.rank=4"]
    b = ["fnmodel=lora", "dataset=e2e", "fnmodel.rank=4", "train.max_steps=20"]
    name_a = run_name(resolve(composed(a)), normalize_overrides(a))
    assert name_a == run_name(resolve(composed(b)), normalize_overrides(b))
    assert name_a == "lora_smollm2-135m,fnmodel.rank=4,train.max_steps=20"


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "fnmodel.name=rosa_typo", f"output.path={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "unknown fnmodel" in proc.stderr and "lora" in proc.stderr
    assert not any(tmp_path.iterdir())  # no half-written run folder
