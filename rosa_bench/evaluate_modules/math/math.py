"""MATH accuracy: the last \\boxed{} answer, normalised as Hendrycks et al., against the gold
solution's; computed by rosa-bench's own scorer (rosa_bench.metrics)."""

from rosa_bench.evaluate_modules.metric import generation_metric

MATH = generation_metric("math", __doc__)
