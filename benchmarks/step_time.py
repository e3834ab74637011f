"""Training-step time and memory of each method, measured in one run so ratios are fair.

    python benchmarks/step_time.py                      # minilm-l6 32x64, smollm2-135m 8x128
    python benchmarks/step_time.py --models minilm-l6 --methods full,lora --steps 5
    python benchmarks/step_time.py --methods lora,rocoft:mode=row --targets default

Every method adapts the same layers (`--targets same`: LoRA's query/value choice) unless
`--targets default` (each method's paper default) or a list of patterns is given.
`floor` is not a method but the bound under all of them: the backbone frozen, gradients
still flowing back to the targets (LoRA's targets under `--targets default`), no adapter
work; no method on those targets can take a shorter step.

Each (model, method) runs in a fresh child process, so its peak memory is its own: on CUDA
the allocator's peak, on CPU the child's peak resident memory (and the part added by
training, over the loaded model). `adapter_state_mb` is what the trained tensors, their gradients
and AdamW moments take, on `adapter_device` (ColA keeps them off the backbone's device:
`--methods lora,cola:adapter=lowrank,cola:adapter=linear`). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# model -> (batch, seq_len, task kind): the shapes named in the foundation issue
SHAPES = {"minilm-l6": (32, 64, "classification"), "smollm2-135m": (8, 128, "causal_lm")}
DEFAULT_METHODS = ("full,floor,lora,peft_lora,rosa,loraxs,rocoft:mode=row,rocoft:mode=column,"
                   "cola:adapter=lowrank,cola:adapter=linear")
# Not a method: the lower bound of every adapter on the same targets (see `apply_floor`).
FLOOR = "floor"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(model_name: str, method: str, options: dict, steps: int, warmup: int, threads: int) -> dict:
    """Time `steps` AdamW training steps of `method` on random tokens (child process)."""
    import torch

    from rosa_bench.config import ModelConfig
    from rosa_bench.methods import build_method, method_class
    from rosa_bench.methods.base import trainable_parameter_count
    from rosa_bench.models import load_model, resolve_model_config

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    batch, seq, kind = SHAPES[model_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, family = load_model(resolve_model_config(ModelConfig(), model_name), kind,
                                  num_labels=2 if kind == "classification" else None)
    options = resolve_targets(options, family)
    if method == FLOOR:
        from rosa_bench.methods.base import Method
        adapter, params = None, apply_floor(model, options.get("targets") or Method.default_targets[family])
    else:
        adapter = build_method(method_class(method).config_class(name=method, **options))
        model = adapter.apply(model, family)
        params = adapter.optimizer_parameters(model)  # ColA: adapters outside the backbone
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(100, 1000, (batch, seq), device=device)
    labels = torch.randint(0, 2, (batch,), device=device) if kind == "classification" else ids
    loaded_mb = _rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        if adapter is not None:
            adapter.before_optimizer_step()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb()
    state = [t for p in params for t in (p, p.grad, *optimizer.state[p].values()) if torch.is_tensor(t)]
    trainable = trainable_parameter_count(model) if adapter is not None else sum(p.numel() for p in params)
    return {"model": model_name, "method": method, "label": label(method, options), "options": options,
            "adapter_device": ",".join(sorted({str(p.device) for p in params})),
            "adapter_state_mb": sum(t.numel() * t.element_size() for t in state) / 2**20,
            "trainable_params": trainable,
            "median_step_s": median, "min_step_s": min(times), "step_times": times,
            "tokens_per_s": batch * seq / median,
            "peak_mem_mb": peak, "train_mem_mb": peak - (0 if device.type == "cuda" else loaded_mb),
            "batch": batch, "seq_len": seq, "device": device.type}


def apply_floor(model, patterns: list[str]) -> list:
    """Freeze the backbone and make the target layers' outputs require a gradient: backward
    then runs exactly as deep and wide as it must for any adapter on those layers, with no
    adapter work at all. Its step time is the lower bound of every method on these targets.
    Returns the trainable (head) parameters."""
    from rosa_bench.methods.base import find_targets, is_head

    model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name))

    def need_grad(module, args, output):
        return output if output.requires_grad else output.requires_grad_()

    for name in find_targets(model, patterns):
        model.get_submodule(name).register_forward_hook(need_grad)
    return [p for p in model.parameters() if p.requires_grad]


def _child(queue: mp.Queue, *args) -> None:
    queue.put(measure(*args))


def run_isolated(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def resolve_targets(options: dict, family: str) -> dict:
    """--targets 'same' -> LoRA's choice for this family; 'default' -> the method's own."""
    from rosa_bench.methods.base import Method

    if options.get("targets") == ["same"]:
        return {**options, "targets": list(Method.default_targets[family])}
    if options.get("targets") == ["default"]:
        return {k: v for k, v in options.items() if k != "targets"}
    return options


def label(method: str, options: dict) -> str:
    """'rocoft' + {mode: row, rank: 8} -> 'rocoft:mode=row' (rank and targets are per run)."""
    extra = [f"{k}={v}" for k, v in options.items() if k not in ("rank", "targets")]
    return ":".join([method, *extra])


def add_ratios(rows: list[dict]) -> None:
    for row in rows:
        same_model = {r["label"]: r for r in rows if r["model"] == row["model"]}
        for ref in ("full", "peft_lora", "lora"):
            if ref in same_model:
                row[f"time_vs_{ref}"] = row["median_step_s"] / same_model[ref]["median_step_s"]
                row[f"mem_vs_{ref}"] = row["train_mem_mb"] / max(same_model[ref]["train_mem_mb"], 1e-9)


def table(rows: list[dict]) -> str:
    cols = ["model", "label", "trainable_params", "median_step_s", "tokens_per_s", "peak_mem_mb",
            "train_mem_mb", "adapter_device", "adapter_state_mb", "time_vs_full", "time_vs_peft_lora",
            "time_vs_lora", "mem_vs_full"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:,}" if isinstance(v, int) else f"{v:.3f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_methods(spec: str, rank: int, targets: list[str] | None = None) -> list[tuple[str, dict]]:
    """'lora,rocoft:mode=row' -> [(lora, {rank}), (rocoft, {rank, mode: row})]; per-method targets
    are '+'-separated patterns (`rosa:targets=.*query+.*value`)."""
    out = []
    for item in spec.split(","):
        name, *opts = item.split(":")
        options = {} if name == "full" else {"rank": rank} | ({"targets": targets} if targets else {})
        for opt in opts:
            key, value = opt.split("=", 1)
            options[key] = value.split("+") if key == "targets" else value
        out.append((name, options))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma list; per-method options as name:key=value")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["same"],
                        help="'same' (LoRA's query/value for every method), 'default' (each "
                             "method's own), or module-name patterns")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="turns each method takes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time.json"))
    args = parser.parse_args()
    rows = []
    for model_name in args.models.split(","):
        methods = parse_methods(args.methods, args.rank, args.targets)
        rounds: list[list[dict]] = [[] for _ in methods]
        for r in range(args.rounds):  # methods take turns, so slow drifts in load hit all alike
            for i, (method, options) in enumerate(methods):
                print(f"measuring {model_name} / {method} {options or ''} (round {r + 1}) ...", flush=True)
                rounds[i].append(run_isolated(model_name, method, options, args.steps, args.warmup,
                                              args.threads))
        rows += [pooled(measured) for measured in rounds]
    add_ratios(rows)
    print(table(rows))
    save_json(Path(args.out), rows, steps=args.steps, warmup=args.warmup, rounds=args.rounds)


def pooled(measured: list[dict]) -> dict:
    """One row from a method's rounds: medians over every timed step, the highest memory."""
    times = [t for m in measured for t in m["step_times"]]
    row = dict(measured[0], step_times=times, median_step_s=statistics.median(times), min_step_s=min(times))
    row["tokens_per_s"] = row["batch"] * row["seq_len"] / row["median_step_s"]
    for key in ("peak_mem_mb", "train_mem_mb"):
        row[key] = max(m[key] for m in measured)
    return row


def save_json(out: Path, rows: list[dict], **meta) -> None:
    """Write the rows with the machine they were measured on (shared by the benchmarks)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": sys.version.split()[0], **meta,
                               "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
