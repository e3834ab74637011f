"""Typed schemas for the composed Hydra config, and the one function that validates it.

Hydra composes YAML from conf/; `validate` turns the result into dataclasses, rejecting
unknown keys, wrong types and out-of-range values with one clear line each. Method-specific
options live in each method's own `MethodConfig` subclass (see rosa_bench/methods/), so a new
method adds its fields without touching this file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rosa_bench.errors import UserError


@dataclass
class ModelConfig:
    """Where a model comes from. `name=auto` means the dataset's default model."""

    name: str = "auto"
    source: str = "hub"  # hub | gguf_package | package | tiny
    hub_id: str | None = None
    package: str | None = None  # python package that ships the weights (offline models)
    file: str | None = None  # file inside `package` (the GGUF file)
    kind: str | None = None  # causal | encoder; None: decided by the dataset
    family: str | None = None  # llama | gpt2 | bert | roberta ...; None: read from the HF config
    dtype: str = "float32"
    trust_remote_code: bool = False
    cache_dir: str | None = None  # where converted offline weights are cached
    tiny: dict[str, Any] = field(default_factory=dict)  # HF config kwargs for source=tiny


@dataclass
class GenerationConfig:
    """How a causal task's outputs are decoded for scoring (evaluate.py and periodic
    generation during training); each dataset's YAML sets its paper's protocol."""

    num_beams: int = 1
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # EOS is ignored before this many (benchmarks decode fixed lengths)
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_at_blank_line: bool = True  # cut the output at the first empty line
    batch_size: int = 16
    precision: str = "fp32"  # fp32 | bf16 | fp16: evaluate.py decodes with the weights in this dtype


@dataclass
class DatasetConfig:
    name: str = "e2e"
    task: str | None = None
    cache: str | None = None  # data root holding the official file layouts
    hub_id: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    default_model: str = "smollm2-135m"
    prompt: str = "{mr}\n"  # causal tasks: how the input is shown to the model
    num_samples_to_log: int = 2  # generations logged as text at each evaluation
    user_order: str = "sorted"  # datasets with users (dolly): how categories are numbered; see each dataset
    generation: GenerationConfig = field(default_factory=GenerationConfig)


@dataclass
class MethodConfig:
    """Options every method understands; methods subclass this for their own."""

    name: str = "lora"
    rank: Any = 8  # int, or a float in (0, 1) for methods that take a fraction of full rank
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None  # name patterns; None: the method's default per family
    train_head: bool = True
    # Protocol options (papers' original code trains more than the method itself):
    train_biases: str = "none"  # none | targets (the adapted layers' biases) | all (every non-head bias)
    train_norms: bool = False  # LayerNorm / RMSNorm weights and biases train too
    fused: str = "auto"  # auto: low-rank layers take the fused path where it applies | off: never


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8
    eval_batch_size: int | None = None
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    save_every: int = 0  # optimizer steps between checkpoints; 0: at epoch ends only
    precision: str = "fp32"  # fp32 | bf16 | fp16
    num_workers: int = 0
    head_lr: float | None = None  # the task head's own learning rate; None: train.lr
    init_from: str | None = None  # run folder whose trained weights this run starts from
    label_smoothing: float = 0.0  # training loss against smoothed targets (LoRA's GPT-2 E2E: 0.1)
    # recompute each transformer block's activations in the backward instead of keeping them
    # (transformers' activation checkpointing): less memory, the same gradients, a slower step
    gradient_checkpointing: bool = False


    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss/gradient instead of stopping
    resume: str = "auto"  # auto: resume only when no result-changing key differs | force
    keep_checkpoints: int = 2  # 'last' checkpoints kept: a damaged newest one falls back to the previous


@dataclass
class LoggingConfig:
    log_every: int = 10  # optimizer steps between train/ scalars
    eval_every: int = 0  # optimizer steps between evaluations; 0: at epoch ends only
    sample_max_new_tokens: int = 32
    eval_generate_every: int = 0  # optimizer steps between generation scores (BLEU, accuracy); 0: never
    eval_generate_max_prompts: int | None = 64  # prompts decoded each time; None: all
    progress: bool = True


@dataclass
class OutputConfig:
    path: str = "runs"
    name: str | None = None  # run folder name; None: derived from the overrides


@dataclass
class RunConfig:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    fnmodel: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SCHEDULERS = ("linear", "cosine", "constant")
PAPER_KEY = "paper"  # a preset's per-task tables, read through interpolation only
PRECISIONS = ("fp32", "bf16", "fp16")
FUSED_CHOICES = ("auto", "off")
RESUME_MODES = ("auto", "force")


def _structured(schema: type, section: Any, where: str) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        raise UserError(f"invalid config in '{where}': {msg}") from None


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{where}={value!r} is not allowed; choose one of: {', '.join(choices)}")


