"""GLUE task metrics by rosa-bench's own scorer (rosa_bench.metrics.glue); the task is the
config name: evaluate.load(path, "mrpc")."""

from rosa_bench.evaluate_modules.metric import GlueMetric

__all__ = ["GlueMetric"]
