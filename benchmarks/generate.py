"""Generation throughput (sequences/s) of the base model, LoRA unmerged and LoRA merged, with
the batched left-padded decoder evaluate.py uses. Merged LoRA is a plain model again, so it
should run within 2% of the base model; unmerged pays for the adapter matmuls.

    python benchmarks/generate.py [--model smollm2-135m] [--prompts 32] [--repeats 3]

Prints a table and saves benchmarks/results/generate.json."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from rosa_bench.config import GenerationConfig, MethodConfig, ModelConfig
from rosa_bench.generation import generate
from rosa_bench.methods import build_method
from rosa_bench.models import load_model, resolve_model_config

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"
PROMPT = "name[The Eagle], eatType[coffee shop], food[{food}], priceRange[moderate], area[riverside]\n"
FOODS = ["French", "Italian", "Chinese", "Indian", "English", "Japanese", "Fast food", "Thai"]


def timed(models: dict, tokenizer, prompts, settings, repeats: int) -> dict[str, float]:
    """Median sequences/s of each model; the models take turns in every repeat, so drifting
    machine load hits them alike, and every sequence is exactly max_new_tokens long."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        generate(model, tokenizer, prompts[:settings.batch_size], settings, progress=False)
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            generate(model, tokenizer, prompts, settings, progress=False)
            times[name].append(time.perf_counter() - start)
    return {name: len(prompts) / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-beams", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = resolve_model_config(ModelConfig(name="auto"), args.model)  # the conf/model option
    base, tokenizer, family = load_model(cfg, "causal_lm")
    settings = GenerationConfig(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                min_new_tokens=args.max_new_tokens, stop_at_blank_line=False, batch_size=8)
    prompts = [PROMPT.format(food=FOODS[i % len(FOODS)]) for i in range(args.prompts)]
    method = build_method(MethodConfig(name="lora", rank=8))
    unmerged = method.apply(copy.deepcopy(base), family)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for p in unmerged.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    merged = method.merge(copy.deepcopy(unmerged))
    rows = timed({"base": base, "lora_unmerged": unmerged, "lora_merged": merged}, tokenizer, prompts,
                 settings, args.repeats)
    result = {"model": args.model, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "num_beams": args.num_beams, "batch_size": settings.batch_size, "device": "cpu",
              "threads": torch.get_num_threads(), "sequences_per_s": rows,
              "ratio_to_base": {name: value / rows["base"] for name, value in rows.items()}}
    print(f"{'variant':<15} {'seq/s':>8} {'vs base':>8}")
    for name, value in rows.items():
        print(f"{name:<15} {value:8.2f} {value / rows['base']:8.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
