"""Datasets on the real files under shared/data (and small official-format files for the GLUE
tasks that are missing there): parsing, label masking, caps, errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import datasets
import pytest
import torch

from rosa_bench.config import DatasetConfig
from rosa_bench.data import (
    build_task,
    check_dataset_config,
    dataset_names,
    default_run_subdir,
    e2e,
    glue,
    task_head,
)
from rosa_bench.data.task import CAUSAL_LM, CLASSIFICATION, REGRESSION
from rosa_bench.errors import UserError

GLUE_TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
MNLI_PARSES = ["( ( The cat ) ( sat . ) )", "( ( A cat ) ( rests . ) )", "(ROOT (S (NP The cat) (VP sat)))",
               "(ROOT (S (NP A cat) (VP rests)))"]


def e2e_cfg(root: Path, **kw) -> DatasetConfig:
    return DatasetConfig(name="e2e", cache=str(root), hub_id="GEM/e2e_nlg", **kw)


def glue_cfg(root: Path, task: str, **kw) -> DatasetConfig:
    return DatasetConfig(name="glue", task=task, cache=str(root), hub_id="nyu-mll/glue", **kw)


def write_tsv(path: Path, header: list[str] | None, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(line) + "\n" for line in lines), encoding="utf-8")


def write_qqp(root: Path) -> None:
    """QQP as GLUE ships it: id, qid1, qid2, question1, question2, is_duplicate."""
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [["201359", "303345", "303346", "Why are African-Americans so beautiful?",
             "Why are hispanics so beautiful?", "0"],
            ["263843", "69383", "380476", "I want to pursue PhD in Computer Science about social network,"
             " what is the open problem in social networks?",
             "I handle social media for a non-profit."
             " Should I start going to social media networking events?",
             "0"],
            ["172974", "266948", "175089", "Is there a reason why we should travel alone?",
             "What are some reasons to travel alone?", "1"]]
    for name in ("train.tsv", "dev.tsv"):
        write_tsv(root / "glue/QQP" / name, header, rows)
    write_tsv(root / "glue/QQP/test.tsv", ["id", "question1", "question2"],
              [["0", "Would the idea of Trump and Putin in bed together scare you?", "Do you think that if"
                " Donald Trump were elected President, he would be able to restore relations with Putin?"]])


def write_mnli(root: Path) -> None:
    """MNLI as GLUE ships it: parse columns; dev files have five annotator labels; the gold label
    is the last column."""
    head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    pairs = [("The cat sat.", "A cat rests.", "entailment"), ("The cat sat.", "A dog barks.", "neutral"),
             ("The cat sat.", "The cat stood.", "contradiction")]
    ids = ["31193", "31193n", "fiction"]
    write_tsv(root / "glue/MNLI/train.tsv", head + ["label1", "gold_label"],
              [[str(i), *ids, *MNLI_PARSES, p, h, g, g] for i, (p, h, g) in enumerate(pairs)])
    for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
        write_tsv(root / "glue/MNLI" / name, head + [f"label{k}" for k in range(1, 6)] + ["gold_label"],
                  [[str(i), *ids, *MNLI_PARSES, p, h, *[g] * 5, g] for i, (p, h, g) in enumerate(pairs)])
    write_tsv(root / "glue/MNLI/test_matched.tsv", head,
              [["0", *ids, *MNLI_PARSES, "The cat sat.", "It sat."]])


def write_qnli(root: Path) -> None:
    """QNLI as GLUE ships it: index, question, sentence, label (entailment / not_entailment)."""
    header = ["index", "question", "sentence", "label"]
    rows = [["0", "When did the third Digimon series begin?", "Unlike the two seasons before it and most of"
             " the seasons that followed, Digimon Tamers takes a darker and more realistic approach.",
             "not_entailment"],
            ["1", "Which missile batteries often have individual launchers several kilometres from one"
             " another?", "When MANPADS is operated by specialists, batteries may have several dozen teams"
             " deploying separately in small sections.", "not_entailment"],
            ["2", "What two things does Popper argue Tarski's theory involves in an evaluation of truth?",
             "He bases this interpretation on the fact that examples such as the one described above refer"
             " to two things: assertions and the facts to which they refer.", "entailment"]]
    for name in ("train.tsv", "dev.tsv"):
        write_tsv(root / "glue/QNLI" / name, header, rows)


def glue_root(task: str, data_root: Path, tmp_path: Path) -> Path:
    """shared/data, or a tmp root with official-format files for the tasks missing there."""
    writers = {"qqp": write_qqp, "mnli": write_mnli, "qnli": write_qnli}
    if task not in writers:
        return data_root
    writers[task](tmp_path)
    return tmp_path


# ---- E2E -----------------------------------------------------------------------------------------

def test_e2e_raw_row_counts_match_readme(data_root):
    raw = e2e.load_raw(e2e_cfg(data_root))
    assert {split: len(rows) for split, rows in raw.items()} == {
        "train": 42061, "validation": 4672, "test": 4693}
    assert raw["train"].column_names == ["mr", "ref"]
    assert raw["train"][0]["mr"].startswith("name[The Vaults], eatType[pub]")
    assert len(raw["test"].unique("mr")) == 630


def test_e2e_labels_mask_exactly_the_prompt(data_root, byte_tokenizer):
    cfg = e2e_cfg(data_root, max_train_samples=6, max_eval_samples=4, max_length=512)
    task = build_task(cfg, byte_tokenizer)
    sizes = {split: len(rows) for split, rows in task.splits.items()}
    assert sizes == {"train": 6, "validation": 4, "test": 4}
    eos = byte_tokenizer.eos_token_id
    for row, raw in zip(task.splits["train"], task.raw["train"]):
        n_prompt = len(byte_tokenizer(raw["mr"] + "\n")["input_ids"])
        ids, labels = row["input_ids"], row["labels"]
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert byte_tokenizer.decode(ids[:n_prompt]) == raw["mr"] + "\n"
        assert byte_tokenizer.decode(ids[n_prompt:-1]) == raw["ref"]
        assert ids[-1] == eos


def test_e2e_collate_pads_right_with_eos_when_no_pad_token(data_root, byte_tokenizer):
    assert byte_tokenizer.pad_token_id is None
    task = build_task(e2e_cfg(data_root, max_train_samples=4, max_eval_samples=1, max_length=512),
                      byte_tokenizer)
    rows = [task.splits["train"][i] for i in range(4)]
    batch = task.collate(rows)
    lengths = [len(row["input_ids"]) for row in rows]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    short = lengths.index(min(lengths))
    assert min(lengths) < max(lengths)
    assert (batch["input_ids"][short, min(lengths):] == byte_tokenizer.eos_token_id).all()
    assert (batch["labels"][short, min(lengths):] == -100).all()
    assert batch["labels"].dtype == torch.long


def test_e2e_truncates_and_ends_with_sep_for_encoder_tokenizers(data_root, bert_tokenizer):
    task = build_task(e2e_cfg(data_root, max_train_samples=3, max_eval_samples=2, max_length=24),
                      bert_tokenizer)
    assert max(len(ids) for ids in task.splits["train"]["input_ids"]) == 24
    long_enough = build_task(e2e_cfg(data_root, max_train_samples=3, max_eval_samples=2, max_length=512),
                             bert_tokenizer)
    assert all(ids[-1] == bert_tokenizer.sep_token_id for ids in long_enough.splits["train"]["input_ids"])


def test_e2e_task_fields_and_distinct_sample_prompts(data_root, byte_tokenizer):
    cfg = e2e_cfg(data_root, max_train_samples=2, max_eval_samples=40, prompt="MR: {mr}\nText:",
                  num_samples_to_log=2)
    task = build_task(cfg, byte_tokenizer)
    first_mrs = list(dict.fromkeys(task.raw["validation"]["mr"]))[:2]
    assert task.raw["validation"][0]["mr"] == task.raw["validation"][1]["mr"]  # several refs per MR
    assert task.sample_prompts == [f"MR: {mr}\nText:" for mr in first_mrs]
    assert (task.name, task.kind, task.run_subdir) == ("e2e", CAUSAL_LM, "e2e_nlg")
    assert task.validation_splits == ["validation"]
    assert (task.metric_name, task.greater_is_better) == ("loss", False)


def test_e2e_malformed_row_names_file_and_line(tmp_path, byte_tokenizer):
    (tmp_path / "e2e").mkdir()
    good = 'mr,ref\n"name[A], food[Thai]",A serves Thai food.\n'
    for name in ("devset.csv", "testset_w_refs.csv"):
        (tmp_path / "e2e" / name).write_text(good, encoding="utf-8")
    (tmp_path / "e2e/trainset.csv").write_text(good + '"name[B]",B is a pub.,extra\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"trainset\.csv, line 3: expected 2 fields.*extra"):
        build_task(e2e_cfg(tmp_path), byte_tokenizer)


# ---- GLUE parsing ----------------------------------------------------------------------------------

def test_cola_headerless_files(data_root):
    raw = glue.load_raw(glue_cfg(data_root, "cola"))
    sentence = "Our friends won't buy this analysis, let alone the next one we propose."
    assert raw["train"][0] == {"sentence": sentence, "label": 1, "idx": 0}
    assert len(raw["train"]) == 8551 and len(raw["validation"]) == 1043
    assert raw["validation"][0]["sentence"] == "The sailors rode the breeze clear of the rocks."
    assert sorted(raw["train"].unique("label")) == [0, 1]
    assert raw["test"].column_names == ["sentence", "idx"] and len(raw["test"]) == 1063


def test_mrpc_bom_header(data_root):
    raw = glue.load_raw(glue_cfg(data_root, "mrpc"))
    first = raw["train"][0]
    assert first["label"] == 1 and first["sentence1"].startswith("Amrozi accused his brother")
    assert raw["train"][1]["label"] == 0
    assert (len(raw["train"]), len(raw["validation"]), len(raw["test"])) == (3668, 408, 1725)


def test_stsb_float_labels(data_root, bert_tokenizer):
    cfg = glue_cfg(data_root, "stsb", max_train_samples=4, max_eval_samples=4)
    task = build_task(cfg, bert_tokenizer)
    assert task.raw["train"]["label"] == pytest.approx([5.0, 3.8, 3.8, 2.6])
    assert (task.kind, task.num_labels, task.metric_name) == (REGRESSION, 1, "pearson")
    batch = task.collate([task.splits["train"][i] for i in range(4)])
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx([5.0, 3.8, 3.8, 2.6])


def test_rte_text_labels_map_to_hf_ids(data_root):
    raw = glue.load_raw(glue_cfg(data_root, "rte"))
    assert raw["train"][0]["label"] == 1  # not_entailment
    assert raw["train"][1]["label"] == 0  # entailment
    assert raw["test"][0]["idx"] == 0 and "label" not in raw["test"].column_names


@pytest.mark.parametrize("task_name", GLUE_TASKS)
def test_every_glue_task_loads(task_name, data_root, tmp_path, bert_tokenizer):
    cfg = glue_cfg(glue_root(task_name, data_root, tmp_path), task_name, max_train_samples=16,
                   max_eval_samples=8, max_length=32)
    task = build_task(cfg, bert_tokenizer)
    kind, num_labels = task_head(cfg)
    assert (task.kind, task.num_labels, task.name) == (kind, num_labels, f"glue/{task_name}")
    assert set(task.validation_splits) <= set(task.splits)
    for split in ["train", *task.validation_splits]:
        rows = task.splits[split]
        assert 0 < len(rows) <= (16 if split == "train" else 8)
        batch = task.collate([rows[i] for i in range(len(rows))])
        assert batch["input_ids"].shape[0] == len(rows) and batch["input_ids"].shape[1] <= 32
        if kind == CLASSIFICATION:
            assert batch["labels"].dtype == torch.long
            assert 0 <= int(batch["labels"].min()) and int(batch["labels"].max()) < num_labels
    assert task.metric_name in task.compute_metrics([0, 1], [0, 1])


def test_mnli_official_format_and_both_validation_splits(tmp_path, bert_tokenizer):
    write_mnli(tmp_path)
    task = build_task(glue_cfg(tmp_path, "mnli", max_eval_samples=2), bert_tokenizer)
    assert task.validation_splits == ["validation_matched", "validation_mismatched"]
    assert task.raw["train"]["label"] == [0, 1, 2]
    first = task.raw["train"][0]
    assert (first["premise"], first["hypothesis"]) == ("The cat sat.", "A cat rests.")
    assert len(task.splits["validation_matched"]) == len(task.splits["validation_mismatched"]) == 2
    assert "test_matched" in task.splits and "labels" not in task.splits["test_matched"].column_names


def test_pairs_are_encoded_as_pairs(tmp_path, bert_tokenizer):
    write_qqp(tmp_path)
    task = build_task(glue_cfg(tmp_path, "qqp"), bert_tokenizer)
    row = task.splits["train"][2]
    assert row["input_ids"].count(bert_tokenizer.sep_token_id) == 2
    assert set(row["token_type_ids"]) == {0, 1}
    assert task.raw["train"]["label"] == [0, 0, 1] and task.raw["train"]["idx"] == [201359, 263843, 172974]


def test_full_sst2_tokenizes_quickly(data_root, bert_tokenizer):
    task = build_task(glue_cfg(data_root, "sst2"), bert_tokenizer)
    sizes = [len(task.splits[split]) for split in ("train", "validation", "test")]
    assert sizes == [67349, 872, 1821]


# ---- errors ----------------------------------------------------------------------------------------

def test_missing_files_and_no_hub_name_the_path(tmp_path, bert_tokenizer):
    with pytest.raises(UserError) as err:
        build_task(glue_cfg(tmp_path, "sst2"), bert_tokenizer)
    message = str(err.value)
    assert str(tmp_path / "glue/SST-2/train.tsv") in message and "nyu-mll/glue" in message
    assert "test.tsv" not in message  # test files are optional
    assert "ROSA_BENCH_DATA" in message


def test_missing_qnli_train_in_shared_is_reported(data_root, bert_tokenizer):
    with pytest.raises(UserError, match=r"QNLI/train\.tsv.*Hub"):
        build_task(glue_cfg(data_root, "qnli"), bert_tokenizer)


def test_no_cache_and_no_hub_id(byte_tokenizer):
    with pytest.raises(UserError, match=r"e2e/trainset\.csv.*dataset\.cache is not set.*no dataset\.hub_id"):
        build_task(DatasetConfig(name="e2e", cache=None, hub_id=None), byte_tokenizer)


@pytest.mark.parametrize(("task_name", "header", "bad_row", "expected"), [
    ("sst2", ["sentence", "label"], ["a fine film", "1", "extra"], r"line 3: expected 2 fields"),
    ("sst2", ["sentence", "label"], ["a fine film", "2"], r"line 3: label '2' is not one of \['0', '1'\]"),
    ("rte", ["index", "sentence1", "sentence2", "label"], ["1", "A b.", "C d.", "entails"],
     r"line 3: label 'entails'"),
    ("stsb", ["index", "sentence1", "sentence2", "score"], ["1", "A b.", "C d.", "high"],
     r"line 3: label 'high' is not a number"),
])
def test_malformed_glue_row_names_file_line_and_value(task_name, header, bad_row, expected, tmp_path,
                                                      bert_tokenizer):
    folder = tmp_path / "glue" / glue.TASKS[task_name].folder
    good = {"sst2": ["a dull film", "0"], "rte": ["0", "A b.", "A b.", "entailment"],
            "stsb": ["0", "A b.", "A b.", "5.000"]}[task_name]
    write_tsv(folder / "train.tsv", header, [good, bad_row])
    write_tsv(folder / "dev.tsv", header, [good])
    with pytest.raises(UserError, match=re.escape(str(folder / "train.tsv")) + ", " + expected):
        build_task(glue_cfg(tmp_path, task_name), bert_tokenizer)


def test_unknown_glue_task_lists_choices():
    with pytest.raises(UserError) as err:
        check_dataset_config(DatasetConfig(name="glue", task="sst3"))
    assert "'sst3'" in str(err.value)
    assert all(name in str(err.value) for name in GLUE_TASKS)


@pytest.mark.parametrize(("cfg", "expected"), [
    (DatasetConfig(name="e2e", task="sst2"), r"dataset\.task='sst2' is not used by e2e"),
    (DatasetConfig(name="glue", task=None), r"unknown glue task.*None"),
    (DatasetConfig(name="e2e", max_train_samples=0), r"max_train_samples=0 must be > 0"),
    (DatasetConfig(name="glue", task="rte", max_eval_samples=-3), r"max_eval_samples=-3"),
    (DatasetConfig(name="e2e", prompt="{meaning}\n"), r"dataset\.prompt.*\{mr\}"),
    (DatasetConfig(name="wikitext"), r"unknown dataset 'wikitext'; choose one of: .*e2e, .*glue"),
])
def test_bad_dataset_options(cfg, expected):
    with pytest.raises(UserError, match=expected):
        check_dataset_config(cfg)


def test_check_does_not_touch_the_file_system():
    check_dataset_config(DatasetConfig(name="glue", task="cola", cache="/nonexistent/root"))
    check_dataset_config(DatasetConfig(name="e2e", cache="/nonexistent/root"))


# ---- registry and Hub schema -------------------------------------------------------------------------

def test_registry_heads_and_run_folders():
    assert {"e2e", "glue", "eli5", "gsm8k", "metamathqa"} <= set(dataset_names())
    assert default_run_subdir(DatasetConfig(name="e2e")) == "e2e_nlg"
    assert default_run_subdir(DatasetConfig(name="glue", task="mnli")) == "glue/mnli"
    assert task_head(DatasetConfig(name="e2e")) == (CAUSAL_LM, None)
    assert task_head(DatasetConfig(name="glue", task="mnli")) == (CLASSIFICATION, 3)
    assert task_head(DatasetConfig(name="glue", task="stsb")) == (REGRESSION, 1)


def test_hub_rows_get_the_local_schema(monkeypatch, tmp_path):
    """The Hub fallback (offline here, so its answer is stubbed) gives the same columns as files."""
    calls = []

    def fake_load(hub_id, config_name):
        calls.append((hub_id, config_name))
        if hub_id == "GEM/e2e_nlg":
            row = {"gem_id": ["e2e-0"], "meaning_representation": ["name[A]"], "target": ["A."],
                   "references": [["A."]]}
            return datasets.DatasetDict({s: datasets.Dataset.from_dict(row)
                                         for s in ("train", "validation", "test")})
        rows = {"sentence1": ["A b."], "sentence2": ["C d."], "label": [1], "idx": [0]}
        test = {**rows, "label": [-1]}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                                     "validation": datasets.Dataset.from_dict(rows),
                                     "test": datasets.Dataset.from_dict(test)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    e2e_raw = e2e.load_raw(e2e_cfg(tmp_path))
    assert e2e_raw["test"][0] == {"mr": "name[A]", "ref": "A."}
    rte_raw = glue.load_raw(glue_cfg(tmp_path, "rte"))
    assert rte_raw["train"][0] == {"sentence1": "A b.", "sentence2": "C d.", "label": 1, "idx": 0}
    assert rte_raw["test"].column_names == ["sentence1", "sentence2", "idx"]
    assert calls == [("GEM/e2e_nlg", None), ("nyu-mll/glue", "rte")]


def test_hub_copies_of_eli5_metamathqa_gsm8k_and_dolly(monkeypatch, tmp_path):
    """With no local files each loader asks the Hub (stubbed: offline here) for its named copy and
    turns the rows into the same schema and splits as the local files give."""
    from rosa_bench.data import dolly, eli5
    from rosa_bench.data import math as math_problems

    calls = []
    n_qa, n_math = 2 * eli5.HUB_HELD_OUT + 3, math_problems.VALIDATION_ROWS + 2
    gsm8k_row = {"question": ["Q?"], "answer": ["3 + 4 = <<3+4=7>>7\n#### 7"]}
    hub = {
        "sentence-transformers/eli5": {"train": {"question": [f"q{i}" for i in range(n_qa)],
                                                 "answer": [f"a{i}" for i in range(n_qa)]}},
        "meta-math/MetaMathQA": {"train": {"query": [f"m{i}" for i in range(n_math)],
                                           "response": ["The answer is: 1"] * n_math,
                                           "type": ["GSM_AnsAug"] * n_math}},
        "openai/gsm8k": {"train": gsm8k_row, "test": gsm8k_row},
        "databricks/databricks-dolly-15k": {"train": {
            "instruction": [f"i{k}" for k in range(200)], "context": [""] * 200,
            "response": [f"r{k}" for k in range(200)],
            "category": [dolly.CATEGORIES[k % 8] for k in range(200)]}},
    }

    def fake_load(hub_id, config_name):
        calls.append((hub_id, config_name))
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(rows)
                                     for split, rows in hub[hub_id].items()})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    from tests.test_config import composed

    cfg = {name: dataclasses.replace(composed([f"dataset={name}"]).dataset, cache=str(tmp_path))
           for name in ("eli5", "metamathqa", "dolly")}

    qa = eli5.load_raw(cfg["eli5"])
    assert {s: len(r) for s, r in qa.items()} == {"train": 3, "validation": eli5.HUB_HELD_OUT,
                                                  "test": eli5.HUB_HELD_OUT}
    assert qa["test"][0] == {"question": f"q{3 + eli5.HUB_HELD_OUT}", "answer": f"a{3 + eli5.HUB_HELD_OUT}",
                             "answers": [f"a{3 + eli5.HUB_HELD_OUT}"]}

    math_raw = math_problems.load_raw(cfg["metamathqa"])
    assert len(math_raw["train"]) == 2 and len(math_raw["validation"]) == math_problems.VALIDATION_ROWS
    assert math_raw["test"][0] == {"query": "Q?", "response": "3 + 4 = 7\n#### 7\nThe answer is: 7"}

    dolly_raw = dolly.load_raw(cfg["dolly"])
    assert len(dolly_raw["test"]) == dolly.TEST_ROWS and sum(map(len, dolly_raw.values())) == 200
    assert set(dolly_raw["train"].column_names) == set(dolly.FIELDS)
    assert calls == [("sentence-transformers/eli5", None), ("openai/gsm8k", "main"),
                     ("meta-math/MetaMathQA", None), ("databricks/databricks-dolly-15k", None)]
