"""Inference latency after merging: the base model vs apply + merge, for every mergeable method.

    python benchmarks/merged_latency.py                        # minilm-l6 and smollm2-135m
    python benchmarks/merged_latency.py --models minilm-l6 --methods lora,rocoft:mode=row --reps 30

A merged model should be the base architecture with other weights, so its forward time must
match the base model's. Each method's update is first given random values (so merging really
changes weights) and the merged outputs are checked against the wrapped model's. Base and
merged forwards alternate, and medians are compared, so drifting machine load hits both alike.
Ratios are given on medians and on minima (the least disturbed run, the steadier
figure on a shared machine). The unmerged wrapped model is timed too, to show what merging
saves. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_time import SHAPES, label, parse_methods, resolve_targets, save_json  # noqa: E402

DEFAULT_METHODS = "lora,peft_lora,rosa,loraxs,rocoft:mode=row,rocoft:mode=column,cola:adapter=lowrank"
# model -> (batch, seq_len) of one inference call
INFERENCE_SHAPES = {"minilm-l6": (8, 64), "smollm2-135m": (1, 128)}


def forward_s(model: torch.nn.Module, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch)
    return time.perf_counter() - start


def load(model_name: str) -> tuple[torch.nn.Module, str]:
    from rosa_bench.config import ModelConfig
    from rosa_bench.models import load_model, resolve_model_config

    kind = SHAPES[model_name][2]
    model, _, family = load_model(resolve_model_config(ModelConfig(), model_name), kind,
                                  num_labels=2 if kind == "classification" else None)
    return model.eval(), family


@torch.no_grad()
def measure(base: torch.nn.Module, family: str, method: str, options: dict, batch: dict, reps: int) -> dict:
    """Median forward seconds of base, wrapped and merged models, interleaved."""
    import rosa_bench
    from rosa_bench.methods import attached_method

    options = resolve_targets(options, family)
    wrapped = rosa_bench.apply(copy.deepcopy(base), method, **options).eval()
    for p in attached_method(wrapped).optimizer_parameters(wrapped):  # ColA's live outside the model
        p.normal_(std=1e-3)
    merged = rosa_bench.merge(copy.deepcopy(wrapped))
    gap = float((merged(**batch).logits - wrapped(**batch).logits).abs().max())
    times: dict[str, list[float]] = {"base": [], "wrapped": [], "merged": []}
    for _ in range(2):  # warm-up
        for model in (base, wrapped, merged):
            model(**batch)
    for _ in range(reps):
        for name, model in (("base", base), ("merged", merged), ("wrapped", wrapped)):
            times[name].append(forward_s(model, batch))
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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "merged_latency.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for model_name in args.models.split(","):
        base, family = load(model_name)
        batch_size, seq = INFERENCE_SHAPES[model_name]
        ids = torch.randint(100, 1000, (batch_size, seq))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        for method, options in parse_methods(args.methods, args.rank, args.targets):
            print(f"measuring {model_name} / {method} {options} ...", flush=True)
            rows.append({"model": model_name, "batch": batch_size, "seq_len": seq,
                         **measure(base, family, method, options, batch, args.reps)})
    print(table(rows))
    save_json(Path(args.out), rows, threads=args.threads, reps=args.reps)


if __name__ == "__main__":
    main()
