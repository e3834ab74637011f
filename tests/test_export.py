"""export.py: a trained run leaves the project as a plain transformers folder (loaded in a
separate process that never imports rosa_bench) or as a PEFT adapter, with the run's logits;
methods and modes that cannot be expressed are refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rosa_bench.errors import UserError
from rosa_bench.evaluate import restore, run_config
from rosa_bench.export import export_run
from rosa_bench.methods.lowrank import LowRankLayer
from rosa_bench.models import load_model
from rosa_bench.pipeline import train
from tests.test_config import composed

ROOT = Path(__file__).resolve().parents[1]
CAUSAL = ["model=tiny-llama", "dataset=e2e"]
# Loads every exported folder with transformers alone and saves its logits; fails if anything
# pulled in rosa_bench.
LOADER = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
jobs = json.loads(sys.argv[1])
out = {}
for name, (folder, ids) in jobs.items():
    causal = AutoConfig.from_pretrained(folder).architectures[0].endswith("ForCausalLM")
    cls = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        out[name] = model(input_ids=torch.tensor(ids)).logits.contiguous()
assert not any(m.startswith("rosa_bench") for m in sys.modules), "rosa_bench was imported"
save_file(out, sys.argv[2])
"""


def trained(tmp_path: Path, *overrides: str) -> Path:
    overrides = ("dataset.max_train_samples=8", "dataset.max_eval_samples=2", "train.batch_size=4",
                 "train.max_steps=2", "train.lr=0.02", "logging.progress=false", *overrides)
    return train(composed([*overrides, f"output.path={tmp_path}"]), list(overrides))


def input_ids(vocab: int, rows: int = 2, length: int = 7) -> list[list[int]]:
    return torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).tolist()


@torch.no_grad()
def run_logits(folder: Path, ids: list[list[int]], merged: bool = False, fused: bool = True,
               **side) -> torch.Tensor:
    """The run's own model on `ids`: adapters separate, as trained (`fused=False`: on the
    unfused low-rank path), or merged as evaluate.py scores it."""
    parts, _ = restore(folder, "best", run_config(folder))
    model = parts.method.merge(parts.model) if merged else parts.model
    for layer in model.modules():
        if isinstance(layer, LowRankLayer):
            layer.fused = fused
    return model(input_ids=torch.tensor(ids), **side).logits


@torch.no_grad()
def base_logits(folder: Path, ids: list[list[int]]) -> torch.Tensor:
    """The untrained base model: an export equal to it would have dropped the update."""
    run = run_config(folder)
    kind = "causal_lm" if run.dataset.name != "glue" else "classification"
    model, _, _ = load_model(run.model, kind, 2)
    return model(input_ids=torch.tensor(ids)).logits


def load_elsewhere(tmp_path: Path, jobs: dict[str, tuple[Path, list]]) -> dict[str, torch.Tensor]:
    """Logits of exported folders, computed in a fresh process outside the repository."""
    out = tmp_path / "logits.safetensors"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    payload = json.dumps({name: (str(folder), ids) for name, (folder, ids) in jobs.items()})
    proc = subprocess.run([sys.executable, "-c", LOADER, payload, str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_file(out)


CAUSAL_METHODS = {
    "full": ["fnmodel=full"],
    "lora": ["fnmodel=lora", "fnmodel.rank=2"],
    "peft_lora": ["fnmodel=peft_lora", "fnmodel.rank=2"],
    "rosa": ["fnmodel=rosa", "fnmodel.rank=2"],
    "loraxs": ["fnmodel=loraxs", "fnmodel.rank=2", "fnmodel.r_init_std=0.1"],
    "rocoft": ["fnmodel=rocoft"],
    "cola": ["fnmodel=cola", "fnmodel.rank=2"],
}


def test_merged_export_loads_in_plain_transformers_with_the_runs_logits(tmp_path):
    """Every mergeable method on a causal model, and LoRA on a classification model: the
    folder loads with AutoModelFor...from_pretrained in a process without rosa_bench and gives
    the run's logits to 1e-5 (fp32), and not the base model's."""
    ids = input_ids(257)
    jobs, expected, base = {}, {}, {}
    for name, extra in CAUSAL_METHODS.items():
        folder = trained(tmp_path / name, *CAUSAL, *extra)
        out = tmp_path / "export" / name
        assert export_run(folder, out) == [out]
        jobs[name], expected[name], base[name] = (out, ids), run_logits(folder, ids), base_logits(folder, ids)
    glue = trained(tmp_path / "glue", "model=tiny-bert", "dataset=glue", "dataset.task=rte", "fnmodel=lora")
    bert_ids = input_ids(1000)
    export_run(glue, tmp_path / "export" / "glue")
    jobs["glue"] = (tmp_path / "export" / "glue", bert_ids)
    expected["glue"], base["glue"] = run_logits(glue, bert_ids), base_logits(glue, bert_ids)

    loaded = load_elsewhere(tmp_path, jobs)
    for name in jobs:
        torch.testing.assert_close(loaded[name], expected[name], atol=1e-5, rtol=0, msg=name)
        assert (loaded[name] - base[name]).abs().max() > 1e-4, f"{name}: the export lost the update"
    folder = tmp_path / "export" / "lora"
    written = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "rosa_bench_export.json"} <= written
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["num_beams"] == 10 and generation["no_repeat_ngram_size"] == 4  # E2E protocol
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))


