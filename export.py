"""Export a run: `python export.py --run runs/e2e_nlg/<run> --out <dir> [--checkpoint best|last]
[--format merged|peft]`.

merged: a plain transformers folder (config, safetensors, tokenizer, generation config) with the
update folded in; peft: a PEFT LoRA adapter folder (lora and peft_lora runs). Bad input exits 2
with one line."""

from __future__ import annotations

import argparse

from rosa_bench.cli import exit_on_user_error


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder (holds config.yaml and checkpoints/)")
    parser.add_argument("--out", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--checkpoint", default="best", help="best (chosen on validation) or last")
    parser.add_argument("--format", default="merged", help="merged (every mergeable method) or peft "
                                                           "(lora, peft_lora)")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    from rosa_bench.export import export_run

    args = parse(argv)
    for folder in export_run(args.run, args.out, args.checkpoint, args.format):
        print(f"exported ({args.format}): {folder}")


if __name__ == "__main__":
    main()
