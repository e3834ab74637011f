"""evaluate.py end to end on tiny models and real rows: every file and score is written, bad
input stops with one line, a crash while decoding leaves no score file, batched generation
matches one-at-a-time generation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    # the run validated on 12 rows (dataset.max_eval_samples); scoring covers the whole dev set
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 277
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


def test_the_training_time_cap_on_eval_rows_does_not_cut_the_scored_split(e2e_run, monkeypatch, tmp_path):
    """The run validated on 12 dev rows (dataset.max_eval_samples); scoring the test split
    without --max-samples covers all 630 test MRs and every reference row."""
    seen = {}

    def capture(model, parts, split, limit, *args):
        seen.update(prompts=len(parts.task.generation_sets[split].prompts),
                    rows=len(parts.task.splits[split]), limit=limit)
        return {}

    run = tmp_path / e2e_run.name
    shutil.copytree(e2e_run, run)
    monkeypatch.setattr(ev, "causal_scores", capture)
    evaluate_run(run, "test", "best", progress=False)
    assert seen == {"prompts": 630, "rows": 4693, "limit": None}
