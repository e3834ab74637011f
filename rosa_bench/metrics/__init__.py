"""Task metrics, computed from predictions the caller has already decoded (class ids, scores,
generated text). GENERATION_SCORERS maps the name a Task gives (`GenerationSet.metric`) to a
scorer of (predictions, reference groups) -> {score: value}."""

from collections.abc import Callable, Sequence

from rosa_bench.metrics.glue import glue_metrics
from rosa_bench.metrics.math import gsm8k_scores, math_scores
from rosa_bench.metrics.nlg import e2e_scores, rouge_scores

GenerationScorer = Callable[[Sequence[str], Sequence[Sequence[str]]], dict]
GENERATION_SCORERS: dict[str, GenerationScorer] = {
    "e2e": e2e_scores, "rouge": rouge_scores, "gsm8k": gsm8k_scores, "math": math_scores}

__all__ = ["GENERATION_SCORERS", "glue_metrics"]
