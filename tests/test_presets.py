"""Paper presets (conf/experiment) and the protocol options they set: every preset composes and
trains two optimizer steps on a tiny model of its architecture family; each option changes
exactly the trainable set it names (counted); train.init_from restores the source run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rosa_bench
from rosa_bench import runs
from rosa_bench.cli import CONF_DIR
from rosa_bench.errors import UserError
from rosa_bench.methods.base import is_head
from rosa_bench.methods.cola import mlp_widths, user_kinds
from rosa_bench.methods.rosa import pick_directions
from rosa_bench.models import load_model
from rosa_bench.pipeline import build, resolve, train
from rosa_bench.train.checkpoint import load_model_state
from rosa_bench.train.init_from import load_initial_weights
from rosa_bench.train.loop import Trainer
from tests.test_config import composed

PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
TINY = {"gpt2": "tiny-gpt2", "roberta": "tiny-roberta", "llama": "tiny-llama"}
SMALL = ["dataset.max_train_samples=8", "dataset.max_eval_samples=4", "train.batch_size=2",
         "train.eval_batch_size=2", "train.max_steps=2", "train.grad_accum=1", "train.precision=fp32",
         "logging.progress=false", "logging.sample_max_new_tokens=2", "dataset.max_length=128"]


def preset_overrides(preset: str, tmp_path: Path) -> list[str]:
    family = composed([f"+experiment={preset}"]).model.family
    extra = ["fnmodel.rank=8"] if preset == "loraxs_math" else []  # rank 64 > the tiny model's 32
    return [f"+experiment={preset}", f"model={TINY[family]}", *SMALL, *extra, f"output.path={tmp_path}"]


def test_every_paper_has_its_presets():
    assert {"lora_e2e", "lora_glue", "rosa_e2e", "rosa_eli5", "rosa_glue", "loraxs_glue", "loraxs_math",
            "rocoft_glue", "cola_dolly", "cola_glue"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_two_steps_on_a_tiny_model_of_its_family(preset, tmp_path):
    overrides = preset_overrides(preset, tmp_path)
    paper = composed([f"+experiment={preset}"])
    run = composed(overrides)
    kept = {k: v for k, v in vars(paper.fnmodel).items() if k not in ("rank", "alpha")}  # loraxs_math: r
    assert kept == {k: v for k, v in vars(run.fnmodel).items() if k in kept}
    folder = train(run, overrides[:-1])
    metrics = runs.read_metrics(folder)
    assert metrics["complete"] and metrics["global_step"] == 2


def test_per_task_tables_pick_the_tasks_values():
    cola = composed(["+experiment=lora_glue", "dataset.task=cola"]).train
    mnli = composed(["+experiment=lora_glue", "dataset.task=mnli"]).train
    assert (cola.lr, cola.batch_size, cola.epochs) == (4e-4, 32, 80)
    assert (mnli.lr, mnli.batch_size, mnli.epochs) == (5e-4, 16, 30)
    assert composed(["+experiment=loraxs_math"]).fnmodel.alpha == 64  # alpha = r


# ---- protocol options: each changes exactly the trainable set it names --------------------------
def tiny(model: str, num_labels: int = 2):
    run = composed([f"model={model}"])
    return load_model(run.model, "causal_lm" if model == "tiny-llama" else "classification", num_labels)[0]


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_train_biases_targets_adds_exactly_the_adapted_layers_biases():
    base = trainable(rosa_bench.apply(tiny("tiny-roberta"), "lora", train_head=False))
    model = rosa_bench.apply(tiny("tiny-roberta"), "lora", train_head=False, train_biases="targets")
    added = set(trainable(model)) - set(base)
    assert added and added == {f"{n}.base_layer.bias" for n, _ in
                               rosa_bench.attached_method(model).adapter_layers(model)}


def test_train_biases_all_adds_every_bias_outside_the_head():
    base = trainable(rosa_bench.apply(tiny("tiny-roberta"), "lora", train_head=False))
    model = rosa_bench.apply(tiny("tiny-roberta"), "lora", train_head=False, train_biases="all")
    added = set(trainable(model)) - set(base)
    assert added == {n for n, _ in model.named_parameters() if n.endswith(".bias") and not is_head(n)}


def test_train_norms_adds_exactly_the_rmsnorm_weights():
    base = trainable(rosa_bench.apply(tiny("tiny-llama"), "rocoft"))
    model = rosa_bench.apply(tiny("tiny-llama"), "rocoft", train_norms=True)
    added = set(trainable(model)) - set(base)
    assert added == {n for n, _ in model.named_parameters() if "norm" in n}
    assert sum(trainable(model).values()) - sum(base.values()) == 5 * 32  # 2 layers x 2 + final, width 32


def test_rocoft_adapt_head_trains_k_rows_of_each_head_linear():
    model = rosa_bench.apply(tiny("tiny-roberta", num_labels=3), "rocoft", rank=2, train_head=False,
                             adapt_head=True)
    head = {n: c for n, c in trainable(model).items() if is_head(n)}
    # RoBERTa's head: dense (32 -> 32) and out_proj (32 -> 3): 2 rows of 32 inputs each.
    assert head == {"classifier.dense.rocoft_delta": 2 * 32, "classifier.out_proj.rocoft_delta": 2 * 32}
    with pytest.raises(UserError, match="adapt_head=true"):
        composed(["fnmodel=rocoft", "fnmodel.adapt_head=true"])


def test_rocoft_adapt_head_unties_lm_head_and_keeps_the_function():
    torch.manual_seed(0)
    plain = tiny("tiny-llama")
    plain.config.tie_word_embeddings = True
    plain.tie_weights()
    ids = torch.randint(0, 100, (2, 6))
    before = plain(input_ids=ids).logits
    model = rosa_bench.apply(plain, "rocoft", rank=1, train_head=False, adapt_head=True)
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert "lm_head.rocoft_delta" in trainable(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_rocoft_prune_keep_first_always_keeps_index_zero():
    model = rosa_bench.apply(tiny("tiny-roberta"), "rocoft", rank=2, mode="column", select="prune",
                             prune_keep_first=True, select_largest=False)
    batches = [{"input_ids": torch.randint(5, 100, (2, 8))} for _ in range(2)]
    method = rosa_bench.attached_method(model)
    method.calibrate(model, batches)
    assert all(0 in layer.rocoft_index.tolist() for _, layer in method.adapter_layers(model))


def test_head_lr_gives_the_head_its_own_group(tmp_path):
    run = composed(["model=tiny-roberta", "dataset=glue", "fnmodel=loraxs", "train.lr=1e-3",
                    "train.head_lr=5e-3", "dataset.max_train_samples=4", "dataset.max_eval_samples=2"])
    parts = build(resolve(run))
    trainer = Trainer(run, tmp_path, parts.model, parts.tokenizer, parts.task, parts.method)
    groups = trainer._param_groups()
    head_ids = {id(p) for n, p in parts.model.named_parameters() if is_head(n)}
    by_lr = {lr: {id(p) for g in groups if g["lr"] == lr for p in g["params"]} for lr in (1e-3, 5e-3)}
    assert by_lr[5e-3] == head_ids and not by_lr[1e-3] & head_ids
    assert sum(len(g["params"]) for g in groups) == len(parts.method.optimizer_parameters(parts.model))


# ---- method-specific protocol options ------------------------------------------------------------
def test_rosa_random_block_never_starts_last_when_asked():
    g = torch.Generator().manual_seed(0)
    starts = {int(pick_directions("random", 3, 10, g, last_start=False)[0]) for _ in range(300)}
    assert starts == set(range(7))


def test_rosa_singular_values_on_the_input_side_keep_the_split_exact():
    model = rosa_bench.apply(tiny("tiny-roberta"), "rosa", rank=4, singular_values="input")
    for _, layer in rosa_bench.attached_method(model).adapter_layers(model):
        u_norms = layer.rosa_B.norm(dim=0)  # B = U[:, idx]: orthonormal columns
        torch.testing.assert_close(u_norms, torch.ones_like(u_norms))


def test_rosa_reset_optimizer_all_forgets_every_parameter():
    class Recorder:
        accelerator = type("A", (), {"unwrap_model": staticmethod(lambda m: m)})()
        logger = type("L", (), {"scalar": staticmethod(lambda *a: None)})()
        global_step = 0

        def reset_optimizer_state(self, params):
            self.reset = {id(p) for p in params}

    for scope in ("resampled", "all"):
        model = rosa_bench.apply(tiny("tiny-roberta"), "rosa", rank=2, reset_optimizer=scope)
        method, trainer = rosa_bench.attached_method(model), Recorder()
        trainer.model = model
        method._resample_during_training(trainer, 1)
        everything = {id(p) for p in method.optimizer_parameters(model)}
        rosa = {id(p) for n, p in model.named_parameters() if "rosa_" in n}
        assert trainer.reset == (everything if scope == "all" else rosa) and rosa < everything


def test_loraxs_transposed_fan_uses_the_originals_bounds():
    torch.manual_seed(0)
    model = rosa_bench.apply(tiny("tiny-roberta"), "loraxs", rank=4, init="random", random_fan="transposed")
    layer = rosa_bench.attached_method(model).adapter_layers(model)[0][1]
    # Kaiming-uniform(a=sqrt 5) bound is 1/sqrt(fan_in): B^T (4, out=32) -> 1/sqrt(32); A^T (in, 4) -> 1/2.
    assert layer.lora_xs_B.abs().max() <= 32 ** -0.5 < layer.lora_xs_A.abs().max() <= 0.5


def test_cola_blocks_and_mlp_shapes_follow_the_original():
    assert user_kinds(["lowrank", "linear"], 8, "blocks") == ["lowrank"] * 4 + ["linear"] * 4
    assert user_kinds(["lowrank", "linear"], 4, "interleave") == ["lowrank", "linear"] * 2
    cfg = composed(["+experiment=cola_dolly"]).fnmodel
    assert mlp_widths(cfg) == [128, 256]
    model = rosa_bench.apply(tiny("tiny-roberta"), "cola", adapter="mlp", hidden=4, mlp_layers=2,
                             mlp_activation="relu", train_head=False)
    adapter = rosa_bench.attached_method(model).sites[0].adapters[0]
    assert [tuple(m.weight.shape) for m in adapter.modules() if isinstance(m, torch.nn.Linear)] == \
        [(4, 32), (8, 4), (32, 8)]
    assert isinstance(adapter.hidden[1], torch.nn.ReLU)


# ---- train.init_from -----------------------------------------------------------------------------------
def _source_run(tmp_path: Path, *extra: str):
    overrides = ["model=tiny-roberta", "dataset=glue", "dataset.task=rte", "fnmodel=rosa", "fnmodel.rank=2",
                 *SMALL, *extra, f"output.path={tmp_path}"]
    return composed(overrides), overrides[:-1]


def test_init_from_reproduces_the_source_runs_outputs(tmp_path):
    run, overrides = _source_run(tmp_path)
    source = train(run, overrides)
    trained = build(resolve(run))  # the source run's model as its checkpoint holds it
    trained.method.load_checkpoint_state(trained.model, load_model_state(runs.checkpoint_dir(source, "last")))
    target_run, _ = _source_run(tmp_path, f"train.init_from='{source}'", "seed=1")
    target = build(resolve(target_run))
    assert load_initial_weights(resolve(target_run), target.model, target.method) == []
    batch = target.task.collate([target.task.splits["validation"][i] for i in range(2)])
    batch.pop("labels")
    trained.model.eval()
    target.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(target.model(**batch).logits, trained.model(**batch).logits)


def test_init_from_rejects_another_rank_and_lets_another_head_start_fresh(tmp_path):
    run, overrides = _source_run(tmp_path)
    source = train(run, overrides)
    other, _ = _source_run(tmp_path, f"train.init_from='{source}'", "fnmodel.rank=3")
    parts = build(resolve(other))
    with pytest.raises(UserError, match="fnmodel.rank=2"):
        load_initial_weights(resolve(other), parts.model, parts.method)
    stsb, _ = _source_run(tmp_path, f"train.init_from='{source}'", "dataset.task=stsb")  # 1 output, not 2
    parts = build(resolve(stsb))
    assert load_initial_weights(resolve(stsb), parts.model, parts.method) == [
        "classifier.out_proj.bias", "classifier.out_proj.weight"]
