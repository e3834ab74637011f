"""evaluate.py end to end on tiny models and real rows: every file and score is written, bad
input stops with one line, a crash while decoding leaves no score file, batched generation
matches one-at-a-time generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rosa_bench import evaluate as ev
from rosa_bench.config import GenerationConfig
from rosa_bench.errors import UserError
from rosa_bench.evaluate import evaluate_run
from rosa_bench.generation import generate
from rosa_bench.models import load_model
from rosa_bench.pipeline import build, resolve, train
from tests.test_config import composed
from tests.test_train import tags

ROOT = Path(__file__).resolve().parents[1]


def trained(tmp_path: Path, *extra: str) -> Path:
    overrides = ["dataset.max_train_samples=24", "dataset.max_eval_samples=12", "train.batch_size=4",
                 "train.max_steps=4", "train.lr=5e-3", "fnmodel=full", "logging.progress=false",
                 *extra, f"output.path={tmp_path}"]
    return train(composed(overrides), overrides[:-1])


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory) -> Path:
    return trained(tmp_path_factory.mktemp("e2e"), "model=tiny-gpt2", "dataset=e2e",
                   "dataset.generation.num_beams=2", "dataset.generation.max_new_tokens=8")


@pytest.mark.slow  # METEOR 1.5 starts a JVM and loads its paraphrase tables (~20 s)
def test_e2e_writes_every_file_and_score(e2e_run):
    result = evaluate_run(e2e_run, "test", "best", max_samples=2, progress=False)
    saved = json.loads((e2e_run / "eval_test.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["metric"] == "e2e" and saved["generation"]["num_beams"] == 2
    assert {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "loss", "ppl"} <= set(saved["scores"])
    predictions = (e2e_run / "predictions_test.txt").read_text().splitlines()
    groups = (e2e_run / "references_test.txt").read_text().rstrip("\n").split("\n\n")
    assert len(predictions) == len(groups) == 2  # two distinct MRs, each with all its references
    rows = [json.loads(line) for line in (e2e_run / "predictions_test.jsonl").read_text().splitlines()]
    assert [r["references"] for r in rows] == [g.split("\n") for g in groups]
    assert rows[0]["source"].startswith("name[") and rows[0]["prompt"] == rows[0]["source"] + "\n"
    found = tags(e2e_run)
    assert {"test/BLEU", "test/NIST", "test/METEOR", "test/ROUGE_L", "test/CIDEr"} <= set(found)
    assert found["test/BLEU"] == [saved["step"]]


def test_e2e_references_are_grouped_by_meaning_representation(e2e_run):
    parts = build(resolve(ev.runs.read_config(e2e_run)))
    gen = parts.task.generation_sets["test"]
    raw = parts.task.raw["test"]
    assert len(gen.prompts) == len(set(raw["mr"])) and sum(map(len, gen.references)) == len(raw)


def test_no_loss_scores_the_generations_without_the_reference_rows_pass(e2e_run, monkeypatch, tmp_path):
    def loss_pass(*args, **kwargs):
        raise AssertionError("the loss pass ran")

    monkeypatch.setattr(ev, "evaluate_split", loss_pass)
    run = shutil.copytree(e2e_run, tmp_path / "run")  # the shared run stays without score files
    result = evaluate_run(run, "validation", "last", max_samples=1, progress=False, loss=False)
    assert "loss" not in result["scores"] and "loss_rows" not in result["scored"]
    assert {"BLEU", "ROUGE_L"} <= set(result["scores"]) and result["scored"]["inputs"] == 1


def test_crash_while_decoding_leaves_no_score_file(e2e_run, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-decoding")

    monkeypatch.setattr(ev, "generate", crash)
    with pytest.raises(RuntimeError):
        evaluate_run(e2e_run, "validation", "last", max_samples=1, progress=False)
    assert not (e2e_run / "eval_validation.json").exists()
    assert not list(e2e_run.glob("*validation*"))


@pytest.mark.parametrize("args,message", [
    (["--run", "/no/such/run"], "does not exist"),
    (["--split", "dev"], "unknown split of dataset e2e 'dev'; choose one of: test, validation"),
    (["--checkpoint", "final"], "unknown checkpoint 'final'; choose one of: best, last"),
    (["--max-samples", "0"], "--max-samples=0 must be > 0"),
])
def test_bad_input_exits_2_with_one_line(e2e_run, args, message, capsys):
    import evaluate as cli

    argv = ["--run", str(e2e_run), *args] if args[0] != "--run" else args
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0]
    assert "Traceback" not in err


def test_cli_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "evaluate.py", "--run", "/no/such/run"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "/no/such/run does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_without_checkpoint(tmp_path, e2e_run):
    folder = tmp_path / "empty_run"
    folder.mkdir()
    (folder / "config.yaml").write_text((e2e_run / "config.yaml").read_text())
    with pytest.raises(UserError, match="no 'best' checkpoint.*none"):
        evaluate_run(folder, "test")
    with pytest.raises(UserError, match="config.yaml is missing"):
        evaluate_run(tmp_path, "test")


def test_batched_left_padded_generation_matches_one_at_a_time():
    model, tokenizer, _ = load_model(resolve(composed(["model=tiny-llama"])).model, "causal_lm")
    prompts = ["name[The Eagle]\n", "name[Cotto], eatType[pub], food[Chinese], area[riverside]\n", "x\n"]
    for beams in (1, 3):
        settings = GenerationConfig(num_beams=beams, max_new_tokens=6, stop_at_blank_line=False, batch_size=3)
        batched = generate(model, tokenizer, prompts, settings, progress=False)
        single = [generate(model, tokenizer, [p], settings, progress=False)[0] for p in prompts]
        assert batched == single
        assert any(batched)


def test_glue_scores_and_submission_file(tmp_path):
    folder = trained(tmp_path, "model=tiny-bert", "dataset=glue", "dataset.task=rte")
    result = evaluate_run(folder, "validation", "last", progress=False)
    assert 0 <= result["scores"]["accuracy"] <= 1
    lines = (folder / "predictions_validation.tsv").read_text().splitlines()
    # the run validated on 12 rows (dataset.max_eval_samples=12); evaluation scores all 277
    assert lines[0] == "index\tprediction" and len(lines) == 278
    assert result["scored"] == {"inputs": 277, "inputs_in_split": 277}
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}
    evaluate_run(folder, "test", "last", max_samples=5, progress=False)
    test = (folder / "predictions_test.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in test[1:]] == ["0", "1", "2", "3", "4"]
    assert json.loads((folder / "eval_test.json").read_text())["scores"] == {}


def test_gsm8k_pipeline_and_generation_curves_during_training(tmp_path):
    folder = trained(tmp_path, "model=tiny-llama", "dataset=gsm8k", "dataset.max_length=64",
                     "dataset.generation.max_new_tokens=8",
                     "logging.eval_generate_every=2", "logging.eval_generate_max_prompts=2")
    assert tags(folder)["valid/accuracy"] == [2, 4]
    result = evaluate_run(folder, "test_math", "last", max_samples=3, progress=False)
    assert result["metric"] == "math" and "last \\boxed{}" in result["scores"]["extraction"]
    assert (folder / "predictions_test_math.jsonl").is_file()


@pytest.fixture
def cheap_e2e_scorer(monkeypatch):
    """The E2E scorer without METEOR's JVM: counts what it was given."""
    def count(predictions, references):
        return {"predictions": float(len(predictions)), "references": float(sum(map(len, references)))}

    monkeypatch.setitem(ev.GENERATION_SCORERS, "e2e", count)


