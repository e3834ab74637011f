"""The `evaluate.Metric` classes behind the module scripts: one for text generation scorers
(rosa_bench.metrics.GENERATION_SCORERS), one for GLUE. Imported only by those scripts, after
Hugging Face's `evaluate` is loaded."""

from __future__ import annotations

from collections.abc import Sequence

import datasets

import evaluate
from rosa_bench.metrics import GENERATION_SCORERS, glue_metrics
from rosa_bench.metrics.glue import SCORERS as GLUE_TASKS

GENERATION_INPUTS = """
Args:
    predictions: list of generated texts.
    references: per prediction, one reference text or a list of references.
Returns:
    the same dict of scores as rosa-bench's evaluate.py reports.
"""
GLUE_INPUTS = """
Args:
    predictions: class ids (argmax already taken) or, for stsb, predicted scores.
    references: gold labels (stsb: gold scores).
Returns:
    the task's GLUE scores on a 0..1 scale (accuracy, f1, matthews_correlation, pearson, ...).
"""


def generation_metric(scorer: str, description: str) -> type[evaluate.Metric]:
    """An evaluate.Metric that scores with GENERATION_SCORERS[scorer]."""

    class GenerationMetric(evaluate.Metric):
        def _info(self) -> evaluate.MetricInfo:
            text = datasets.Value("string")
            return evaluate.MetricInfo(
                description=description, citation="", inputs_description=GENERATION_INPUTS,
                features=[datasets.Features({"predictions": text, "references": datasets.Sequence(text)}),
                          datasets.Features({"predictions": text, "references": text})])

        def _compute(self, predictions: Sequence[str], references: Sequence) -> dict:
            groups = [[r] if isinstance(r, str) else list(r) for r in references]
            return GENERATION_SCORERS[scorer](list(predictions), groups)

    GenerationMetric.__name__ = GenerationMetric.__qualname__ = f"{scorer.upper()}Metric"
    return GenerationMetric


class GlueMetric(evaluate.Metric):
    """The GLUE task metric; the task is the module's config name (`evaluate.load(path, "mrpc")`)."""

    def _info(self) -> evaluate.MetricInfo:
        if self.config_name not in GLUE_TASKS:
            raise KeyError(f"choose a GLUE task as the config name: {', '.join(GLUE_TASKS)}")
        kind = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description="GLUE task metrics (rosa_bench.metrics.glue)", citation="",
            inputs_description=GLUE_INPUTS,
            features=datasets.Features({"predictions": kind, "references": kind}))

    def _compute(self, predictions: Sequence, references: Sequence) -> dict[str, float]:
        return glue_metrics(self.config_name, predictions, references)
