"""E2E metrics against hand-computed values: BLEU (multi-reference clipping, brevity penalty),
NIST (information weights, average reference length), ROUGE, and the input checks."""

from __future__ import annotations

import math
import shutil

import pytest

from rosa_bench.errors import UserError
from rosa_bench.metrics.nlg import NIST_BETA, bleu, coco_scores, e2e_scores, nist, rouge_scores

R1 = "the quick brown fox leaps"
R2 = "a quick brown fox jumps high"


def test_identical_prediction_and_reference_give_bleu_100():
    assert bleu(["The Eagle is a pub near the river."], [["The Eagle is a pub near the river."]]) == \
        pytest.approx(100.0)


def test_bleu_is_case_insensitive_like_the_e2e_script():
    assert bleu(["THE EAGLE IS A PUB."], [["the eagle is a pub."]]) == pytest.approx(100.0)


def test_two_references_clip_together():
    # every n-gram of the prediction is in one reference or the other: precisions 1; the
    # closest reference length is 5 (R1), so no brevity penalty
    assert bleu(["the quick brown fox jumps"], [[R1, R2]]) == pytest.approx(100.0)
    # against R1 alone: precisions 4/5, 3/4, 2/3, 1/2
    alone = (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert bleu(["the quick brown fox jumps"], [[R1]]) == pytest.approx(100 * alone)


def test_bleu_brevity_penalty_uses_the_closest_reference():
    # 4 tokens, all n-grams found; closest reference has 5 tokens: BP = exp(1 - 5/4)
    assert bleu(["the quick brown fox"], [[R1, R2]]) == pytest.approx(100 * math.exp(1 - 5 / 4))


def test_nist_by_hand_for_two_references():
    # reference words 11: the 1, quick 2, brown 2, fox 2 -> info log2(11/1), log2(11/2) x3;
    # every longer matched n-gram occurs as often as its prefix -> info 0.
    # length: 4 against the average reference length 5.5.
    precision = (math.log2(11) + 3 * math.log2(11 / 2)) / 4
    penalty = math.exp(-NIST_BETA * math.log(4 / 5.5) ** 2)
    assert nist(["the quick brown fox"], [[R1, R2]]) == pytest.approx(precision * penalty)
    assert precision * penalty == pytest.approx(1.7668, abs=1e-4)


def test_nist_has_no_length_penalty_at_or_above_the_average_length():
    value = nist(["the quick brown fox jumps high"], [[R1, R2]])
    assert value > nist(["the quick brown fox"], [[R1, R2]])
    assert nist(["zebra"], [[R1]]) == 0.0


def test_rouge_picks_the_best_reference():
    scores = rouge_scores(["the cat sat on the mat"], [["a dog barked", "the cat sat on the mat"]])
    assert scores == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # LCS "the cat the mat" = 4 of 6 prediction / 6 reference tokens -> F = 4/6
    half = rouge_scores(["the cat sat on the mat"], [["the dog lay by the mat"]])
    assert half["rouge1"] == pytest.approx(100 * 3 / 6)  # the, the, mat
    assert half["rougeL"] == pytest.approx(100 * 3 / 6)


@pytest.mark.parametrize("predictions,references,message", [
    (["a", "b"], [["a"]], "2 predictions but 1 reference groups"),
    (["a"], [[]], "reference group 0 is empty"),
    (["a"], [["x", " "]], "reference group 0"),
    (["", " "], [["x"], ["y"]], "all 2 predictions are empty"),
])
def test_bad_inputs_name_the_problem(predictions, references, message):
    with pytest.raises(UserError, match=message):
        rouge_scores(predictions, references)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need java")
def test_coco_metrics_on_identical_and_disjoint_text():
    refs = [["The Eagle is a pub.", "There is a pub called The Eagle."], ["Cotto serves cheap food."]]
    same = coco_scores(["The Eagle is a pub.", "Cotto serves cheap food."], refs)
    assert same["METEOR"] == pytest.approx(100.0, abs=0.5)  # METEOR's fragmentation penalty is tiny
    assert same["ROUGE_L"] == pytest.approx(100.0)
    one = e2e_scores(["The Eagle is a pub.", "zebra"], refs)
    assert one["ROUGE_L"] == pytest.approx(50.0)  # mean of 1 and 0
    assert one["METEOR"] < same["METEOR"] and one["CIDEr"] < same["CIDEr"]
