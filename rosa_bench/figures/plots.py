"""Paper figures with matplotlib (Agg backend, files only): one figure per logged scalar with
one line per configuration (mean over seeds, shaded min-max or std band, colour per method),
and the ROSA paper's rank sweep (best validation score against trainable parameters)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from rosa_bench.errors import UserError  # noqa: E402

# Logged for diagnosis, not compared in papers (the tables carry trainable parameters).
NOT_PLOTTED = ("train/lr", "train/tokens_per_s", "train/peak_mem_mb", "train/trainable_params", "train/epoch")
X_AXES = {"step": "optimizer step", "epoch": "epoch"}
BANDS = ("minmax", "std")
UNITS = {"loss": "cross-entropy, nats"}
FIGSIZE = (6.4, 4.0)
LINESTYLES = ("-", "--", "-.", ":")


def axis_label(tag: str) -> str:
    unit = UNITS.get(tag.rsplit("/", 1)[-1])
    return f"{tag} ({unit})" if unit else tag


def plotted_tags(curves: pd.DataFrame) -> list[str]:
    """Training and validation curves; test scores (one point a run, from evaluate.py) go to tables."""
    return sorted(t for t in curves["tag"].unique() if t not in NOT_PLOTTED and not t.startswith("test/"))


def with_x(curves: pd.DataFrame, x: str) -> pd.DataFrame:
    """Add the x column. Epochs come from each run's train/epoch tag (step / steps per epoch),
    so evaluation points between logged train steps are placed exactly."""
    if x not in X_AXES:
        raise UserError(f"--x {x!r} is not allowed; choose one of: {', '.join(X_AXES)}")
    if x == "step":
        return curves.assign(x=curves["step"].astype(float))
    epochs = curves[(curves["tag"] == "train/epoch") & (curves["step"] > 0)]
    per_step = (epochs["value"] / epochs["step"]).groupby(epochs["run"]).last()
    return curves.assign(x=curves["step"] * curves["run"].map(per_step)).dropna(subset=["x"])


def colours(keys: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {k: cmap(i % cmap.N) for i, k in enumerate(sorted(set(keys)))}


def _band(values: pd.DataFrame, band: str) -> tuple[pd.Series, pd.Series]:
    if band == "minmax":
        return values.min(axis=1), values.max(axis=1)
    mean, std = values.mean(axis=1), values.std(axis=1).fillna(0.0)
    return mean - std, mean + std


def curve_figure(points: pd.DataFrame, confs: pd.DataFrame, runs: pd.DataFrame, tag: str,
                 x: str, band: str, title: str) -> Figure:
    """`points`: long rows (run, x, value) of one tag. One line per configuration."""
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    palette = colours(confs["colour_key"].tolist())
    styles: dict[str, int] = {}
    for label, members in confs.groupby("configuration", sort=True):
        wide = points[points["run"].isin(members.index)].pivot_table(index="x", columns="run", values="value")
        if wide.empty:
            continue
        colour_key = members["colour_key"].iloc[0]
        style = LINESTYLES[styles.setdefault(colour_key, 0) % len(LINESTYLES)]
        styles[colour_key] += 1
        unfinished = int((~runs.loc[members.index, "complete"].astype(bool)).sum())
        note = f", {unfinished} unfinished" if unfinished else ""
        mean = wide.mean(axis=1)
        colour = palette[colour_key]
        ax.plot(mean.index, mean.values, style, color=colour, marker="." if len(mean) < 30 else None,
                label=f"{label} (n={wide.shape[1]}{note})")
        low, high = _band(wide, band)
        ax.fill_between(mean.index, low.values, high.values, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(axis_label(tag))
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title=f"mean over seeds, band: {'min–max' if band == 'minmax' else '±1 std'}",
              title_fontsize="small")
    return fig


def rank_sweep_figure(table: pd.DataFrame, score: str, title: str) -> Figure:
    """Score against trainable parameters (log scale), one line per method through its
    configurations, error bars over seeds."""
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    palette = colours(table["fnmodel.name"].astype(str).tolist())
    for method, rows in table.groupby("fnmodel.name", sort=True):
        rows = rows.sort_values("trainable_params")
        ax.errorbar(rows["trainable_params"], rows[f"{score} mean"], yerr=rows[f"{score} std"].fillna(0.0),
                    color=palette[str(method)], marker="o", capsize=3, label=str(method))
        for _, row in rows.iterrows() if rows["fnmodel.rank"].nunique() > 1 else ():
            ax.annotate(f"r={row['fnmodel.rank']}", (row["trainable_params"], row[f"{score} mean"]),
                        textcoords="offset points", xytext=(4, 4), fontsize="x-small")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(axis_label(score))
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", title="method (mean ± std over seeds)", title_fontsize="small")
    return fig


def save(fig: Figure, out: Path, stem: str, dpi: int) -> list[Path]:
    """PNG (for reading) and PDF (for the paper), at the figure's fixed size."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return paths


def tag_stem(tag: str) -> str:
    return "curve_" + tag.replace("/", "_")

