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
`--methods lora,cola:adapter=lowrank,cola:adapter=linear`); `adapter_state_on_device_mb` is the part
of it on the backbone's device.

`--gradient-checkpointing on|both` adds rows (label `+gc`) with `train.gradient_checkpointing`'s
mechanism; `train_mem_vs_no_gc` is their training memory over the same method's without.
`--device cuda --precision bf16 --batch 8 --seq-len 512` is the GPU setting (bf16 autocast, as
`train.precision=bf16`); `--architectures DIR` builds each model from `DIR/<model>/config.json` with
random weights (same shapes and work, for a machine without the weight packages).
Prints a table and writes JSON.
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
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# model -> (batch, seq_len, task kind): the shapes named in the foundation issue
SHAPES = {"minilm-l6": (32, 64, "classification"), "smollm2-135m": (8, 128, "causal_lm")}
DEFAULT_METHODS = ("full,floor,lora,peft_lora,rosa,loraxs,rocoft:mode=row,rocoft:mode=column,"
                   "cola:adapter=lowrank,cola:adapter=linear")
# Not a method: the lower bound of every adapter on the same targets (see `apply_floor`).
FLOOR = "floor"
OTHER_SHAPE = (8, 64)  # batch, seq_len of a model SHAPES does not name (tiny test models)
GC_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


@dataclass(frozen=True)
class Setting:
    """Where and how every step of one benchmark run goes (picklable, for the child processes)."""

    device: str = "auto"  # auto: cuda when available, else cpu
    precision: str = "fp32"  # fp32 | bf16 (autocast over fp32 weights, as train.precision=bf16)
    batch: int | None = None  # None: the model's SHAPES entry
    seq_len: int | None = None
    architectures: str | None = None  # folder of <model>/config.json: random weights, same shapes

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def shape(self, model_name: str) -> tuple[int, int, str]:
        """(batch, seq_len, task kind) of `model_name` under this setting."""
        batch, seq, kind = SHAPES.get(model_name) or (*OTHER_SHAPE, task_kind(model_name))
        return self.batch or batch, self.seq_len or seq, kind

    def autocast(self) -> AbstractContextManager:
        """bf16: autocast on the setting's device, as the trainer's Accelerate does."""
        import torch

        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.torch_device().type, dtype=torch.bfloat16)


DEFAULT_SETTING = Setting()


def task_kind(model_name: str) -> str:
    """Encoders are benchmarked as classifiers, decoders as causal LMs (the model's YAML)."""
    from rosa_bench.config import ModelConfig
    from rosa_bench.models import CAUSAL_LM, CLASSIFICATION, resolve_model_config

    kind = resolve_model_config(ModelConfig(), model_name).kind
    return CLASSIFICATION if kind == "encoder" else CAUSAL_LM


