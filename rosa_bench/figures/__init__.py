"""figures.py's engine: run folders in, paper curves (PNG/PDF) and tables (Markdown, CSV,
LaTeX) out. Reads only run folders (see rosa_bench/runs.py), never the trainer."""

from rosa_bench.figures.report import Options, Report, make_figures

__all__ = ["Options", "Report", "make_figures"]
