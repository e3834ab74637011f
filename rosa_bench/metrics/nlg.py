"""Text-generation metrics with the E2E NLG challenge's official definitions, and ROUGE for
open-ended answers (ELI5, Dolly).

Every scorer takes one prediction per input and the list of all references of that input.
E2E (as tuetschek/e2e-metrics computes it): BLEU and NIST are mteval-v13a style, case
insensitive, clipped against all references at once; METEOR 1.5 (with paraphrases), ROUGE-L
and CIDEr-D come from pycocoevalcap on PTB-tokenized text, as the COCO caption evaluation does.
Scales follow the papers' tables: BLEU, METEOR, ROUGE-L in 0..100; NIST and CIDEr as is.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from rosa_bench.errors import UserError

NIST_ORDER = 5
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2  # length penalty 0.5 at 2/3 of the reference length


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


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4, mteval-v13a tokenization, lowercased, closest reference length."""
    width = max(len(group) for group in references)
    streams = [[group[k] if k < len(group) else None for group in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize="13a", lowercase=True).score)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def nist(predictions: Sequence[str], references: Sequence[Sequence[str]], order: int = NIST_ORDER) -> float:
    """mteval's NIST (Doddington 2002), multi-reference.

    Written here because NLTK's corpus_nist scores each sentence against its single best
    reference and that reference's length, while mteval (and the E2E script) clips n-gram
    hits against all references at once and penalises length against the average reference
    length. Information weights come from n-gram counts over every reference in the corpus.
    """
    tokenize = Tokenizer13a()
    hyps = [tokenize(p).lower().split() for p in predictions]
    refs = [[tokenize(r).lower().split() for r in group] for group in references]
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
            clip: Counter = Counter()
            for ref in group:
                clip |= _ngrams(ref, n)
            gained += sum(info(g) * c for g, c in (_ngrams(hyp, n) & clip).items())
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
