"""Training-step time and memory of each method, measured in one run so ratios are fair.

    python benchmarks/step_time.py                      # minilm-l6 32x64, smollm2-135m 8x128
    python benchmarks/step_time.py --models minilm-l6 --methods full,lora --steps 5
    python benchmarks/step_time.py --methods lora,rocoft:mode=row --targets default

Every method adapts the same layers (`--targets same`: LoRA's query/value choice) unless
`--targets default` (each method's paper default) or a list of patterns is given.
`floor` is not a method but the bound under all of them: the backbone frozen, gradients
still flowing back to the targets (LoRA's targets under `--targets default`), no adapter
work; no method on those targets can take a shorter step.

Step times come from one child process per model that holds every method's model and steps
them in turn, one step each, so the machine's slow drifts hit every method alike and the
ratios hold even where absolute times wander. Peak memory comes from a separate short run of
each (model, method) in a fresh child process: on CUDA the allocator's peak, on CPU the
child's peak resident memory (and the part added by training, over the loaded model).
`adapter_state_mb` is what the trained tensors, their gradients and AdamW moments take, on
`adapter_device` (ColA keeps them off the backbone's device:
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


class Bench:
    """One method on one model with its optimizer and a fixed random batch, ready to take
    timed AdamW training steps."""

    def __init__(self, model_name: str, method: str, options: dict):
        import torch

        from rosa_bench.config import ModelConfig
        from rosa_bench.methods import build_method, method_class
        from rosa_bench.methods.base import Method
        from rosa_bench.models import load_model, resolve_model_config

        torch.manual_seed(0)
        self.model_name, self.method = model_name, method
        batch, seq, kind = SHAPES[model_name]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, _, family = load_model(resolve_model_config(ModelConfig(), model_name), kind,
                                      num_labels=2 if kind == "classification" else None)
        self.options = resolve_targets(options, family)
        if method == FLOOR:
            self.adapter = None
            self.params = apply_floor(model, self.options.get("targets") or Method.default_targets[family])
        else:
            self.adapter = build_method(method_class(method).config_class(name=method, **self.options))
            model = self.adapter.apply(model, family)
            self.params = self.adapter.optimizer_parameters(model)  # ColA: adapters outside the backbone
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        self.ids = torch.randint(100, 1000, (batch, seq), device=self.device)
        self.labels = (torch.randint(0, 2, (batch,), device=self.device) if kind == "classification"
                       else self.ids)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self) -> float:
        """One training step; returns its wall time in seconds."""
        import torch

        self._sync()
        start = time.perf_counter()
        mask = torch.ones_like(self.ids)
        self.model(input_ids=self.ids, attention_mask=mask, labels=self.labels).loss.backward()
        if self.adapter is not None:
            self.adapter.before_optimizer_step()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - start

    def describe(self) -> dict:
        """What was trained, and what its trained state takes (after some steps)."""
        import torch

        from rosa_bench.methods.base import trainable_parameter_count

        state = [t for p in self.params for t in (p, p.grad, *self.optimizer.state[p].values())
                 if torch.is_tensor(t)]
        trainable = (trainable_parameter_count(self.model) if self.adapter is not None
                     else sum(p.numel() for p in self.params))
        batch, seq, _ = SHAPES[self.model_name]
        return {"model": self.model_name, "method": self.method, "label": label(self.method, self.options),
                "options": self.options, "trainable_params": trainable,
                "adapter_device": ",".join(sorted({str(p.device) for p in self.params})),
                "adapter_state_mb": sum(t.numel() * t.element_size() for t in state) / 2**20,
                "batch": batch, "seq_len": seq, "device": self.device.type}


def memory(model_name: str, method: str, options: dict, steps: int, threads: int) -> dict:
    """Peak memory of `steps` training steps of one method, alone in this (child) process."""
    import torch

    torch.set_num_threads(threads)
    bench = Bench(model_name, method, options)
    loaded_mb = _rss_mb()
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        bench.step()
    cuda = bench.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
    return bench.describe() | {"peak_mem_mb": peak, "train_mem_mb": peak - (0 if cuda else loaded_mb)}


def interleaved_times(model_name: str, methods: list[tuple[str, dict]], steps: int, warmup: int,
                      threads: int) -> list[list[float]]:
    """Step times of every method, all loaded in this one (child) process and stepping in turn,
    one step each: the machine's slow drifts then hit every method alike."""
    import torch

    torch.set_num_threads(threads)
    benches = [Bench(model_name, method, options) for method, options in methods]
    times: list[list[float]] = [[] for _ in benches]
    for i in range(warmup + steps):
        for bench, measured in zip(benches, times):
            elapsed = bench.step()
            if i >= warmup:
                measured.append(elapsed)
    return times


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


def _child(queue: mp.Queue, fn, *args) -> None:
    queue.put(fn(*args))


def run_isolated(fn, *args):
    """fn(*args) in a fresh child process, so its memory peak and threads are its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, *args))
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
    parser.add_argument("--steps", type=int, default=12, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3,
                        help="steps of the separate run that measures each method's peak memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time.json"))
    args = parser.parse_args()
    rows = []
    for model_name in args.models.split(","):
        methods = parse_methods(args.methods, args.rank, args.targets)
        print(f"timing {model_name}: {len(methods)} methods stepping in turn ...", flush=True)
        times = run_isolated(interleaved_times, model_name, methods, args.steps, args.warmup, args.threads)
        for (method, options), measured in zip(methods, times):
            print(f"memory of {model_name} / {method} {options or ''} ...", flush=True)
            row = run_isolated(memory, model_name, method, options, args.memory_steps, args.threads)
            median = statistics.median(measured)
            rows.append(row | {"median_step_s": median, "min_step_s": min(measured), "step_times": measured,
                               "tokens_per_s": row["batch"] * row["seq_len"] / median})
    add_ratios(rows)
    print(table(rows))
    save_json(Path(args.out), rows, steps=args.steps, warmup=args.warmup, threads=args.threads)


def save_json(out: Path, rows: list[dict], **meta) -> None:
    """Write the rows with the machine they were measured on (shared by the benchmarks)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": sys.version.split()[0], **meta,
                               "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