@pytest.mark.parametrize("overrides", [
    [*CAUSAL, "fnmodel=lora", "fnmodel.rank=2"],
    ["model=tiny-gpt2", "dataset=e2e", "fnmodel=lora", "fnmodel.rank=2"],  # Conv1D: fan_in_fan_out
    [*CAUSAL, "fnmodel=peft_lora", "fnmodel.rank=2", "fnmodel.alpha=4"],
    ["model=tiny-bert", "dataset=glue", "dataset.task=rte", "fnmodel=lora", "fnmodel.train_head=false"],
], ids=["lora-llama", "lora-gpt2", "peft_lora", "lora-bert-frozen-head"])
def test_peft_export_loads_with_peft_to_the_runs_logits(tmp_path, overrides):
    from peft import PeftModel

    folder = trained(tmp_path, *overrides)
    out = tmp_path / "adapter"
    export_run(folder, out, fmt="peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    ids = input_ids(257 if "dataset=e2e" in overrides else 1000)
    run = run_config(folder)
    kind = "classification" if "dataset=glue" in overrides else "causal_lm"
    base, _, _ = load_model(run.model, kind, 2)  # a fresh base model, as a PEFT user loads it
    with torch.no_grad():
        logits = PeftModel.from_pretrained(base, out).eval()(input_ids=torch.tensor(ids)).logits
    unfused = run_logits(folder, ids, fused=False)
    torch.testing.assert_close(logits, unfused, atol=1e-5, rtol=0)
    torch.testing.assert_close(run_logits(folder, ids), unfused, atol=5e-4, rtol=0)
    assert (logits - base_logits(folder, ids)).abs().max() > 1e-4


def test_cola_alone_exports_one_merged_folder_per_user(tmp_path):
    overrides = ["model=tiny-llama", "dataset=dolly", "dataset.max_length=256", "fnmodel=cola",
                 "fnmodel.users=8", "fnmodel.collab=alone", "fnmodel.adapter='lowrank~linear'"]
    folder = trained(tmp_path, *overrides)
    out = tmp_path / "users"
    written = export_run(folder, out)
    assert written == [out / f"user_{k}" for k in range(8)]
    ids = input_ids(257)
    loaded = load_elsewhere(tmp_path, {str(k): (path, ids) for k, path in enumerate(written)})
    base = base_logits(folder, ids)
    moved = 0
    for k in range(8):
        expected = run_logits(folder, ids, user=torch.full((2,), k))
        torch.testing.assert_close(loaded[str(k)], expected, atol=1e-5, rtol=0, msg=f"user {k}")
        moved += bool((loaded[str(k)] - base).abs().max() > 1e-4)
    assert moved >= 2  # users trained on their own rows differ from the base (and each other)
    assert json.loads((written[3] / "rosa_bench_export.json").read_text())["user"] == 3


@pytest.mark.parametrize("overrides,fmt,message", [
    ([*CAUSAL, "fnmodel=rosa", "fnmodel.rank=2"], "peft",
     "--format peft: a rosa run is not a PEFT LoRA adapter (only lora, peft_lora); use --format merged"),
    ([*CAUSAL, "fnmodel=cola", "fnmodel.adapter=mlp"], "merged", "nonlinear (mlp) adapter"),
    ([*CAUSAL, "fnmodel=lora", "fnmodel.rank=2"], "gguf",
     "unknown --format 'gguf'; choose one of: merged, peft"),
])
def test_what_cannot_be_exported_is_refused_with_one_line(tmp_path, overrides, fmt, message, capsys):
    import export as cli

    folder = trained(tmp_path, *overrides)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--run", str(folder), "--out", str(tmp_path / "out"), "--format", fmt])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_export_refuses_a_non_empty_folder_and_a_missing_checkpoint(tmp_path):
    folder = trained(tmp_path, *CAUSAL, "fnmodel=lora", "fnmodel.rank=2")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(UserError, match="exists and is not empty"):
        export_run(folder, tmp_path / "taken")
    with pytest.raises(UserError, match="unknown checkpoint 'final'"):
        export_run(folder, tmp_path / "new", checkpoint="final")


@pytest.mark.slow
def test_smollm2_exports_as_plain_safetensors_and_as_a_peft_adapter(tmp_path):
    """The GGUF-converted SmolLM2-135M: merged loads with transformers alone to the merged run's
    logits (merging itself moves them ~5e-5 at this size), the adapter with PEFT on the
    converted base to the unmerged run's, both to 1e-5. PEFT computes (x A^T) B^T as our
    unfused path does; the fused path forms A x^T (another BLAS kernel, another rounding), which
    through 30 layers moves the logits by ~2e-4, fp32 reordering like merging's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = trained(tmp_path, "dataset=e2e", "fnmodel=lora", "train.max_steps=1", "train.batch_size=2",
                     "train.lr=1e-3")
    export_run(folder, tmp_path / "merged")
    export_run(folder, tmp_path / "adapter", fmt="peft")
    ids = input_ids(49152, length=12)
    loaded = load_elsewhere(tmp_path, {"merged": (tmp_path / "merged", ids)})
    torch.testing.assert_close(loaded["merged"], run_logits(folder, ids, merged=True), atol=1e-5, rtol=0)
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        logits = peft_model(input_ids=torch.tensor(ids)).logits
    unfused = run_logits(folder, ids, fused=False)
    torch.testing.assert_close(logits, unfused, atol=1e-5, rtol=0)
    torch.testing.assert_close(run_logits(folder, ids), unfused, atol=5e-4, rtol=0)
