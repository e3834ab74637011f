"""The ROSA paper's synthetic experiment: can a rank-r method reach a rank-24 target?

    python benchmarks/synthetic_rosa.py                  # linear and 2-layer MLP, ~2 min CPU
    python benchmarks/synthetic_rosa.py --epochs 20 --models linear

A student starts from a base network; the teacher is the base plus a random rank-24
perturbation of every layer; inputs are N(0, I) and the loss is MSE. LoRA (one fixed rank-r
update) and ROSA (a rank-r update merged and resampled every few epochs) at ranks 1, 8, 16, 24
are compared with full fine-tuning, using the real methods through rosa_bench.apply. Prints a
markdown table, writes JSON and a PNG of the validation curves to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rosa_bench  # noqa: E402
from rosa_bench.methods import attached_method  # noqa: E402

IN_F, HIDDEN, OUT_F, TRUE_RANK = 512, 64, 32, 24  # the paper's shapes


def base_network(kind: str, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Sequential(nn.Linear(IN_F, OUT_F, bias=False))
    return nn.Sequential(nn.Linear(IN_F, HIDDEN, bias=False), nn.ReLU(), nn.Linear(HIDDEN, OUT_F, bias=False))


def teacher_of(student: nn.Sequential, seed: int) -> nn.Sequential:
    """The base network with a random rank-24 perturbation added to every layer."""
    g = torch.Generator().manual_seed(seed + 1)
    teacher = base_network("linear" if len(student) == 1 else "mlp", seed)
    with torch.no_grad():
        for layer in teacher:
            if isinstance(layer, nn.Linear):
                out_f, in_f = layer.weight.shape
                u = torch.randn(out_f, TRUE_RANK, generator=g)
                v = torch.randn(TRUE_RANK, in_f, generator=g)
                layer.weight.add_(u @ v / (TRUE_RANK * in_f) ** 0.5)
    return teacher.requires_grad_(False)


def student_for(kind: str, method: str, rank: int, seed: int) -> nn.Sequential:
    model = base_network(kind, seed)
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if method == "full":
        return rosa_bench.apply(model, "full")
    # alpha = rank: LoRA's scale is 1, like ROSA's, so both see the same learning rate.
    extra = {"alpha": float(rank)} if method == "lora" else {}
    return rosa_bench.apply(model, method, rank=rank, targets=targets, **extra)


def train_one(kind: str, method: str, rank: int, args: argparse.Namespace,
              data: tuple[torch.Tensor, ...]) -> dict:
    """Train one student; returns its validation-loss curve (epoch 0 = before training)."""
    x_train, y_train, x_valid, y_valid = data
    model = student_for(kind, method, rank, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # Cosine decay to zero over the run, as the trainer's `train.scheduler=cosine`: at a constant
    # rate Adam's steps keep a size ~lr near the optimum, so curves stall (or blow up) at a noise floor.
    steps = args.epochs * -(-len(x_train) // args.batch_size)
    schedule = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                if args.schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
    loss_fn = nn.MSELoss()
    g = torch.Generator().manual_seed(args.seed)

    def valid_loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model(x_valid), y_valid))

    curve, resamples, start = [valid_loss()], 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for idx in torch.randperm(len(x_train), generator=g).split(args.batch_size):
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        curve.append(valid_loss())
        if method == "rosa" and epoch % args.factorize_every == 0 and epoch < args.epochs:
            resamples += 1
            for p in attached_method(model).resample(model, resamples):
                optimizer.state.pop(p, None)  # what Trainer.reset_optimizer_state does
    return {"model": kind, "method": method, "rank": rank if method != "full" else None,
            "trainable_params": sum(p.numel() for p in params), "initial_loss": curve[0],
            "final_loss": curve[-1], "best_loss": min(curve),
            "final_vs_initial": curve[-1] / curve[0], "resamples": resamples,
            "seconds": time.perf_counter() - start, "curve": curve}


def table(rows: list[dict]) -> str:
    lines = ["| model | method | rank | trainable | initial loss | final loss | final / initial |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['rank'] or 'full'} | {r['trainable_params']:,} | "
                     f"{r['initial_loss']:.3e} | {r['final_loss']:.3e} | {r['final_vs_initial']:.2e} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.2), squeeze=False)
    colors = dict(zip((1, 8, 16, 24), ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, kind in zip(axes[0], kinds):
        for r in (r for r in rows if r["model"] == kind):
            style = {"lora": "--", "rosa": "-"}.get(r["method"], ":")
            label = f"{r['method']} r={r['rank']}" if r["rank"] else "full fine-tuning"
            ax.plot(r["curve"], style, color=colors.get(r["rank"], "black"), label=label)
        ax.set(yscale="log", xlabel="epoch", ylabel="validation MSE",
               title=f"{kind} student, rank-24 teacher")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="linear,mlp")
    parser.add_argument("--ranks", default="1,8,16,24")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--factorize-every", type=int, default=2, help="ROSA resamples every N epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--train-samples", type=int, default=5000)
    parser.add_argument("--valid-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "synthetic_rosa"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for kind in args.models.split(","):
        teacher = teacher_of(base_network(kind, args.seed), args.seed)
        g = torch.Generator().manual_seed(args.seed + 2)
        x_train = torch.randn(args.train_samples, IN_F, generator=g)
        x_valid = torch.randn(args.valid_samples, IN_F, generator=g)
        data = (x_train, teacher(x_train), x_valid, teacher(x_valid))
        runs = [("full", 0)] + [(m, int(r)) for r in args.ranks.split(",") for m in ("lora", "rosa")]
        for method, rank in runs:
            rows.append(train_one(kind, method, rank, args, data))
            print(f"{kind} {method} r={rank}: final valid MSE {rows[-1]['final_loss']:.3e} "
                  f"({rows[-1]['seconds']:.1f}s)", flush=True)
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"))
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out.with_suffix(".json").write_text(json.dumps({"machine": platform.platform(), "config": config,
                                                    "rows": rows}, indent=1))
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
