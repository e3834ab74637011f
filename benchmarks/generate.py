"""Generation throughput (sequences/s) of the base model, LoRA unmerged and LoRA merged, with
the batched left-padded decoder evaluate.py uses. Merged LoRA is a plain model again, so it
should run within 2% of the base model; unmerged pays for the adapter matmuls.

    python benchmarks/generate.py [--model smollm2-135m] [--prompts 32] [--repeats 3]
    python benchmarks/generate.py --num-beams 10 --batch-sizes 8,24,48 \
        --out benchmarks/results/generate_batch.json

`--batch-sizes` adds the base model at further decoding batch sizes (the first is everyone's):
whether bigger batches buy throughput or the decoder is already compute-bound.
Prints a table and saves benchmarks/results/generate.json (or `--out`)."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from rosa_bench.config import GenerationConfig, ModelConfig
from rosa_bench.generation import generate
from rosa_bench.methods import build_method, method_class
from rosa_bench.models import load_model, resolve_model_config

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"
PROMPT = "name[The Eagle], eatType[coffee shop], food[{food}], priceRange[moderate], area[riverside]\n"
FOODS = ["French", "Italian", "Chinese", "Indian", "English", "Japanese", "Fast food", "Thai"]


def timed(variants: dict, tokenizer, prompts, repeats: int) -> dict[str, float]:
    """Median sequences/s of each (model, settings) variant; the variants take turns in every
    repeat, so drifting machine load hits them alike, and every sequence is exactly
    max_new_tokens long."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for model, settings in variants.values():  # warm-up
        generate(model, tokenizer, prompts[:settings.batch_size], settings, progress=False)
    for _ in range(repeats):
        for name, (model, settings) in variants.items():
            start = time.perf_counter()
            generate(model, tokenizer, prompts, settings, progress=False)
            times[name].append(time.perf_counter() - start)
    return {name: len(prompts) / statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--batch-sizes", default="8", help="comma-separated decoding batch sizes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(name="auto"), args.model)  # the conf/model option
    base, tokenizer, family = load_model(cfg, "causal_lm")
    settings = GenerationConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.max_new_tokens, stop_at_blank_line=False,
                                batch_size=batch_sizes[0])
    prompts = [PROMPT.format(food=FOODS[i % len(FOODS)]) for i in range(args.prompts)]
    method = build_method(method_class("lora").config_class(name="lora", rank=8))
    unmerged = method.apply(copy.deepcopy(base), family)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for p in unmerged.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    merged = method.merge(copy.deepcopy(unmerged))
    variants = {name: (model, settings)
                for name, model in (("base", base), ("lora_unmerged", unmerged), ("lora_merged", merged))}
    variants |= {f"base_batch{b}": (base, dataclasses.replace(settings, batch_size=b))
                 for b in batch_sizes[1:]}
    rows = timed(variants, tokenizer, prompts, args.repeats)
    result = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "num_beams": args.num_beams, "batch_size": settings.batch_size, "device": "cpu",
              "threads": torch.get_num_threads(), "sequences_per_s": rows,
              "ratio_to_base": {name: value / rows["base"] for name, value in rows.items()}}
    print(f"{'variant':<15} {'seq/s':>8} {'vs base':>8}")
    for name, value in rows.items():
        print(f"{name:<15} {value:8.2f} {value / rows['base']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
