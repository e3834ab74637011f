"""Text-generation metrics with the E2E NLG challenge's official definitions, and ROUGE for
open-ended answers (ELI5, Dolly).

Every scorer takes one prediction per input and the list of all references of that input.
E2E: BLEU and NIST reproduce the official tuetschek/e2e-metrics script in its Python mode
(`measure_scores.py -p`, metrics/pymteval.py), which is what the LoRA paper's numbers come from,
not its default Perl mode (mteval-v13a-sig.pl). The two modes differ: Perl's NIST length penalty
divides all reference words by the mean number of references per input where -p sums each input's
mean reference length; Perl lowercases ASCII letters only where -p lowercases every letter; Perl
smooths a zero n-gram precision to 1/2^k of the n-gram count where -p floors the hits at 1e-15.
Both: mteval-v13a tokenization, case-insensitive, n-grams clipped against all references at once.
Our deliberate departures from -p, on degenerate outputs only (the values equal -p's wherever it
gives one and every prediction has at least 3 tokens for BLEU, 4 for NIST): n-gram totals count
max(len - n + 1, 0) per prediction, where -p adds len - n + 1 even when negative (a 1-token
prediction then lowers the corpus's 4-gram total, which can push BLEU above 100) and counts an
empty prediction as one empty token; and a NIST order with no n-grams at all scores 0, where -p
divides by zero. As in -p, an order with no matching n-gram (or no n-grams) keeps BLEU positive
(1e-15 hits over at least 1e-9 n-grams), so BLEU is 0 only for empty output.
METEOR 1.5 (with paraphrases), ROUGE-L and CIDEr-D come from pycocoevalcap on PTB-tokenized text,
as the COCO caption evaluation (and both modes of the script) does.
Scales follow the papers' tables: BLEU, METEOR, ROUGE-L in 0..100; NIST and CIDEr as is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from rosa_bench.errors import UserError

BLEU_ORDER = 4
NIST_ORDER = 5
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # length penalty 0.5 at 2/3 of the reference length
MIN_HITS, MIN_TOTAL = 1e-15, 1e-9  # -p's floors that keep log(precision) defined


def check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    """One prediction per reference group, every group non-empty, and not every prediction
    empty (that means the decoding produced nothing, not a bad model to be scored zero)."""
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} reference groups; "
                        "the counts must be equal")
    if not predictions:
        raise UserError("no predictions to score")
    for i, group in enumerate(references):
        if not group or any(not ref.strip() for ref in group):
            raise UserError(f"reference group {i} is empty or holds an empty reference: {list(group)!r:.200}")
    if not any(p.strip() for p in predictions):
        raise UserError(f"all {len(predictions)} predictions are empty strings; check the prompt format "
                        "and that the model was trained to continue it")


def _tokens(text: str) -> list[str]:
    """mteval-v13a tokens, lowercased with Python's (Unicode) lowercasing, as -p does."""
    return Tokenizer13a()(text).lower().split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _clipped_hits(hyp: list[str], group: list[list[str]], n: int) -> Counter:
    """The prediction's n-grams, each counted at most as often as in any one reference."""
    most: Counter = Counter()
    for ref in group:
        most |= _ngrams(ref, n)
    return _ngrams(hyp, n) & most


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 (0..100) as -p computes it: closest reference length (the shorter on a tie),
    brevity penalty exp(1 - r/c) when c <= r, zero precisions floored (see the module docstring)."""
    hyps = [_tokens(p) for p in predictions]
    refs = [[_tokens(r) for r in group] for group in references]
    hits, totals, ref_len = [0] * BLEU_ORDER, [0] * BLEU_ORDER, 0
    for hyp, group in zip(hyps, refs):
        for n in range(1, BLEU_ORDER + 1):
            hits[n - 1] += sum(_clipped_hits(hyp, group, n).values())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
        ref_len += len(min(group, key=lambda ref: (abs(len(ref) - len(hyp)), len(ref))))
    if totals[0] == 0:
        return 0.0
    penalty = 1.0 if totals[0] > ref_len else math.exp(1 - ref_len / totals[0])
    log_precision = sum(math.log(max(h, MIN_HITS) / max(t, MIN_TOTAL)) for h, t in zip(hits, totals))
    return 100.0 * penalty * math.exp(log_precision / BLEU_ORDER)


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]], order: int = NIST_ORDER) -> float:
    """mteval's NIST (Doddington 2002), multi-reference, as -p computes it.

    Written here because NLTK's corpus_nist scores each sentence against its single best
    reference and that reference's length, while the E2E script clips n-gram hits against all
    references at once. Information weights come from n-gram counts over every reference in the
    corpus; the length penalty compares the prediction words with the sum over inputs of each
    input's mean reference length (-p; Perl mode divides all reference words by the mean number
    of references per input, which differs when inputs have different numbers of references).
    """
    hyps = [_tokens(p) for p in predictions]
    refs = [[_tokens(r) for r in group] for group in references]
    counts: Counter = Counter()
    for group in refs:
        for ref in group:
            counts[()] += len(ref)
            for n in range(1, order + 1):
                counts.update(_ngrams(ref, n))

    def info(gram: tuple[str, ...]) -> float:
        return math.log2(counts[gram[:-1]] / counts[gram])

    score = 0.0
    for n in range(1, order + 1):
        gained, total = 0.0, 0
        for hyp, group in zip(hyps, refs):
            gained += sum(info(g) * c for g, c in _clipped_hits(hyp, group, n).items())
            total += max(len(hyp) - n + 1, 0)
        score += gained / total if total else 0.0
    ratio = sum(len(h) for h in hyps) / sum(sum(len(r) for r in g) / len(g) for g in refs)
    if ratio <= 0:
        return 0.0
    return score * (1.0 if ratio >= 1 else math.exp(-NIST_BETA * math.log(ratio) ** 2))


def coco_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR 1.5, ROUGE-L and CIDEr-D as the COCO caption evaluation computes them (PTB
    tokenization first). METEOR runs the jar pycocoevalcap ships, so it needs `java`."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: [{"caption": r} for r in g] for i, g in enumerate(references)})
    hyps = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    scores = {}
    for name, scorer, scale in (("METEOR", Meteor, 100.0), ("ROUGE_L", Rouge, 100.0), ("CIDEr", Cider, 1.0)):
        scores[name] = float(scorer().compute_score(refs, hyps)[0]) * scale
    return scores


def e2e_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """The five E2E challenge metrics; one prediction per meaning representation."""
    check_inputs(predictions, references)
    return {"BLEU": bleu(predictions, references), "NIST": nist(predictions, references),
            **coco_scores(predictions, references)}


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (rouge-score, Porter stemming), 0..100; with several
    references, the best-matching one counts (rouge-score's score_multi)."""
    from rouge_score.rouge_scorer import RougeScorer

    check_inputs(predictions, references)
    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for prediction, group in zip(predictions, references):
        for kind, value in scorer.score_multi(list(group), prediction).items():
            totals[kind] += value.fmeasure
    return {kind: 100.0 * total / len(predictions) for kind, total in totals.items()}
