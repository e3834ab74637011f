"""Figures and tables from run folders: `python figures.py --fn runs/e2e_nlg`.

Writes curves (PNG and PDF), the rank sweep and the results tables (Markdown, CSV, LaTeX)
into `<fn>/figures/` (or `--out`); see README.md, "Figures and tables"."""

from __future__ import annotations

import argparse
import logging
import sys

from rosa_bench.cli import exit_on_user_error
from rosa_bench.figures import Options, make_figures
from rosa_bench.figures.plots import BANDS, X_AXES


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fn", required=True, help="folder holding run folders (searched recursively)")
    p.add_argument("--out", help="output folder (default: <fn>/figures)")
    p.add_argument("--x", default="step", choices=list(X_AXES), help="x axis of the curves")
    p.add_argument("--band", default="minmax", choices=BANDS, help="shaded band over seeds")
    p.add_argument("--metric", help="selection metric on validation (default: the one the runs chose on)")
    p.add_argument("--filter", dest="name_filter", help="regular expression on run names (re.search)")
    p.add_argument("--group-by", action="append", default=[], metavar="KEY",
                   help="config key defining a configuration (repeatable; default: all but the seed)")
    p.add_argument("--min-steps", type=int, default=0, help="skip runs with fewer optimizer steps")
    p.add_argument("--dpi", type=int, default=100, help="PNG resolution (figures are 6.4 x 4 inches)")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str]) -> None:
    args = parse(argv)
    opts = Options(x=args.x, band=args.band, metric=args.metric, name_filter=args.name_filter,
                   group_by=args.group_by, min_steps=args.min_steps, dpi=args.dpi)
    report = make_figures(args.fn, args.out, opts)
    for line in report.skipped:
        print(f"skipped {line}")
    for run in report.unfinished:
        print(f"unfinished (kept, marked in legends and tables): {run}")
    print(f"wrote {len(report.written)} files, e.g. {report.written[0].parent}/")


if __name__ == "__main__":
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)
    logging.getLogger("tensorboard").setLevel(logging.ERROR)  # its purge notices on resumed runs
    main(sys.argv[1:])
