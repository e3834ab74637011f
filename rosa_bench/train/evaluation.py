"""Validation during training: loss / perplexity for causal tasks, the task metric for
classification and regression, and a few greedy generations as text samples."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rosa_bench.data.task import Task


@torch.no_grad()
def evaluate_split(model: nn.Module, task: Task, loader: DataLoader, device: torch.device,
                   progress: Any = None) -> dict[str, float]:
    """Scores on one validation split. Causal: token-weighted loss and ppl over label tokens."""
    was_training = model.training
    model.eval()
    loss_sum, weight = 0.0, 0
    predictions, labels = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        if task.is_causal:
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(out.loss) * n
            weight += n
        else:
            n = batch["labels"].shape[0]
            loss_sum += float(out.loss) * n
            weight += n
            logits = out.logits.float()
            predictions.append(logits.squeeze(-1) if task.num_labels == 1 else logits.argmax(-1))
            labels.append(batch["labels"])
        if progress is not None:
            progress.update(1)
    model.train(was_training)
    scores = {"loss": loss_sum / max(weight, 1)}
    if task.is_causal:
        scores["ppl"] = math.exp(min(scores["loss"], 50.0))
    else:
        scores |= task.compute_metrics(torch.cat(predictions).cpu().numpy(),
                                       torch.cat(labels).cpu().numpy())
    return scores


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
                     max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts`, one at a time (no padding subtleties for samples)."""
    was_training = model.training
    model.eval()
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return texts
