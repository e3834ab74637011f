"""Which runs are one configuration: runs whose configs differ only in the seed (or in keys
that do not change what is trained) are repeats, averaged in plots and tables. `--group-by`
replaces that rule with explicit keys (everything else is pooled like seeds)."""

from __future__ import annotations

import pandas as pd

from rosa_bench.errors import UserError

# Keys that do not define what is trained: repeats that differ only here are pooled.
IGNORED_PREFIXES = ("seed", "output.", "logging.progress", "dataset.cache", "train.num_workers",
                    "model.cache_dir")
# Shown in every table even when all runs agree: a reader wants to see them.
ALWAYS_SHOWN = ("fnmodel.name", "fnmodel.rank", "train.lr")
METHOD_KEY = "fnmodel.name"


def setting_columns(configs: pd.DataFrame) -> list[str]:
    return [c for c in configs.columns if not c.startswith(IGNORED_PREFIXES)]


def varying_columns(configs: pd.DataFrame, columns: list[str]) -> list[str]:
    return [c for c in columns if configs[c].astype(str).nunique() > 1]


def _check_keys(configs: pd.DataFrame, keys: list[str]) -> None:
    unknown = [k for k in keys if k not in configs.columns]
    if unknown:
        raise UserError(f"--group-by {unknown[0]!r} is not a config key; choose from: "
                        + ", ".join(sorted(configs.columns)))


def _short(columns: list[str]) -> dict[str, str]:
    """'fnmodel.rank' -> 'rank' unless two columns share the last part."""
    last = [c.rsplit(".", 1)[-1] for c in columns]
    return {c: s if last.count(s) == 1 else c for c, s in zip(columns, last)}


def _join(configs: pd.DataFrame, columns: list[str], names: dict[str, str]) -> pd.Series:
    return configs[columns].astype(str).apply(
        lambda row: " ".join(v if c == METHOD_KEY else f"{names[c]}={v}" for c, v in row.items()), axis=1)


def _labels(configs: pd.DataFrame, shown: list[str]) -> pd.Series:
    """Method first, then the keys that vary among that method's runs (a rank that only LoRA
    sweeps is not printed for full fine-tuning). Two configurations differ in the method or in
    a key that varies within it, so labels are unique."""
    names = _short(shown)
    if METHOD_KEY not in shown:
        return _join(configs, varying_columns(configs, shown) or shown[:1], names)
    others = [c for c in shown if c != METHOD_KEY]
    return pd.concat([_join(runs, [METHOD_KEY, *varying_columns(runs, others)], names)
                      for _, runs in configs.groupby(METHOD_KEY)]).reindex(configs.index)


def configurations(configs: pd.DataFrame, group_by: list[str] | None = None) -> pd.DataFrame:
    """Per run: the shown config columns, a readable 'configuration' label (method first, then
    the keys that vary) and a 'colour_key' (the method when each configuration has one)."""
    if group_by:
        _check_keys(configs, group_by)
        shown = list(dict.fromkeys(group_by))
    else:
        shown = list(dict.fromkeys([c for c in ALWAYS_SHOWN if c in configs.columns]
                                   + varying_columns(configs, setting_columns(configs))))
    labels = _labels(configs, shown)
    out = configs[shown].assign(configuration=labels)
    if METHOD_KEY in configs:  # full fine-tuning has no rank, alpha...: show none in tables
        adapter_keys = [c for c in shown
                        if c.startswith("fnmodel.") and c not in (METHOD_KEY, "fnmodel.train_head")]
        out[adapter_keys] = out[adapter_keys].astype(object)
        out.loc[configs[METHOD_KEY] == "full", adapter_keys] = "-"
    method_per_config = configs.groupby(labels)[METHOD_KEY].nunique() if METHOD_KEY in configs else None
    by_method = method_per_config is not None and bool((method_per_config == 1).all())
    out["colour_key"] = configs[METHOD_KEY].astype(str) if by_method else labels
    return out
