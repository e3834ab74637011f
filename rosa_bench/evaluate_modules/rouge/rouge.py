"""ROUGE-1/2/L F-measure (rouge-score, stemmed), best over each prediction's references, 0..100;
computed by rosa-bench's own scorer (rosa_bench.metrics)."""

from rosa_bench.evaluate_modules.metric import generation_metric

ROUGE = generation_metric("rouge", __doc__)
