"""The step-time floor really is the bound it is reported as: the backbone is frozen, yet the
gradient reaches every target layer's output, the first layer's included, exactly as far as it
must for an adapter there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.step_time import Bench, apply_floor, load_bench_model, run_isolated
from tests.test_methods import inputs, tiny

ROOT = Path(__file__).resolve().parents[1]


def test_floor_sends_gradients_to_every_target_output_and_trains_only_the_head():
    model = tiny("bert")
    params = apply_floor(model, ["query", "value"])
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output
        return hook

    for name, module in model.named_modules():
        if name.endswith(("query", "value")):
            module.register_forward_hook(keep(name))
    model(**inputs(), labels=torch.tensor([0, 1, 2])).loss.backward()
    assert sorted(outputs) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1)
                               for p in ("query", "value")]
    assert all(out.grad is not None and out.grad.abs().sum() > 0 for out in outputs.values())
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"classifier.weight", "classifier.bias"} == {n for n, p in model.named_parameters()
                                                                      if any(p is q for q in params)}


def test_a_failing_or_dying_child_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="ValueError: invalid literal"):
        run_isolated(int, "x")
    with pytest.raises(RuntimeError, match="exit code 3"):
        run_isolated(os._exit, 3)


def test_architectures_build_the_configs_model_with_random_weights(tmp_path):
    """The device machine gets config files, not weights: the model built from one has the
    offline model's class and every parameter's shape."""
    reference = tiny("llama")
    reference.config.save_pretrained(tmp_path / "tiny-llama")
    model, family = load_bench_model("tiny-llama", "causal_lm", str(tmp_path), "cpu")
    assert family == "llama" and type(model) is type(reference) and not model.training
    shapes = {n: p.shape for n, p in reference.named_parameters()}
    assert {n: p.shape for n, p in model.named_parameters()} == shapes


def test_device_check_quick_mode_runs_on_cpu_and_writes_every_methods_json(tmp_path):
    """benchmarks/device_check.sh as the device runs it, with tiny stand-in models on this CPU."""
    env = os.environ | {"DEVICE_CHECK_QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def rows(name: str) -> list[dict]:
        return json.loads((tmp_path / name).read_text())["rows"]

    methods = ["full", "floor", "lora", "peft_lora", "rosa", "loraxs", "rocoft:mode=row",
               "rocoft:mode=column", "cola:adapter=lowrank:adapter_device=cpu",
               "cola:adapter=linear:adapter_device=cpu"]
    decoder, encoder = rows("step_time_smollm2-135m.json"), rows("step_time_minilm-l6.json")
    assert [r["label"] for r in decoder] == [m + gc for m in methods for gc in ("", "+gc")]
    assert [r["label"] for r in encoder] == methods
    assert all(r["precision"] == "bf16" and r["median_step_s"] > 0 and r["peak_mem_mb"] > 0
               for r in decoder + encoder)
    assert all("train_mem_vs_no_gc" in r for r in decoder if r["gradient_checkpointing"])
    mergeable = ["lora", "peft_lora", "rosa", "loraxs", "rocoft:mode=row", "rocoft:mode=column",
                 "cola:adapter=lowrank"]
    latency = rows("merged_latency.json")
    assert [(r["model"], r["label"]) for r in latency] == [(m, x) for m in ("tiny-llama", "tiny-bert")
                                                           for x in mergeable]
    assert all(r["max_output_gap"] < 1e-2 for r in latency)
    cola = rows("cola_adapter_device.json")
    assert [(r["model"], r["adapter_params_device"]) for r in cola] == [
        (m, "cpu") for m in ("tiny-llama", "tiny-llama", "tiny-bert", "tiny-bert")]
    assert (tmp_path / "device_check.log").is_file()


@pytest.mark.parametrize("method", ["lora", "rosa", "loraxs"])
def test_low_rank_methods_save_for_backward_exactly_what_their_factor_gradients_need(method):
    """Over the floor, LoRA and ROSA keep the adapted layers' inputs (query and value share
    theirs: one per block) and each layer's (rank, tokens) intermediate; LoRA-XS, whose first
    factor is frozen, only the intermediates. Nothing else: no (tokens, out) update, no copy."""
    targets = {"rank": 2, "targets": ["query", "value"]}
    floor, adapted = (Bench("tiny-bert", name, targets) for name in ("floor", method))
    tokens, hidden = floor.ids.numel(), floor.model.config.hidden_size
    layers = floor.model.config.num_hidden_layers
    inputs_kept = 0 if method == "loraxs" else layers * tokens * hidden
    intermediates = 2 * layers * 2 * tokens  # two adapted layers per block, rank 2
    extra = (adapted.saved_activation_mb() - floor.saved_activation_mb()) * 2**20
    assert extra == 4 * (inputs_kept + intermediates)


def test_layer_benchmark_times_every_variant_of_a_small_layer():
    from benchmarks.lowrank_layer import measure

    row = measure(16, 24, 32, 2, rounds=2, warmup=1)
    assert all(row[f"{name}_ms"] > 0 for name in ("floor", "lora", "thin_lora", "loraxs", "thin_loraxs"))
    for method in ("lora", "loraxs"):
        assert row[f"{method}_vs_floor"] == row[f"{method}_ms"] / row["floor_ms"]
        bound = (row["floor_ms"] + row[f"thin_{method}_ms"]) / row["floor_ms"]
        assert row[f"{method}_bound_vs_floor"] == bound


def test_generation_benchmark_times_every_variant_and_batch_size(tmp_path):
    from benchmarks import generate as bench

    out = tmp_path / "generate.json"
    bench.main(["--model", "tiny-llama", "--prompts", "4", "--repeats", "1", "--max-new-tokens", "2",
                "--num-beams", "2", "--batch-sizes", "2,4", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["sequences_per_s"]) == {"base", "lora_unmerged", "lora_merged", "base_batch4"}
    assert all(rate > 0 for rate in result["sequences_per_s"].values())
    assert result["batch_size"] == 2 and result["num_beams"] == 2
