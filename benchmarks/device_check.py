"""The GPU check in one process (benchmarks/device_check.sh prepares the machine and runs it).

    python benchmarks/device_check.py --out DIR                       # what device_check.sh runs
    DEVICE_CHECK_QUICK=1 python benchmarks/device_check.py --out DIR  # tiny stand-ins, seconds
    python benchmarks/device_check.py --write-architectures DIR       # config.json of each model

On the device (CUDA, bf16 autocast): step time and memory of every method on smollm2-135m
(batch 8 x 512, each method also with gradient checkpointing) and minilm-l6 (batch 32 x 128,
GLUE's length here); merged-model latency; ColA with its adapters on the CPU (and on the GPU, for
comparison): the adapters' devices, their state on the GPU, and peak CUDA memory against LoRA's.
Everything runs in this one process: the CUDA allocator's figures are exact per method there, and
one start costs the least device time. On a CPU (no GPU) the same code runs; its memory figures
are then resident-memory peaks of one process, which never fall, so only the plumbing is checked.

Writes step_time_<model>.json (step_time.py's format, so the README's tables read it),
merged_latency.json and cola_adapter_device.json to --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import merged_latency, step_time  # noqa: E402

QUICK = os.environ.get("DEVICE_CHECK_QUICK") == "1"
# model -> (its quick-mode stand-in, batch, seq_len, gradient checkpointing rows)
MODELS = {"smollm2-135m": ("tiny-llama", 8, 512, "both"), "minilm-l6": ("tiny-bert", 32, 128, "off")}
TRAIN_METHODS = "full,floor,lora,peft_lora,rosa,loraxs,rocoft:mode=row,rocoft:mode=column"
COLA_KINDS = ("lowrank", "linear")


def cola_methods(cuda: bool) -> str:
    """ColA with its adapters on the CPU, and, where there is a GPU, on it too for comparison."""
    devices = ("cpu", "cuda") if cuda else ("cpu",)
    return ",".join(f"cola:adapter={kind}:adapter_device={d}" for d in devices for kind in COLA_KINDS)


def environment() -> dict:
    cuda = torch.cuda.is_available()
    import transformers

    return {"machine": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "quick": QUICK,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "architectures": os.environ.get("DEVICE_CHECK_ARCHITECTURES")}


def cola_summary(rows: list[dict]) -> list[dict]:
    """Per model and ColA kind with adapters on the CPU: where its adapters and their state are,
    and its peak CUDA memory against LoRA's (and against the same ColA with adapters on the GPU)."""
    out = []
    plain = [r for r in rows if not r["gradient_checkpointing"]]
    for row in plain:
        if row["method"] != "cola" or row["options"].get("adapter_device") != "cpu":
            continue
        same = {r["label"]: r for r in plain if r["model"] == row["model"]}
        lora, on_device = same["lora"], row["adapter_state_on_device_mb"]
        on_gpu = same.get(row["label"].replace("adapter_device=cpu", "adapter_device=cuda"), {})
        out.append({"model": row["model"], "label": row["label"], "device": row["device"],
                    "adapter_params_device": row["adapter_device"],
                    "adapter_state_mb": row["adapter_state_mb"],
                    "adapter_state_on_device_mb": on_device,
                    "no_adapter_state_on_gpu": row["device"] == "cuda" and on_device == 0,
                    "peak_mem_mb": row["peak_mem_mb"], "train_mem_mb": row["train_mem_mb"],
                    "lora_peak_mem_mb": lora["peak_mem_mb"], "lora_train_mem_mb": lora["train_mem_mb"],
                    "peak_mem_vs_lora": row["peak_mem_mb"] / lora["peak_mem_mb"],
                    "adapters_on_gpu_peak_mem_mb": on_gpu.get("peak_mem_mb"),
                    "median_step_s": row["median_step_s"], "lora_median_step_s": lora["median_step_s"]})
    return out


def run(out: Path) -> None:
    cuda = torch.cuda.is_available()
    architectures = None if QUICK else os.environ.get("DEVICE_CHECK_ARCHITECTURES")
    setting = step_time.Setting(device="auto", precision="bf16", architectures=architectures)
    # ColA with CPU adapters dominates the time (its linear adapters: seconds a step on the CPU at
    # 8 x 512 tokens), so the GPU run keeps to 8 timed steps
    steps, warmup, memory_steps, reps = (1, 0, 1, 1) if QUICK else (8, 2, 2, 20)
    env = environment()
    print(f"device check: {env}", flush=True)
    latency = []
    for name, (stand_in, batch, seq, gc) in MODELS.items():
        start = time.perf_counter()
        model_name, batch, seq = (stand_in, 2, 16) if QUICK else (name, batch, seq)
        model_setting = step_time.Setting(**asdict(setting) | {"batch": batch, "seq_len": seq})
        methods = step_time.with_checkpointing(
            step_time.parse_methods(f"{TRAIN_METHODS},{cola_methods(cuda)}", rank=8, targets=["same"]), gc)
        rows = step_time.measure_model(model_name, methods, steps, warmup, memory_steps, os.cpu_count() or 1,
                                       model_setting, isolated=False)
        step_time.add_ratios(rows)
        print(step_time.table(rows), flush=True)
        step_time.save_json(out / f"step_time_{name}.json", rows, steps=steps, warmup=warmup,
                            memory_steps=memory_steps, setting=asdict(model_setting), environment=env,
                            seconds=time.perf_counter() - start)
        cola = out / "cola_adapter_device.json"
        step_time.save_json(cola, [*previous_rows(cola), *cola_summary(rows)], environment=env)
        merge_methods = step_time.parse_methods(merged_latency.DEFAULT_METHODS, rank=8, targets=["same"])
        latency += merged_latency.latency_rows(model_name, merge_methods, reps, setting,
                                               (2, 16) if QUICK else None)
        step_time.save_json(out / "merged_latency.json", latency, reps=reps, setting=asdict(setting),
                            environment=env)
    print(merged_latency.table(latency), flush=True)


def previous_rows(path: Path) -> list[dict]:
    """Rows an earlier model of this run wrote (each model's results are saved as soon as they
    exist, so a run cut short by its time limit still leaves them)."""
    import json

    return json.loads(path.read_text())["rows"] if path.is_file() else []


def write_architectures(folder: Path) -> None:
    """Each model's config.json, for building it with random weights where the weight packages
    cannot travel (they are larger than what a device call carries)."""
    from rosa_bench.config import ModelConfig
    from rosa_bench.models import converted_gguf, package_dir, resolve_model_config

    for name in MODELS:
        cfg = resolve_model_config(ModelConfig(), name)
        source = converted_gguf(cfg) if cfg.source == "gguf_package" else package_dir(cfg) / (cfg.file or "")
        (folder / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(source / "config.json", folder / name / "config.json")
        print(f"wrote {folder / name / 'config.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "device")
    parser.add_argument("--write-architectures", type=Path, metavar="DIR")
    args = parser.parse_args()
    if args.write_architectures:
        write_architectures(args.write_architectures)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("cola_adapter_device.json", "merged_latency.json"):
        (args.out / stale).unlink(missing_ok=True)
    run(args.out)


if __name__ == "__main__":
    main()