def load_bench_model(model_name: str, kind: str, architectures: str | None,
                     device: torch.device | str) -> tuple[torch.nn.Module, str]:
    """(model, family) in eval mode: the offline weights, or with `architectures` the model
    built from `<architectures>/<model_name>/config.json` with random weights, directly on
    `device`. Step time and memory do not depend on the weights' values."""
    from rosa_bench.config import ModelConfig
    from rosa_bench.methods.base import model_family
    from rosa_bench.models import load_model, model_class, resolve_model_config

    num_labels = 2 if kind == "classification" else None
    if architectures is None:
        model, _, family = load_model(resolve_model_config(ModelConfig(), model_name), kind, num_labels)
        return model.to(device), family
    import torch
    from transformers import AutoConfig

    model_cls, head = model_class(kind, num_labels)
    config = AutoConfig.from_pretrained(Path(architectures) / model_name, **head)
    with torch.device(device):
        model = model_cls.from_config(config)
    return model.eval(), model_family(model)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Bench:
    """One method on one model with its optimizer and a fixed random batch, ready to take
    timed AdamW training steps."""

    def __init__(self, model_name: str, method: str, options: dict, setting: Setting = DEFAULT_SETTING,
                 checkpointing: bool = False):
        import torch

        from rosa_bench.methods import build_method, method_class
        from rosa_bench.methods.base import Method
        from rosa_bench.models import enable_gradient_checkpointing

        torch.manual_seed(0)
        self.model_name, self.method, self.setting, self.checkpointing = (model_name, method, setting,
                                                                          checkpointing)
        batch, seq, kind = setting.shape(model_name)
        self.device = setting.torch_device()
        # On the device before the method applies (a model from `architectures` is built there,
        # sparing a CPU init of random weights), so its factors are made there too; ColA's
        # adapters stay on their adapter_device.
        model, family = load_bench_model(model_name, kind, setting.architectures, self.device)
        self.options = resolve_targets(options, family)
        if method == FLOOR:
            self.adapter = None
            self.params = apply_floor(model, self.options.get("targets") or Method.default_targets[family])
        else:
            self.adapter = build_method(method_class(method).config_class(name=method, **self.options))
            model = self.adapter.apply(model, family)
            self.params = self.adapter.optimizer_parameters(model)  # ColA: adapters outside the backbone
        if checkpointing:
            enable_gradient_checkpointing(model, model_name)
        self.model = model.to(self.device).train()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        high = min(1000, model.config.vocab_size)  # tiny test models have small vocabularies
        self.ids = torch.randint(min(100, high // 2), high, (batch, seq), device=self.device)
        self.labels = (torch.randint(0, 2, (batch,), device=self.device) if kind == "classification"
                       else self.ids)

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, saved: AbstractContextManager | None = None) -> float:
        """One training step; returns its wall time in seconds. `saved` wraps the forward (a
        saved-tensors hook context: `saved_activation_mb`)."""
        import torch

        self._sync()
        start = time.perf_counter()
        mask = torch.ones_like(self.ids)
        with self.setting.autocast(), saved or nullcontext():
            loss = self.model(input_ids=self.ids, attention_mask=mask, labels=self.labels).loss
        loss.backward()
        if self.adapter is not None:
            self.adapter.before_optimizer_step()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        return time.perf_counter() - start

    def saved_activation_mb(self) -> float | None:
        """What autograd keeps from one step's forward for its backward, the model's own
        parameters and buffers aside: each storage counted once (q, k and v share one saved
        input). Exact where resident memory is noisy; it is the part of the training memory that
        a method's backward needs. None with gradient checkpointing, whose own saved-tensor
        hooks hide what each block keeps."""
        import torch

        if self.checkpointing:
            return None
        own = {t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers(),
                                                        *self.params)}
        sizes: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in own:
                sizes[storage.data_ptr()] = storage.nbytes()
            return tensor

        self.step(torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor))
        return sum(sizes.values()) / 2**20

    def describe(self) -> dict:
        """What was trained, and what its trained state takes (after some steps)."""
        import torch

        from rosa_bench.methods.base import trainable_parameter_count

        state = [t for p in self.params for t in (p, p.grad, *self.optimizer.state[p].values())
                 if torch.is_tensor(t)]
        trainable = (trainable_parameter_count(self.model) if self.adapter is not None
                     else sum(p.numel() for p in self.params))
        batch, seq, _ = self.setting.shape(self.model_name)
        on_device = [t for t in state if t.device.type == self.device.type]
        return {"model": self.model_name, "method": self.method,
                "label": label(self.method, self.options) + ("+gc" if self.checkpointing else ""),
                "options": self.options, "trainable_params": trainable,
                "adapter_device": ",".join(sorted({str(p.device) for p in self.params})),
                "adapter_state_mb": _mb(state), "adapter_state_on_device_mb": _mb(on_device),
                "batch": batch, "seq_len": seq, "device": self.device.type,
                "precision": self.setting.precision, "gradient_checkpointing": self.checkpointing,
                "weights": "random" if self.setting.architectures else "offline"}


def _mb(tensors: list) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20



def memory(model_name: str, method: str, options: dict, steps: int, threads: int,
           setting: Setting = DEFAULT_SETTING, checkpointing: bool = False) -> dict:
    """Peak memory of `steps` training steps of one method, alone in this (child) process, and
    the training part: the peak over what the loaded, wrapped model holds (on CUDA the
    allocator's figures, on CPU resident memory)."""
    import gc

    import torch

    torch.set_num_threads(threads)
    gc.collect()  # run in-process (measure_model's isolated=False), the last bench's graphs go first
    bench = Bench(model_name, method, options, setting, checkpointing)
    cuda = bench.device.type == "cuda"
    loaded_mb = torch.cuda.memory_allocated() / 2**20 if cuda else _rss_mb()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        bench.step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_mb()
    return bench.describe() | {"peak_mem_mb": peak, "loaded_mem_mb": loaded_mb,
                               "train_mem_mb": peak - loaded_mb, "saved_mb": bench.saved_activation_mb()}


def interleaved_times(model_name: str, methods: list[tuple], steps: int, warmup: int, threads: int,
                      setting: Setting = DEFAULT_SETTING) -> list[list[float]]:
    """Step times of every method, all loaded in this one (child) process and stepping in turn,
    one step each: the machine's slow drifts then hit every method alike. Each entry of
    `methods` is (method, options) or (method, options, gradient checkpointing)."""
    import torch

    torch.set_num_threads(threads)
    benches = [Bench(model_name, *variant[:2], setting, *variant[2:]) for variant in methods]
    times: list[list[float]] = [[] for _ in benches]
    for i in range(warmup + steps):
        for bench, measured in zip(benches, times):
            elapsed = bench.step()
            if i >= warmup:
                measured.append(elapsed)
    return times


def apply_floor(model: torch.nn.Module, patterns: list[str]) -> list[torch.nn.Parameter]:
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


