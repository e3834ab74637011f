"""Validation during training: loss / perplexity for causal tasks, the task metric for
classification and regression, and a few greedy generations as text samples. With several
processes each scores its own shard and the totals are gathered, so every process gets the
scores one process would compute. Validation batches hold rows of similar length: padding
costs as much as tokens, and every score here is a sum or a metric of the whole split, so the
order of the rows changes nothing but the time."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from rosa_bench.config import GenerationConfig
from rosa_bench.data.task import Task
from rosa_bench.generation import batches, generate
from rosa_bench.train import distributed


def length_sorted_loader(rows: Any, batch_size: int, collate: Any, **options: Any) -> DataLoader:
    """A loader over `rows` (tokenized, with input_ids) in batches of similar length, longest
    first (so the peak memory shows at once); for order-free scores only."""
    lengths = [len(ids) for ids in rows["input_ids"]]
    return DataLoader(rows, batch_sampler=batches(lengths, batch_size, None), collate_fn=collate, **options)


@torch.no_grad()
def evaluate_split(model: nn.Module, task: Task, loader: DataLoader, device: torch.device,
                   progress: Any = None, sharded: bool = False) -> dict[str, float]:
    """Scores on one validation split. Causal: token-weighted loss and ppl over label tokens.
    `sharded`: `loader` holds this process's shard (distributed.shard); totals are gathered."""
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
    if sharded:
        loss_sum, weight = distributed.sum_over_processes([loss_sum, weight])
    scores = {"loss": loss_sum / max(weight, 1)}
    if task.is_causal:
        scores["ppl"] = math.exp(min(scores["loss"], 50.0))
    else:
        pred, gold = _concatenated(predictions, sharded), _concatenated(labels, sharded)
        scores |= task.compute_metrics(pred, gold)
    return scores


def _concatenated(parts: list[torch.Tensor], sharded: bool) -> np.ndarray:
    """One array of a split's per-batch tensors, over every process's shard in rank order."""
    local = {str(i): t.cpu() for i, t in enumerate(parts)}
    shards = distributed.gather_tensors(local) if sharded else [local]
    return torch.cat([s[str(i)] for s in shards for i in range(len(s))]).numpy()


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
                     max_new_tokens: int, sharded: bool = False) -> list[str]:
    """Greedy continuations of `prompts`, one at a time (no padding subtleties for samples);
    `sharded`: each process decodes its share and every process gets all of them."""
    was_training = model.training
    model.eval()
    texts = []
    for prompt in distributed.shard(prompts) if sharded else prompts:
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    model.train(was_training)
    return [t for part in distributed.gather_json(texts) for t in part] if sharded else texts


def sharded_generate(model: nn.Module, tokenizer: Any, prompts: list[str], settings: GenerationConfig,
                     users: list[int] | None = None, **options: Any) -> list[str]:
    """`generation.generate` with its batches dealt out to the processes in turn and the
    outputs gathered: each batch holds the same prompts as in one process, so the outputs are
    the same, and every process does a share of the work (none waits for another)."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    mine = batches(lengths, settings.batch_size, users)[distributed.rank()::distributed.world_size()]
    decoded = {}
    for index in mine:
        texts = generate(model, tokenizer, [prompts[i] for i in index], settings,
                         users=None if users is None else [users[i] for i in index], **options)
        decoded |= {str(i): text for i, text in zip(index, texts)}
    found = {int(i): text for part in distributed.gather_json(decoded) for i, text in part.items()}
    return [found[i] for i in range(len(prompts))]
