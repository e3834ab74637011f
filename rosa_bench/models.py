"""Model options (conf/model/*.yaml) and the one function that loads a model + tokenizer.

Four sources: `hub` (any Hugging Face id, needs the network), `gguf_package` (a GGUF file
shipped in a Python package, converted once to safetensors and cached), `package` (a saved HF
folder shipped in a Python package) and `tiny` (random weights, offline tokenizer; for tests).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GgufConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

from rosa_bench.config import ModelConfig, _structured
from rosa_bench.errors import UserError, choices_error
from rosa_bench.methods.base import model_family

MODEL_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"
CAUSAL_LM, CLASSIFICATION, REGRESSION = "causal_lm", "classification", "regression"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "gpt2": GPT2Config, "llama": LlamaConfig, "bert": BertConfig, "roberta": RobertaConfig}
TINY_ENCODER_TOKENIZER = "minilm-l6"  # the option whose (offline) WordPiece tokenizer tiny encoders use
TINY_EOS = "<|endoftext|>"


def model_names() -> list[str]:
    """The `model=` options, read from conf/model so a new YAML file is a new choice."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml") if p.stem != "auto")


def _option(name: str) -> ModelConfig:
    if name not in model_names():
        raise choices_error("model", name, model_names())
    return _structured(ModelConfig, OmegaConf.load(MODEL_DIR / f"{name}.yaml"), f"model/{name}.yaml")


def resolve_model_config(model_cfg: ModelConfig, default_model: str) -> ModelConfig:
    """Turn `auto` into the dataset's default model and an unknown hub name into a hub id.

    Fields the user set on top of `auto` (dtype, cache_dir...) are kept."""
    if model_cfg.name == "auto":
        base = _structured(ModelConfig, OmegaConf.load(MODEL_DIR / "auto.yaml"), "model/auto.yaml")
        changed = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(ModelConfig)
                   if f.name != "name" and getattr(model_cfg, f.name) != getattr(base, f.name)}
        return dataclasses.replace(_option(default_model), **changed)
    if model_cfg.name in model_names():
        return model_cfg
    if model_cfg.source == "hub":
        return dataclasses.replace(model_cfg, hub_id=model_cfg.hub_id or model_cfg.name)
    raise choices_error("model", model_cfg.name, model_names())


def load_model(model_cfg: ModelConfig, kind: str,
               num_labels: int | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase, str]:
    """Load (model, tokenizer, family) for a task kind: causal_lm, classification or regression.

    The model comes back in eval mode; the tokenizer always has a pad token."""
    if kind == CAUSAL_LM and model_cfg.kind == "encoder":
        raise UserError(f"model {model_cfg.name!r} is an encoder; this task needs a causal model "
                        f"(e.g. smollm2-135m, gpt2, tiny-gpt2, tiny-llama)")
    model_cls, head = model_class(kind, num_labels)
    loaders = {"hub": _load_hub, "gguf_package": _load_gguf_package, "package": _load_package,
               "tiny": _load_tiny}
    if model_cfg.source not in loaders:
        raise choices_error("model.source", model_cfg.source, list(loaders))
    model, tokenizer = loaders[model_cfg.source](model_cfg, model_cls, head, _dtype(model_cfg.dtype))
    _ensure_pad(model, tokenizer)
    return model.eval(), tokenizer, model_cfg.family or model_family(model)


def enable_gradient_checkpointing(model: nn.Module, name: str) -> None:
    """Recompute every transformer block's activations in the backward (transformers' own
    mechanism, non-reentrant torch.utils.checkpoint): training memory drops to about one
    block's activations, gradients stay the same, a step costs about one more forward.

    Non-reentrant checkpointing needs no input that requires a gradient, so it works with
    frozen embeddings, and transformers' hook that makes the embeddings' output require one is
    removed again: it would add the first block's input-gradient work, which a run without
    checkpointing does not do. The recorded RNG state is replayed, so dropout draws the same
    masks. A wrapper (HF PEFT's PeftModel) is searched for the HF model inside it."""
    hf_model = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf_model is None or not hf_model.supports_gradient_checkpointing:
        kind = type(hf_model or model).__name__
        raise UserError(f"model {name!r} ({kind}) does not support gradient checkpointing; "
                        "set train.gradient_checkpointing=false")
    hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    hf_model.disable_input_require_grads()


def model_class(kind: str, num_labels: int | None) -> tuple[Any, dict[str, Any]]:
    """The Auto class and config kwargs that give the model the task's output head."""
    if kind == CAUSAL_LM:
        return AutoModelForCausalLM, {}
    if kind == REGRESSION:
        return AutoModelForSequenceClassification, {"num_labels": 1, "problem_type": "regression"}
    if kind == CLASSIFICATION:
        if not num_labels:
            raise ValueError("a classification model needs num_labels")
        return AutoModelForSequenceClassification, {"num_labels": num_labels}
    raise ValueError(f"unknown task kind {kind!r}")


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise choices_error("model.dtype", name, list(DTYPES))
    return DTYPES[name]