def _child(queue: mp.Queue, fn: Callable[..., Any], *args: Any) -> None:
    try:
        queue.put((True, fn(*args)))
    except Exception:
        queue.put((False, traceback.format_exc()))


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a fresh child process, so its memory peak and threads are its own. A child
    that raises, or dies (killed for memory), raises here instead of leaving the parent waiting."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, *args))
    proc.start()
    while True:
        try:
            ok, result = queue.get(timeout=2)
            break
        except Empty:
            if not proc.is_alive() and queue.empty():
                raise RuntimeError(f"{fn.__name__} died in its child process (exit code {proc.exitcode})") \
                    from None
    proc.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its child process:\n{result}")
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
        for ref in ("full", "peft_lora", "lora", FLOOR):
            if ref in same_model:
                row[f"time_vs_{ref}"] = row["median_step_s"] / same_model[ref]["median_step_s"]
                row[f"mem_vs_{ref}"] = row["train_mem_mb"] / max(same_model[ref]["train_mem_mb"], 1e-9)
                if row.get("saved_mb") is not None and same_model[ref].get("saved_mb"):
                    row[f"saved_vs_{ref}"] = row["saved_mb"] / same_model[ref]["saved_mb"]
        plain = same_model.get(row["label"].removesuffix("+gc"))
        if row.get("gradient_checkpointing") and plain is not None:
            row["train_mem_vs_no_gc"] = row["train_mem_mb"] / max(plain["train_mem_mb"], 1e-9)
            row["time_vs_no_gc"] = row["median_step_s"] / plain["median_step_s"]


def table(rows: list[dict]) -> str:
    cols = ["model", "label", "trainable_params", "median_step_s", "tokens_per_s", "peak_mem_mb",
            "train_mem_mb", "saved_mb", "adapter_device", "adapter_state_mb", "adapter_state_on_device_mb",
            "time_vs_full", "time_vs_peft_lora", "time_vs_lora", "time_vs_floor", "mem_vs_full",
            "mem_vs_floor", "saved_vs_floor", "train_mem_vs_no_gc", "time_vs_no_gc"]
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


def with_checkpointing(methods: list[tuple[str, dict]], mode: str) -> list[tuple[str, dict, bool]]:
    """Each (method, options) once per gradient-checkpointing choice of `mode` (off, on, both)."""
    return [(method, options, gc) for method, options in methods for gc in GC_MODES[mode]]


def _in_this_process(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def measure_model(model_name: str, methods: list[tuple[str, dict, bool]], steps: int, warmup: int,
                  memory_steps: int, threads: int, setting: Setting, isolated: bool = True) -> list[dict]:
    """One row per (method, options, gradient checkpointing) on one model: interleaved step
    times, then each one's memory. `isolated=False` runs all of it in this process: exact on
    CUDA (allocator figures), but on CPU the resident-memory peak never falls, so there the
    memory figures only mean something isolated."""
    call = run_isolated if isolated else _in_this_process
    print(f"timing {model_name}: {len(methods)} methods stepping in turn ...", flush=True)
    times = call(interleaved_times, model_name, methods, steps, warmup, threads, setting)
    rows = []
    for (method, options, gc), measured in zip(methods, times):
        print(f"memory of {model_name} / {method} {options or ''}{' +gc' if gc else ''} ...", flush=True)
        row = call(memory, model_name, method, options, memory_steps, threads, setting, gc)
        median = statistics.median(measured)
        rows.append(row | {"median_step_s": median, "min_step_s": min(measured), "step_times": measured,
                           "tokens_per_s": row["batch"] * row["seq_len"] / median,
                           "memory_isolated": isolated})
    return rows


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
    add_setting_arguments(parser)
    parser.add_argument("--gradient-checkpointing", choices=list(GC_MODES), default="off",
                        help="off; on: every row with it; both: each method without and with (+gc)")
    parser.add_argument("--batch", type=int, help="batch size for every model (default: its SHAPES entry)")
    parser.add_argument("--seq-len", type=int, help="tokens per example for every model")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "step_time.json"))
    args = parser.parse_args()
    setting = Setting(args.device, args.precision, args.batch, args.seq_len, args.architectures)
    methods = with_checkpointing(parse_methods(args.methods, args.rank, args.targets),
                                 args.gradient_checkpointing)
    rows = [row for model_name in args.models.split(",")
            for row in measure_model(model_name, methods, args.steps, args.warmup, args.memory_steps,
                                     args.threads, setting)]
    add_ratios(rows)
    print(table(rows))
    save_json(Path(args.out), rows, steps=args.steps, warmup=args.warmup, threads=args.threads,
              setting=asdict(setting))


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --precision and --architectures, shared with merged_latency.py."""
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:<i>")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast over fp32 weights, as train.precision=bf16")
    parser.add_argument("--architectures", metavar="DIR",
                        help="build each model from DIR/<model>/config.json with random weights")


def save_json(out: Path, rows: list[dict], **meta) -> None:
    """Write the rows with the machine they were measured on (shared by the benchmarks)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": sys.version.split()[0], **meta,
                               "rows": rows}, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
