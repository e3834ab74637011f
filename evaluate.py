"""Score a run: `python evaluate.py --run runs/e2e_nlg/<run> [--split test] [--checkpoint best]
[dataset.generation.num_beams=4 ...]`.

Writes predictions, references and eval_<split>.json into the run folder (with decoding
overrides: eval_<split>,<overrides>.json) and logs the scores to its TensorBoard (test/ or
valid/). Bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import json

from rosa_bench.cli import exit_on_user_error


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--split", default="test", help="validation, test, ... (the dataset's splits)")
    parser.add_argument("--checkpoint", default="best", help="best (chosen on validation) or last")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="score only the first N inputs (E2E: meaning representations)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--no-loss", action="store_true",
                        help="generation scores only: skip the loss over the split's reference rows "
                             "(E2E test: 4,693 rows)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the run's model.trust_remote_code (runs code from the hub)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="decoding/scoring settings, e.g. dataset.generation.num_beams=4")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from rosa_bench.evaluate import evaluate_run, summary

    args = parse(argv)
    result = evaluate_run(args.run, args.split, args.checkpoint, args.max_samples,
                          progress=not args.no_progress, overrides=args.overrides,
                          trust_remote_code=args.trust_remote_code, loss=not args.no_loss)
    print(json.dumps(result["scores"], indent=2))
    print(summary(result))


if __name__ == "__main__":
    main()
