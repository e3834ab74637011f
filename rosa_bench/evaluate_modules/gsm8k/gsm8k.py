"""GSM8K accuracy: the first number after the last 'The answer is: ' against the gold answer
(after '#### ' in a solution); computed by rosa-bench's own scorer (rosa_bench.metrics)."""

from rosa_bench.evaluate_modules.metric import generation_metric

GSM8K = generation_metric("gsm8k", __doc__)
