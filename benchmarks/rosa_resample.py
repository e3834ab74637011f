"""What ROSA's resampling costs against an epoch of training (the 5% budget).

    python benchmarks/rosa_resample.py                   # minilm-l6 (SST-2), smollm2-135m (E2E), rank 8
    python benchmarks/rosa_resample.py --models minilm-l6 --rank 16

For each model, ROSA wraps the paper's default targets; one resample (merge every layer, SVD,
re-split) is timed `--reps` times, and training steps are timed by step_time.py's measure (in
a child process) at the dataset's batch shape. An epoch is the official train split's size over
the batch size, times the median step. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.merged_latency import load  # noqa: E402
from benchmarks.step_time import SHAPES, interleaved_times, run_isolated, save_json  # noqa: E402

# model -> (dataset, train rows of the official release): SST-2 train.tsv, E2E trainset.csv
EPOCH_ROWS = {"minilm-l6": ("glue/sst2", 67_349), "smollm2-135m": ("e2e_nlg", 42_061)}


def resample_seconds(model_name: str, rank: int, reps: int) -> tuple[list[float], int]:
    """Seconds of each of `reps` resamples of every ROSA layer, and the number of layers."""
    from rosa_bench.methods import build_method
    from rosa_bench.methods.rosa import RosaConfig

    model, family = load(model_name)
    method = build_method(RosaConfig(rank=rank))
    model = method.apply(model, family)
    times = []
    for count in range(1, reps + 1):
        start = time.perf_counter()
        method.resample(model, count)
        times.append(time.perf_counter() - start)
    return times, len(method.adapter_layers(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(EPOCH_ROWS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rosa_resample.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model_name in args.models.split(","):
        print(f"measuring {model_name} ...", flush=True)
        times, layers = resample_seconds(model_name, args.rank, args.reps)
        [steps] = run_isolated(interleaved_times, model_name, [("rosa", {"rank": args.rank})], args.steps,
                               args.warmup, args.threads)
        step_s, (batch, seq_len, _) = statistics.median(steps), SHAPES[model_name]
        dataset, train_rows = EPOCH_ROWS[model_name]
        steps_per_epoch = math.ceil(train_rows / batch)
        epoch_s = steps_per_epoch * step_s
        resample_s = statistics.median(times)
        rows.append({"model": model_name, "dataset": dataset, "rank": args.rank, "rosa_layers": layers,
                     "resample_s": resample_s, "resample_max_s": max(times),
                     "median_step_s": step_s, "batch": batch, "seq_len": seq_len,
                     "steps_per_epoch": steps_per_epoch, "epoch_s": epoch_s,
                     "resample_vs_epoch": resample_s / epoch_s, "resample_vs_step": resample_s / step_s})
    cols = ["model", "dataset", "rosa_layers", "resample_s", "median_step_s", "steps_per_epoch", "epoch_s",
            "resample_vs_epoch", "resample_vs_step"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    save_json(Path(args.out), rows, reps=args.reps, steps=args.steps, threads=args.threads)


if __name__ == "__main__":
    main()