def _ensure_pad(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching and sequence classification need a pad id; reuse EOS rather than grow the vocab."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"tokenizer of {model.config.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id


def _from_folder(path: str | Path, cfg: ModelConfig, model_cls: Any, head: dict[str, Any],
                 dtype: torch.dtype) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    remote = cfg.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    model = model_cls.from_pretrained(path, dtype=dtype, trust_remote_code=remote, use_safetensors=True,
                                      **head)
    return model, tokenizer


def _load_hub(cfg: ModelConfig, model_cls: Any, head: dict[str, Any], dtype: torch.dtype):
    hub_id = cfg.hub_id or cfg.name
    try:
        return _from_folder(hub_id, cfg, model_cls, head, dtype)
    except OSError as err:
        offline = ", ".join(n for n in model_names() if _option(n).source != "hub")
        raise UserError(f"cannot load hub model {hub_id!r}: the Hugging Face hub is unreachable "
                        f"(or has no such model): {str(err).splitlines()[0]} Models that work "
                        f"offline: {offline}") from None


def _load_package(cfg: ModelConfig, model_cls: Any, head: dict[str, Any], dtype: torch.dtype):
    return _from_folder(package_dir(cfg) / (cfg.file or ""), cfg, model_cls, head, dtype)


def _load_gguf_package(cfg: ModelConfig, model_cls: Any, head: dict[str, Any], dtype: torch.dtype):
    return _from_folder(converted_gguf(cfg), cfg, model_cls, head, dtype)


def package_dir(cfg: ModelConfig) -> Path:
    """Where the weights package is installed, found without importing it (its import pulls in
    runtimes we do not need, and may fail)."""
    spec = importlib.util.find_spec(cfg.package) if cfg.package else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {cfg.name!r} needs the Python package {cfg.package!r}, which is not "
                        f"installed (see requirements-models.txt)")
    return Path(spec.submodule_search_locations[0])


def cache_folder(cfg: ModelConfig) -> Path:
    """model.cache_dir, else $ROSA_BENCH_CACHE, else ~/.cache/rosa_bench; then models/<name>."""
    root = cfg.cache_dir or os.environ.get("ROSA_BENCH_CACHE") or Path.home() / ".cache" / "rosa_bench"
    return Path(root).expanduser() / "models" / cfg.name


def converted_gguf(cfg: ModelConfig) -> Path:
    """The cached safetensors conversion of the package's GGUF file, made on first use.

    The folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written cache behind."""
    folder = cache_folder(cfg)
    if (folder / "config.json").is_file():
        return folder
    gguf_dir, gguf_file = package_dir(cfg), cfg.file or ""
    if not (gguf_dir / gguf_file).is_file():
        raise UserError(f"GGUF file {gguf_file!r} not found in package {cfg.package!r} ({gguf_dir})")
    print(f"converting {gguf_file} to safetensors in {folder} (once)", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
    try:
        _convert_gguf(gguf_dir, gguf_file, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # else another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Dequantize to a plain float32 model (trainable nn.Linear layers) and save it."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _load_tiny(cfg: ModelConfig, model_cls: Any, head: dict[str, Any], dtype: torch.dtype):
    """Random weights for the family, seeded so every run starts from the same model."""
    if cfg.family not in TINY_CONFIGS:
        raise choices_error("tiny model family", cfg.family, list(TINY_CONFIGS))
    tokenizer = tiny_tokenizer(cfg.family)
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    config = TINY_CONFIGS[cfg.family](vocab_size=len(tokenizer), **ids, **cfg.tiny, **head)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls.from_config(config)
    return model.to(dtype), tokenizer


def tiny_tokenizer(family: str) -> PreTrainedTokenizerBase:
    """Offline tokenizers: byte-level for causal families (no special tokens added, like GPT-2
    and SmolLM), MiniLM's WordPiece for encoders."""
    if family in ("bert", "roberta"):
        source = _option(TINY_ENCODER_TOKENIZER)
        tokenizer = AutoTokenizer.from_pretrained(package_dir(source) / (source.file or ""))
        if family == "roberta":  # RoBERTa has one token type: never feed segment ids
            tokenizer.model_input_names = ["input_ids", "attention_mask"]
        return tokenizer
    return _byte_tokenizer()


def _byte_tokenizer() -> PreTrainedTokenizerBase:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[TINY_EOS] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=TINY_EOS, eos_token=TINY_EOS,
                                   pad_token=TINY_EOS)
