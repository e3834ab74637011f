"""Batched generation for scoring: prompts sorted by length and left-padded, so each batch
decodes together with the KV cache and little padding; outputs come back in prompt order."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig as HFGenerationConfig

from rosa_bench.config import GenerationConfig
from rosa_bench.methods.base import fixed_side_inputs

BLANK_LINE = re.compile(r"\n\s*\n")


def hf_config(settings: GenerationConfig, tokenizer: Any) -> HFGenerationConfig:
    """A fresh HF config (no sampling defaults inherited from the checkpoint): greedy or beam."""
    return HFGenerationConfig(
        do_sample=False, num_beams=settings.num_beams, max_new_tokens=settings.max_new_tokens,
        min_new_tokens=settings.min_new_tokens or None,
        length_penalty=settings.length_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
        early_stopping=settings.num_beams > 1, use_cache=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def clean(text: str, stop_at_blank_line: bool) -> str:
    """The generation up to its first blank line (when asked), without outer whitespace."""
    if stop_at_blank_line:
        text = BLANK_LINE.split(text, 1)[0]
    return text.strip()


def batches(lengths: list[int], batch_size: int, users: list[int] | None) -> list[list[int]]:
    """Prompt indices in batches of similar length (longest first); with `users`, each batch
    holds one user's prompts only."""
    groups: dict[int, list[int]] = {}
    for i in range(len(lengths)):
        groups.setdefault(users[i] if users is not None else 0, []).append(i)
    out = []
    for _, index in sorted(groups.items()):
        index.sort(key=lambda i: lengths[i], reverse=True)
        out += [index[s:s + batch_size] for s in range(0, len(index), batch_size)]
    return out


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str], settings: GenerationConfig,
             device: torch.device | str | None = None, progress: bool = True,
             desc: str = "generate", users: list[int] | None = None) -> list[str]:
    """Decode every prompt with `settings`; prompts are tokenized as in training (the
    tokenizer's own special tokens), and the continuation alone is returned. `users` (one id
    per prompt) routes each prompt to its user's adapters (ColA with collab=alone)."""
    device = device or next(model.parameters()).device
    config = hf_config(settings, tokenizer)
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    outputs: list[str] = [""] * len(prompts)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    try:
        bar = tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True)
        for index in batches([len(e) for e in encoded], settings.batch_size, users):
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt").to(device)
            user = {} if users is None else {"user": torch.tensor([users[index[0]]])}
            with fixed_side_inputs(model, **user):
                out = model.generate(**batch, generation_config=config)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(index, texts):
                outputs[i] = clean(text, settings.stop_at_blank_line)
            bar.update(len(index))
        bar.close()
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
