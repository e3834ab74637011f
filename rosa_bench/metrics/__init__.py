"""Task metrics, computed from predictions the caller has already decoded (class ids, scores)."""

from rosa_bench.metrics.glue import glue_metrics

__all__ = ["glue_metrics"]