def test_training_time_cap_does_not_shrink_the_evaluated_split(e2e_run, cheap_e2e_scorer, capsys):
    """The run validated on 12 reference rows (dataset.max_eval_samples=12, under two MRs);
    --max-samples 3 must score 3 test MRs with all their references, and say so."""
    import evaluate as cli

    cli.main(["--run", str(e2e_run), "--split", "test", "--max-samples", "3", "--no-progress"])
    saved = json.loads((e2e_run / "eval_test.json").read_text())
    test_mrs = [line.split('",')[0] for line in (ROOT.parent / "shared" / "data" / "e2e" /
                                                 "testset_w_refs.csv").read_text().splitlines()[1:]]
    first_three = dict.fromkeys(test_mrs)
    refs = sum(test_mrs.count(mr) for mr in list(first_three)[:3])
    assert saved["scored"] == {"inputs": 3, "inputs_in_split": 630, "references": refs, "loss_rows": refs}
    assert saved["scores"]["predictions"] == 3 and saved["scores"]["references"] == refs
    assert f"test: scored 3 of 630 meaning representations ({refs} references); loss on {refs}" \
        in capsys.readouterr().out


def test_decoding_overrides_are_recorded_and_named(e2e_run, cheap_e2e_scorer):
    plain = evaluate_run(e2e_run, "validation", "last", max_samples=2, progress=False)
    beams = evaluate_run(e2e_run, "validation", "last", max_samples=2, progress=False,
                         overrides=["dataset.generation.num_beams=1", "dataset.generation.max_new_tokens=3",
                                    "dataset.generation.batch_size=1"])
    name = "validation,max_new_tokens=3,num_beams=1"
    assert plain["files"]["eval"] == "eval_validation.json" and beams["files"]["eval"] == f"eval_{name}.json"
    saved = json.loads((e2e_run / f"eval_{name}.json").read_text())
    assert saved["generation"]["num_beams"] == 1 and saved["generation"]["max_new_tokens"] == 3
    assert saved["overrides"][0] == "dataset.generation.num_beams=1"
    assert json.loads((e2e_run / "eval_validation.json").read_text())["generation"]["num_beams"] == 2
    for stem in ("predictions_validation", f"predictions_{name}"):
        assert (e2e_run / f"{stem}.jsonl").is_file() and (e2e_run / f"{stem}.txt").is_file()
    assert "valid,max_new_tokens=3,num_beams=1/predictions" in tags(e2e_run)


