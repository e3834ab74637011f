"""rosa-bench's scorers as Hugging Face `evaluate` modules that load offline from a local path,
each computing exactly what evaluate.py reports (they call the same functions):

    import evaluate                                   # Hugging Face's, not this repo's evaluate.py
    from rosa_bench.evaluate_modules import module_path
    bleu_etc = evaluate.load(module_path("e2e"))       # also rouge, gsm8k, math; glue with a task:
    glue = evaluate.load(module_path("glue"), "mrpc")

Each module folder holds one script, `<name>/<name>.py`, as `evaluate.load` expects.
"""

from __future__ import annotations

from pathlib import Path

from rosa_bench.errors import choices_error

MODULES = ("e2e", "rouge", "gsm8k", "math", "glue")


def module_path(name: str) -> str:
    """The folder to pass to `evaluate.load`."""
    if name not in MODULES:
        raise choices_error("evaluate module", name, MODULES)
    return str(Path(__file__).resolve().parent / name)
