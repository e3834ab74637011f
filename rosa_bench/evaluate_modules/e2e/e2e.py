"""E2E NLG scores as the official e2e-metrics script defines them (BLEU, NIST, METEOR,
ROUGE-L, CIDEr-D), multi-reference; computed by rosa-bench's own scorer (rosa_bench.metrics)."""

from rosa_bench.evaluate_modules.metric import generation_metric

E2E = generation_metric("e2e", __doc__)
