"""E2E metrics against values computed by hand from the official script's formulas
(tuetschek/e2e-metrics, `measure_scores.py -p`, metrics/pymteval.py): BLEU (multi-reference
clipping, brevity penalty, floors), NIST (information weights, average reference length), the
edge cases where we depart from -p on purpose, ROUGE, and the input checks."""

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


def test_nist_length_penalty_is_the_python_modes_where_perl_differs():
    # input 1: one reference "a b c d e", predicted exactly; input 2: references "f g h i" and
    # "f g h i j k l m n o p q", predicted "f g h i". 21 reference words; f, g, h, i occur twice,
    # every other word once, and every longer n-gram as often as its prefix (information 0).
    # Unigram information: 5 * log2(21/1) + 4 * log2(21/2) over 9 predicted words.
    # -p: average reference length 5 + (4 + 12) / 2 = 13, ratio 9 / 13.
    # Perl (mteval-v13a-sig.pl): 21 reference words / (3 references / 2 inputs) = 14, ratio 9 / 14.
    information = (5 * math.log2(21) + 4 * math.log2(21 / 2)) / 9
    python_mode = information * math.exp(-NIST_BETA * math.log(9 / 13) ** 2)
    perl_mode = information * math.exp(-NIST_BETA * math.log(9 / 14) ** 2)
    value = nist(["a b c d e", "f g h i"], [["a b c d e"], ["f g h i", "f g h i j k l m n o p q"]])
    assert value == pytest.approx(python_mode, rel=1e-12)
    assert python_mode == pytest.approx(2.23236, abs=1e-5) and perl_mode == pytest.approx(1.73345, abs=1e-5)


def test_lowercasing_covers_non_ascii_letters_like_the_python_mode():
    # Perl mode lowercases A-Z only, so "CAFÉ" would not match "café" there
    assert bleu(["CAFÉ ÉTOILE is nice"], [["café étoile is nice"]]) == pytest.approx(100.0)


def test_bleu_of_predictions_shorter_than_four_tokens():
    # no 4-grams at all: -p floors the precision at 1e-15 / 1e-9 (Perl would count it as 1 and
    # give 100; sacrebleu's corpus_bleu gives 0)
    assert bleu(["the eagle pub"], [["the eagle pub"]]) == pytest.approx(100 * 1e-6 ** 0.25)


def test_bleu_without_a_4gram_match_stays_positive():
    # 4-grams "the eagle is a", "eagle is a pub" are not in the reference; trigrams 1/3, bigrams
    # 3/4, unigrams 5/5; 4-gram hits floored at 1e-15 over 2; brevity exp(1 - 6/5)
    expected = 100 * math.exp(1 - 6 / 5) * (3 / 4 * 1 / 3 * 1e-15 / 2) ** 0.25
    assert bleu(["the eagle is a pub"], [["the eagle is not a pub"]]) == pytest.approx(expected)


def test_an_empty_prediction_counts_no_ngrams_but_its_reference_length():
    # n-grams only from the first prediction (all match); reference length 5 + 3 (closest to 0
    # tokens is the 3-token reference) against 5 predicted tokens. (-p counts "" as one token and
    # adds negative n-gram counts: BLEU 16022 on this input.)
    references = [["the eagle is a pub"], ["cotto is cheap"]]
    assert bleu(["the eagle is a pub", ""], references) == pytest.approx(100 * math.exp(1 - 8 / 5))
    assert bleu(["", ""], references) == 0.0
    # NIST: 8 reference words, "is" twice: unigram information 3 + 3 + 2 + 3 over 4 words; "is a"
    # carries log2(2/1) = 1 over 3 bigrams; longer n-grams carry 0; the order-5 term has no
    # n-grams (-p divides by zero) and scores 0; 4 words against 5 + 3: ratio 1/2
    expected = (11 / 4 + 1 / 3) * math.exp(-NIST_BETA * math.log(0.5) ** 2)
    assert nist(["the eagle is a", ""], references) == pytest.approx(expected)


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
