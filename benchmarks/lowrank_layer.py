"""Where a low-rank adapter's step time goes, one adapted layer at a time: is the fused path
(methods/lowrank.py) at the bound that its arithmetic sets?

    python benchmarks/lowrank_layer.py                 # minilm-l6's and smollm2-135m's layer shapes
    python benchmarks/lowrank_layer.py --rounds 100 --out /tmp/layers.json

For each (in, out, tokens) it times, interleaved round by round so drifts hit all alike:
- `floor`: the frozen layer's forward and input-gradient products (what `step_time.py`'s floor
  pays per target);
- `lora`, `loraxs`: the fused forward and backward (rank 8);
- `thin_lora`: LoRA's own products alone, no autograd: the four that must read a
  (tokens, n)-sized activation (A x^T, g^T h, B^T g^T, g_r x) and the two that add the
  low-rank terms into the output and the input gradient; `thin_loraxs`: LoRA-XS's two reads
  (A x^T, B^T g^T; its trainable core needs no other) and two additions.
`floor + thin_<method>` is the bound for any implementation made of these BLAS calls (the
`_bound_vs_floor` columns); the rank-8 products
are memory-bound (they read the activation once each and do 8 multiply-adds per element), so
on a CPU they cost far more than their share of the arithmetic. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_time import save_json  # noqa: E402
from rosa_bench.methods.lowrank import _FusedLowRankLinear  # noqa: E402

METHODS = ("lora", "loraxs")
# (in, out, tokens): every adapted projection's shape at the step_time.py batch (32x64 / 8x128)
SHAPES = {"minilm-l6": [(384, 384, 2048), (384, 1536, 2048), (1536, 384, 2048)],
          "smollm2-135m": [(576, 576, 1024), (576, 192, 1024), (576, 1536, 1024), (1536, 576, 1024)]}


def layer_variants(n: int, out: int, tokens: int, rank: int) -> dict[str, Callable[[], None]]:
    x = torch.randn(tokens, n, requires_grad=True)
    weight, bias = torch.randn(out, n) / n**0.5, torch.randn(out)
    a = (torch.randn(rank, n) / n**0.5).requires_grad_()
    b = (torch.randn(out, rank) / rank**0.5).requires_grad_()
    core = torch.randn(rank, rank, requires_grad=True)  # LoRA-XS: A and B frozen, the core trains
    a_frozen, b_frozen = a.detach(), b.detach()
    grad = torch.randn(tokens, out)
    y, gx = torch.empty(tokens, out), torch.empty(tokens, n)
    h_t, gr_t = torch.randn(rank, tokens), torch.randn(rank, tokens)

    def floor() -> None:
        torch.nn.functional.linear(x, weight, bias).backward(grad)

    def lora() -> None:
        _FusedLowRankLinear.apply(x, None, weight, bias, 2.0, a, b).backward(grad)

    def loraxs() -> None:
        _FusedLowRankLinear.apply(x, None, weight, bias, 2.0, a_frozen, core, b_frozen).backward(grad)

    def thin_lora() -> None:
        with torch.no_grad():
            torch.mm(a, x.T)                 # forward: h^T = A x^T
            y.addmm_(h_t.T, b.T)             # forward: y += s h B^T
            torch.mm(h_t, grad)              # grad B^T = h^T g
            torch.mm(b.T, grad.T)            # g_r^T = B^T g^T
            torch.mm(gr_t, x)                # grad A = g_r^T x
            gx.addmm_(gr_t.T, a)             # input gradient += g_r A

    def thin_loraxs() -> None:
        with torch.no_grad():
            torch.mm(a, x.T)                 # forward: h^T = A x^T (then R h^T: rank x rank)
            y.addmm_(h_t.T, b.T)             # forward: y += s (h R^T) B^T
            torch.mm(b.T, grad.T)            # g_r^T = B^T g^T (grad R = g_r^T h: rank x rank)
            gx.addmm_(gr_t.T, a)             # input gradient += (g_r R) A

    def run(fn: Callable[[], None]) -> Callable[[], None]:
        def once() -> None:
            x.grad = a.grad = b.grad = core.grad = None
            fn()
        return once

    return {name: run(fn) for name, fn in (("floor", floor), ("lora", lora), ("thin_lora", thin_lora),
                                           ("loraxs", loraxs), ("thin_loraxs", thin_loraxs))}


def measure(n: int, out: int, tokens: int, rank: int, rounds: int, warmup: int) -> dict:
    variants = layer_variants(n, out, tokens, rank)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(warmup + rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratios = {f"{method}_vs_floor": ms[method] / ms["floor"] for method in METHODS}
    bounds = {f"{method}_bound_vs_floor": (ms["floor"] + ms[f"thin_{method}"]) / ms["floor"]
              for method in METHODS}
    return {"in": n, "out": out, "tokens": tokens, "rank": rank, **{f"{k}_ms": v for k, v in ms.items()},
            **ratios, **bounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lowrank_layer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [{"model": model} | measure(*shape, args.rank, args.rounds, args.warmup)
            for model in args.models.split(",") for shape in SHAPES[model]]
    cols = ["model", "in", "out", "tokens", "floor_ms",
            *[f"{method}{part}" for method in METHODS for part in ("_vs_floor", "_bound_vs_floor")]]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        cells = (f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols)
        print("| " + " | ".join(cells) + " |")
    save_json(Path(args.out), rows, rounds=args.rounds, threads=args.threads)


if __name__ == "__main__":
    main()