@pytest.mark.parametrize("override,message", [
    ("fnmodel.rank=4", "'fnmodel.rank=4' would change the trained model"),
    ("model.name=gpt2", "'model.name=gpt2' would change the trained model"),
    ("fnmodel.name=rosa", "'fnmodel.name=rosa' would change the trained model"),
    ("dataset.prompt=x", "accepts only: dataset.generation.<key>"),
    ("dataset.generation.num_beam=3", "num_beam"),
    ("dataset.generation.num_beams=0", "dataset.generation.num_beams=0 must be > 0"),
    ("num_beams", "'num_beams' is not key=value"),
])
def test_overrides_that_change_the_model_are_refused(e2e_run, override, message, capsys):
    import evaluate as cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--run", str(e2e_run), override])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], errors


def test_runs_log_hparams_best_and_test_scores_for_tensorboard(tmp_path, cheap_e2e_scorer):
    """Each run folder is an HParams session: its hyperparameters, best validation scores
    (best/<score>) and the test scores evaluate.py adds (test/<score>) are metric columns."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.metadata import parse_session_start_info_plugin_data

    folder = trained(tmp_path, "model=tiny-gpt2", "dataset=e2e", "fnmodel=lora", "fnmodel.rank=2",
                     "seed=3", "dataset.generation.max_new_tokens=2", "dataset.generation.num_beams=1")
    evaluate_run(folder, "test", "best", max_samples=1, progress=False)
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
               for k, v in parse_session_start_info_plugin_data(content).hparams.items()}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {k: hparams[k] for k in ("method", "model", "task", "seed", "rank", "alpha", "lr")} == {
        "method": "lora", "model": "tiny-gpt2", "task": "e2e", "seed": 3, "rank": 2, "alpha": 16, "lr": 5e-3}
    assert hparams["trainable_params"] == metrics["trainable_params"] == 2 * 2 * (32 + 96)
    best = {tag: acc.Scalars(tag)[-1] for tag in acc.Tags()["scalars"] if tag.startswith("best/")}
    assert best["best/loss"].value == pytest.approx(metrics["best"]["value"])
    assert best["best/loss"].step == metrics["best"]["step"]
    assert "test/predictions" in acc.Tags()["scalars"]


# Loads our scorers with Hugging Face's `evaluate` in a process outside the repository (whose
# evaluate.py would shadow the package) and prints their results as JSON.
MODULE_LOADER = """
import json, sys
import evaluate
sys.path.append(sys.argv[1])
from rosa_bench.evaluate_modules import module_path
out = {}
for key, (predictions, references) in json.loads(sys.argv[2]).items():
    name, _, task = key.partition("/")
    module = evaluate.load(module_path(name), task or None)
    out[key] = module.compute(predictions=predictions, references=references)