def _check_positive(where: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def _resolved(cfg: DictConfig | dict) -> DictConfig:
    """Interpolations resolved against the whole config, then the `paper` key dropped: paper
    presets keep per-task tables there (`train.lr: ${paper.lr.${dataset.task}}`)."""
    try:
        data = OmegaConf.to_container(OmegaConf.create(cfg), resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"invalid config: {str(err).splitlines()[0]}") from None
    data.pop(PAPER_KEY, None)
    return OmegaConf.create(data)


def _check_finite(where: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise UserError(f"{where}={value!r} must be a finite number")


MAX_SEED = 2**32 - 1  # numpy's legacy seeding (set_seed) takes 0 .. 2**32 - 1


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"seed={value!r} must be an integer")
    if not 0 <= value <= MAX_SEED:
        raise UserError(f"seed={value!r} must be in [0, {MAX_SEED}]")
    return value


def _check_method_common(cfg: MethodConfig) -> None:
    """Options of every method that would silently train something else."""
    _check_finite("fnmodel.alpha", cfg.alpha)
    _check_choice("fnmodel.fused", cfg.fused, FUSED_CHOICES)
    if cfg.alpha <= 0:
        raise UserError(f"fnmodel.alpha={cfg.alpha!r} must be > 0 (0 makes every update zero)")
    if cfg.targets is None:
        return
    if not cfg.targets:
        raise UserError("fnmodel.targets=[] selects no layer; list name patterns, or drop it for "
                        "the method's default targets")
    for pattern in cfg.targets:
        try:
            re.compile(pattern)
        except re.error as err:
            raise UserError(f"fnmodel.targets: {pattern!r} is not a valid regular expression "
                            f"({err})") from None


def _check_output(out: OutputConfig) -> None:
    """A run name is one folder inside output.path: it cannot climb out or be absolute."""
    if out.name is None:
        return
    parts = PurePath(out.name).parts
    if not out.name or len(parts) != 1 or parts[0] in (".", "..") or "\\" in out.name or "\0" in out.name:
        raise UserError(f"output.name={out.name!r} must be a plain folder name (no '/', '..' or "
                        "absolute path): the run folder always lies inside output.path")


def validate(cfg: DictConfig | dict) -> RunConfig:
    """Check a composed config and return it as typed dataclasses (raises UserError)."""
    from rosa_bench.data import dataset_names
    from rosa_bench.methods import method_class

    cfg = _resolved(cfg)
    known = {"seed", "model", "dataset", "fnmodel", "train", "logging", "output"}
    extra = sorted(set(cfg.keys()) - known)
    if extra:
        raise UserError(f"unknown top-level config keys {extra}; allowed: {sorted(known)}")
    method_cls = method_class(str(cfg.fnmodel.name))  # raises on an unknown method
    if str(cfg.dataset.name) not in dataset_names():
        from rosa_bench.errors import choices_error

        raise choices_error("dataset", cfg.dataset.name, dataset_names())
    run = RunConfig(
        seed=_seed(cfg.get("seed", 0)),
        model=_structured(ModelConfig, cfg.model, "model"),
        dataset=_structured(DatasetConfig, cfg.dataset, "dataset"),
        fnmodel=_structured(method_cls.config_class, cfg.fnmodel, "fnmodel"),
        train=_structured(TrainConfig, cfg.train, "train"),
        logging=_structured(LoggingConfig, cfg.logging, "logging"),
        output=_structured(OutputConfig, cfg.output, "output"),
    )
    t = run.train
    _check_choice("train.scheduler", t.scheduler, SCHEDULERS)
    _check_choice("train.precision", t.precision, PRECISIONS)
    _check_choice("train.resume", t.resume, RESUME_MODES)
    for key in ("lr", "weight_decay", "max_grad_norm", "warmup_ratio", "label_smoothing"):
        _check_finite(f"train.{key}", getattr(t, key))
    _check_positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _check_positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True)
    _check_positive("train.keep_checkpoints", t.keep_checkpoints)
    for key in ("epochs", "batch_size", "grad_accum", "lr"):
        _check_positive(f"train.{key}", getattr(t, key))
    _check_positive("train.max_steps", t.max_steps)
    _check_positive("train.eval_batch_size", t.eval_batch_size)
    _check_positive("train.head_lr", t.head_lr)
    _check_positive("train.save_every", t.save_every, allow_zero=True)
    _check_positive("logging.eval_every", run.logging.eval_every, allow_zero=True)
    _check_positive("logging.log_every", run.logging.log_every)
    _check_positive("logging.eval_generate_every", run.logging.eval_generate_every, allow_zero=True)
    _check_positive("logging.eval_generate_max_prompts", run.logging.eval_generate_max_prompts)
    for key in ("num_beams", "max_new_tokens", "batch_size"):
        _check_positive(f"dataset.generation.{key}", getattr(run.dataset.generation, key))
    _check_positive("dataset.generation.no_repeat_ngram_size", run.dataset.generation.no_repeat_ngram_size,
                    allow_zero=True)
    _check_choice("dataset.generation.precision", run.dataset.generation.precision, PRECISIONS)
    if not 0.0 <= t.label_smoothing < 1.0:
        raise UserError(f"train.label_smoothing={t.label_smoothing!r} must be in [0, 1)")
    if not 0.0 <= t.warmup_ratio < 1.0:
        raise UserError(f"train.warmup_ratio={t.warmup_ratio!r} must be in [0, 1)")
    if not 0.0 <= run.fnmodel.dropout < 1.0:
        raise UserError(f"fnmodel.dropout={run.fnmodel.dropout!r} must be in [0, 1)")
    _check_output(run.output)
    _check_method_common(run.fnmodel)
    method_cls.check_config(run.fnmodel)
    from rosa_bench.data import check_dataset_config

    check_dataset_config(run.dataset)
    return run
