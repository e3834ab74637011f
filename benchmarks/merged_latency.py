"""Inference latency after merging: the base model vs apply + merge, for every mergeable method.

    python benchmarks/merged_latency.py                        # minilm-l6 and smollm2-135m
    python benchmarks/merged_latency.py --models minilm-l6 --methods lora,rocoft:mode=row --reps 30

A merged model should be the base architecture with other weights, so its forward time must
match the base model's. Each method's update is first given random values (so merging really
changes weights) and the merged outputs are checked against the wrapped model's. Base and
merged forwards alternate, and medians are compared, so drifting machine load hits both alike.
Ratios are given on medians and on minima (the least disturbed run, the steadier
figure on a shared machine). The unmerged wrapped model is timed too, to show what merging
saves. `--device cuda --precision bf16` times on a GPU (bf16 autocast); `--architectures DIR`
builds the models from config files with random weights (step_time.py's options). Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_time import (  # noqa: E402
    DEFAULT_SETTING,
    Setting,
    add_setting_arguments,
    label,
    load_bench_model,
    parse_methods,
    resolve_targets,
    save_json,
)

DEFAULT_METHODS = "lora,peft_lora,rosa,loraxs,rocoft:mode=row,rocoft:mode=column,cola:adapter=lowrank"
# model -> (batch, seq_len) of one inference call
INFERENCE_SHAPES = {"minilm-l6": (8, 64), "smollm2-135m": (1, 128)}


def forward_s(model: torch.nn.Module, batch: dict, setting: Setting = DEFAULT_SETTING) -> float:
    cuda = setting.torch_device().type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with setting.autocast():
        model(**batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def load(model_name: str, setting: Setting = DEFAULT_SETTING) -> tuple[torch.nn.Module, str]:
    """(model, family) of the benchmarked model, on the setting's device."""
    kind = setting.shape(model_name)[2]
    return load_bench_model(model_name, kind, setting.architectures, setting.torch_device())


@torch.no_grad()
def measure(base: torch.nn.Module, family: str, method: str, options: dict, batch: dict, reps: int,
            setting: Setting = DEFAULT_SETTING) -> dict:
    """Median forward seconds of base, wrapped and merged models, interleaved."""
    import rosa_bench
    from rosa_bench.methods import attached_method

    options = resolve_targets(options, family)
    wrapped = rosa_bench.apply(copy.deepcopy(base), method, **options).eval()
    for p in attached_method(wrapped).optimizer_parameters(wrapped):  # ColA's live outside the model
        p.normal_(std=1e-3)
    merged = rosa_bench.merge(copy.deepcopy(wrapped))
    with setting.autocast():
        gap = float((merged(**batch).logits - wrapped(**batch).logits).abs().max())
    times: dict[str, list[float]] = {"base": [], "wrapped": [], "merged": []}
    for _ in range(2):  # warm-up
        for model in (base, wrapped, merged):
            forward_s(model, batch, setting)
    for _ in range(reps):
        for name, model in (("base", base), ("merged", merged), ("wrapped", wrapped)):
            times[name].append(forward_s(model, batch, setting))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}  # the least disturbed run: robust on a shared machine
    return {"method": method, "label": label(method, options), "options": options,
            **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            "merged_vs_base": med["merged"] / med["base"], "wrapped_vs_base": med["wrapped"] / med["base"],
            "merged_vs_base_min": best["merged"] / best["base"],
            "wrapped_vs_base_min": best["wrapped"] / best["base"], "max_output_gap": gap}


def table(rows: list[dict]) -> str:
    cols = ["model", "label", "base_ms", "merged_ms", "merged_vs_base", "merged_vs_base_min", "wrapped_ms",
            "wrapped_vs_base", "wrapped_vs_base_min", "max_output_gap"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if c == "max_output_gap" else f"{r[c]:.3f}" if isinstance(r[c], float)
                 else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(INFERENCE_SHAPES))
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma list; options as name:key=value")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["same"],
                        help="'same' (LoRA's query/value for every method), 'default', or patterns")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    add_setting_arguments(parser)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merged_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setting = Setting(args.device, args.precision, architectures=args.architectures)
    methods = parse_methods(args.methods, args.rank, args.targets)
    rows = [row for model_name in args.models.split(",")
            for row in latency_rows(model_name, methods, args.reps, setting)]
    print(table(rows))
    save_json(Path(args.out), rows, threads=args.threads, reps=args.reps, setting=asdict(setting))


def latency_rows(model_name: str, methods: list[tuple[str, dict]], reps: int, setting: Setting,
                 shape: tuple[int, int] | None = None) -> list[dict]:
    """One row per method on one model (batch x seq_len: `shape`, else INFERENCE_SHAPES')."""
    torch.manual_seed(0)
    base, family = load(model_name, setting)
    batch_size, seq = shape or INFERENCE_SHAPES[model_name]
    high = min(1000, base.config.vocab_size)  # tiny test models have small vocabularies
    ids = torch.randint(min(100, high // 2), high, (batch_size, seq), device=setting.torch_device())
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    rows = []
    for method, options in methods:
        print(f"measuring {model_name} / {method} {options} ...", flush=True)
        rows.append({"model": model_name, "batch": batch_size, "seq_len": seq, "precision": setting.precision,
                     "device": setting.torch_device().type,
                     **measure(base, family, method, options, batch, reps, setting)})
    return rows


if __name__ == "__main__":
    main()