print(json.dumps(out))
"""
NLG_PREDICTIONS = ["The Eagle is a cheap coffee shop near Burger King.",
                   "Cotto serves Chinese food in the riverside."]
NLG_REFERENCES = [["The Eagle is a low-priced coffee shop near Burger King.",
                   "Near Burger King, The Eagle is cheap."],
                  ["Cotto is a Chinese pub by the riverside."]]
MODULE_CASES = {
    "rouge": (NLG_PREDICTIONS, NLG_REFERENCES),
    "gsm8k": (["3 + 4 = 7. The answer is: 7", "The answer is: $1,200 dollars", "no idea"],
              ["Natalia sold 4 + 3 clips.\n#### 7", "1200", "#### 5"]),
    "math": (["so \\boxed{\\frac12}", "The answer is: 3", "\\boxed{x^2}"],
             ["hence $\\boxed{\\frac{1}{2}}$", "\\boxed{3}", "\\boxed{x^3}"]),
    "glue/mrpc": ([0, 1, 1, 0, 1], [0, 1, 0, 0, 1]),
    "glue/cola": ([0, 1, 1, 0, 1], [0, 1, 0, 0, 0]),
    "glue/stsb": ([0.5, 2.5, 4.0, 1.0], [0.0, 3.0, 3.5, 1.5]),
}


def scores_through_evaluate(tmp_path: Path, cases: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", MODULE_LOADER, str(ROOT), json.dumps(cases)], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def our_scores(key: str, predictions: list, references: list) -> dict:
    from rosa_bench.metrics import GENERATION_SCORERS, glue_metrics

    name, _, task = key.partition("/")
    if name == "glue":
        return glue_metrics(task, predictions, references)
    groups = [[r] if isinstance(r, str) else r for r in references]
    return GENERATION_SCORERS[name](predictions, groups)


def test_scorers_load_offline_as_evaluate_modules_with_our_numbers(tmp_path):
    found = scores_through_evaluate(tmp_path, MODULE_CASES)
    for key, (predictions, references) in MODULE_CASES.items():
        assert found[key] == json.loads(json.dumps(our_scores(key, predictions, references))), key
    assert found["gsm8k"]["accuracy"] == pytest.approx(200 / 3) and found["glue/mrpc"]["accuracy"] == 0.8


@pytest.mark.slow  # METEOR's JVM, twice
def test_e2e_scorer_loads_offline_as_an_evaluate_module(tmp_path):
    found = scores_through_evaluate(tmp_path, {"e2e": (NLG_PREDICTIONS, NLG_REFERENCES)})
    expected = our_scores("e2e", NLG_PREDICTIONS, NLG_REFERENCES)
    assert found["e2e"] == json.loads(json.dumps(expected)) and expected["BLEU"] > 0


def test_decoding_precision_casts_for_generation_only(e2e_run, cheap_e2e_scorer, monkeypatch, tmp_path):
    """dataset.generation.precision=bf16: the loss pass runs in fp32, the decoding in bf16, and
    the score file is named and recorded with it."""
    seen = {}

    def spy(name, real):
        def wrapped(model, *args, **kwargs):
            seen[name] = next(model.parameters()).dtype
            return real(model, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(ev, "evaluate_split", spy("loss", ev.evaluate_split))
    monkeypatch.setattr(ev, "generate", spy("decode", ev.generate))
    run = shutil.copytree(e2e_run, tmp_path / "run")
    result = evaluate_run(run, "validation", "last", max_samples=2, progress=False,
                          overrides=["dataset.generation.precision=bf16"])
    assert seen == {"loss": torch.float32, "decode": torch.bfloat16}
    assert result["generation"]["precision"] == "bf16" and result["scores"]["predictions"] == 2
    assert (run / "eval_validation,precision=bf16.json").is_file()


def test_unknown_decoding_precision_names_the_choices(e2e_run):
    with pytest.raises(UserError, match=r"dataset.generation.precision.*fp8.*fp32, bf16, fp16"):
        evaluate_run(e2e_run, "validation", "last", max_samples=1, progress=False,
                     overrides=["dataset.generation.precision=fp8"])
