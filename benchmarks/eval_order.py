"""Time of one validation pass with the split in its own order against batches of similar
length (`length_sorted_loader`, what the trainer uses), with the reproduction's models, dev sets,
eval batch sizes and LoRA (rank 8) at its initialisation: the padding saved, and proof that
the scores do not move.

    python benchmarks/eval_order.py                          # the five GLUE dev sets and E2E
    python benchmarks/eval_order.py --tasks sst2,rte --repeats 1

The two orders alternate `--repeats` times on the same model in one process (the best time of
each counts), so the machine's drift hits both alike. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("sst2", "cola", "mrpc", "rte", "stsb", "e2e")


def measure(task: str, repeats: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from benchmarks.reproduce import PRESETS, make_job, run_config
    from rosa_bench.pipeline import build
    from rosa_bench.train.evaluation import evaluate_split, length_sorted_loader

    preset = PRESETS["cpu"]
    lora = next(m for m in preset.glue_methods if m.key == "lora")
    job = make_job(preset, ROOT / "unused", "glue" if task != "e2e" else "e2e", task, lora, 1e-3, 0)
    run = run_config(job.overrides)
    parts = build(run)
    rows = parts.task.splits[parts.task.validation_splits[0]]
    batch = run.train.eval_batch_size or run.train.batch_size
    loaders = {"in_order": DataLoader(rows, batch_size=batch, collate_fn=parts.task.collate),
               "sorted": length_sorted_loader(rows, batch, parts.task.collate)}
    seconds = {name: float("inf") for name in loaders}
    scores = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, loader in loaders.items():
                start = time.perf_counter()
                scores[name] = evaluate_split(parts.model, parts.task, loader, torch.device("cpu"))
                seconds[name] = min(seconds[name], time.perf_counter() - start)
    tokens = {name: sum(b["input_ids"].numel() for b in loader) for name, loader in loaders.items()}
    real = sum(len(ids) for ids in rows["input_ids"])
    return {"task": task, "model": run.model.name, "rows": len(rows), "batch": batch,
            "s_in_order": seconds["in_order"], "s_sorted": seconds["sorted"],
            "speedup": seconds["in_order"] / seconds["sorted"],
            "padded_tokens_in_order": tokens["in_order"], "padded_tokens_sorted": tokens["sorted"],
            "real_tokens": real,
            "max_abs_score_change": max(abs(scores["sorted"][k] - v) for k, v in scores["in_order"].items()),
            "scores": scores["sorted"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of: {', '.join(TASKS)}")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_order.json")
    args = parser.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; choose from: {', '.join(TASKS)}")
    import torch

    rows = [measure(task, args.repeats) for task in tasks]
    print(f"{'task':6} {'model':13} {'rows':>5} {'batch':>5} {'in order s':>10} {'sorted s':>9} "
          f"{'speedup':>7} {'padding in order':>16} {'sorted':>7} {'max |Δscore|':>12}")
    for r in rows:
        print(f"{r['task']:6} {r['model']:13} {r['rows']:5d} {r['batch']:5d} {r['s_in_order']:10.2f} "
              f"{r['s_sorted']:9.2f} {r['speedup']:7.2f} "
              f"{r['padded_tokens_in_order'] / r['real_tokens'] - 1:16.0%} "
              f"{r['padded_tokens_sorted'] / r['real_tokens'] - 1:7.0%} {r['max_abs_score_change']:12.1e}")
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "repeats": args.repeats}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
