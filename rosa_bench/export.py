"""Export a trained run for tools outside this project.

`merged`: the method's update folded into the weights (its own `merge`), saved as a plain
transformers folder (config, safetensors, tokenizer, generation config) that
`AutoModelFor...from_pretrained` loads without rosa_bench. `peft`: LoRA runs (ours or HF
PEFT's) as a PEFT adapter folder for `PeftModel.from_pretrained(base, folder)`. ColA with
`collab=alone` and several users has one model per user: `merged` writes one folder per user.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from rosa_bench import runs
from rosa_bench.config import RunConfig
from rosa_bench.errors import UserError, choices_error
from rosa_bench.evaluate import load_checkpoint, restore, run_config
from rosa_bench.generation import hf_config
from rosa_bench.methods.base import HEAD_NAMES, AdapterLayer, set_submodule
from rosa_bench.train import checkpoint as ckpt

FORMATS = ("merged", "peft")
PEFT_METHODS = ("lora", "peft_lora")
INFO_FILE = "rosa_bench_export.json"


def export_run(folder: str | Path, out: str | Path, checkpoint: str = "best",
               fmt: str = "merged") -> list[Path]:
    """Write `folder`'s `checkpoint` model to `out` in format `fmt`; returns the folders written
    (one, or one per user for ColA collab=alone)."""
    folder, out = Path(folder), Path(out)
    if fmt not in FORMATS:
        raise choices_error("--format", fmt, FORMATS)
    run = run_config(folder)
    method = run.fnmodel.name
    if fmt == "peft" and method not in PEFT_METHODS:
        raise UserError(f"--format peft: a {method} run is not a PEFT LoRA adapter (only "
                        f"{', '.join(PEFT_METHODS)}); use --format merged (a plain transformers model)")
    if fmt == "peft" and getattr(run.fnmodel, "fused_slices", None):
        raise UserError(f"--format peft: fnmodel.fused_slices={run.fnmodel.fused_slices} (per-slice LoRA "
                        "pairs) has no PEFT LoRA equivalent; use --format merged (a plain transformers "
                        "model)")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new folder")
    load_checkpoint(folder, checkpoint)  # a missing checkpoint fails before any model loads
    # The data is never used here: one row of each split keeps building cheap.
    run = dataclasses.replace(run, dataset=dataclasses.replace(run.dataset, max_train_samples=1,
                                                               max_eval_samples=1))
    info = {"run": str(folder.resolve()), "checkpoint": checkpoint, "method": method, "format": fmt}
    if fmt == "merged" and per_user(run):
        return export_per_user(folder, out, checkpoint, run, info)
    parts, step = restore(folder, checkpoint, run)
    info["step"] = step
    write = write_merged if fmt == "merged" else write_peft
    write(parts, out)
    runs.write_json(out / INFO_FILE, info)
    return [out]


def per_user(run: RunConfig) -> bool:
    return run.fnmodel.name == "cola" and run.fnmodel.collab == "alone" and run.fnmodel.users > 1


def export_per_user(folder: Path, out: Path, checkpoint: str, run: RunConfig,
                    info: dict[str, Any]) -> list[Path]:
    """ColA collab=alone: user k's model is the backbone plus user k's adapters, so each user
    gets its own merged folder `user_<k>`, built as a one-user ColA model from user k's slice of
    the checkpoint (checkpoint keys `<layer>.cola.<k>.<tensor>`)."""
    from rosa_bench.pipeline import build

    path = load_checkpoint(folder, checkpoint)
    state, step = ckpt.load_model_state(path), ckpt.load_state(path).get("global_step", 0)
    kinds = run.fnmodel.adapter.split("~")
    written = []
    for user in range(run.fnmodel.users):
        alone = dataclasses.replace(run.fnmodel, users=1, collab="col", adapter=kinds[user % len(kinds)])
        parts = build(dataclasses.replace(run, fnmodel=alone))
        own = {key.replace(f".cola.{user}.", ".cola.0."): tensor for key, tensor in state.items()
               if f".cola.{user}." in key}
        parts.method.load_checkpoint_state(parts.model, own)
        target = out / f"user_{user}"
        write_merged(parts, target)
        runs.write_json(target / INFO_FILE, info | {"step": step, "user": user})
        written.append(target)
    return written


def write_merged(parts: Any, out: Path) -> None:
    """The merged model, its tokenizer and (causal tasks) the run's decoding protocol as
    generation_config.json."""
    model = parts.method.merge(parts.model)  # an unmergeable method raises its one-line reason
    if parts.task.is_causal:
        generation = hf_config(parts.task.generation, parts.tokenizer)
        generation.bos_token_id = model.generation_config.bos_token_id
        model.generation_config = generation
    model.save_pretrained(out)
    parts.tokenizer.save_pretrained(out)


def lora_factors(model: nn.Module, method: str) -> tuple[nn.Module, dict[str, tuple[torch.Tensor, ...]]]:
    """(base model without adapters, {module name: (A, B)}) from a LoRA run's model. Both
    implementations store A as (r, in) and B as (out, r) and scale by alpha / r."""
    if method == "peft_lora":
        from peft.tuners.lora import LoraLayer as PeftLoraLayer

        prefix = "base_model.model."
        factors = {name.removeprefix(prefix): (m.lora_A["default"].weight, m.lora_B["default"].weight)
                   for name, m in model.named_modules() if isinstance(m, PeftLoraLayer)}
        return model.unload(), factors
    factors = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]:
        factors[name] = (layer.lora_A, layer.lora_B)
        set_submodule(model, name, layer.base_layer)
    return model, factors


@torch.no_grad()
def write_peft(parts: Any, out: Path) -> None:
    """A PEFT LoRA adapter with the run's factors, rank and alpha. A classification head is
    saved with it (modules_to_save) whether it trained or not: a base model loaded elsewhere
    would draw a new random head."""
    from peft import LoraConfig, get_peft_model

    cfg = parts.method.cfg
    base, factors = lora_factors(parts.model, cfg.name)
    targets = sorted(factors)
    heads = [h for h in HEAD_NAMES if hasattr(base, h)]
    config = LoraConfig(r=int(cfg.rank), lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=targets, modules_to_save=heads or None,
                        fan_in_fan_out=isinstance(base.get_submodule(targets[0]), Conv1D),
                        base_model_name_or_path=base.config.name_or_path or None)
    peft_model = get_peft_model(base, config)
    for name, (a, b) in factors.items():
        layer = peft_model.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(out)
    parts.tokenizer.save_pretrained(out)
