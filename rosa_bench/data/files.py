"""Helpers shared by the dataset modules: finding the official files under the data root,
reading them with errors that point at the bad line, the Hugging Face Hub fallback, and
right-padding batches.

Every failure a user can fix (missing files, unreachable hub, malformed rows) becomes a
UserError that names the file, so a run stops with one clear line instead of a traceback.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import torch

from rosa_bench.config import DatasetConfig
from rosa_bench.errors import UserError

FIX_HINT = "set ROSA_BENCH_DATA or dataset.cache to a data root that holds them"


def local_files(cfg: DatasetConfig, wanted: dict[str, str]) -> tuple[dict[str, Path], list[str]]:
    """Split `wanted` (split -> path relative to the data root) into the files that exist
    under `cfg.cache` and the (absolute, when a root is set) paths that are missing."""
    if not cfg.cache:
        return {}, list(wanted.values())
    root = Path(cfg.cache).expanduser().resolve()
    found = {split: root / rel for split, rel in wanted.items() if (root / rel).is_file()}
    missing = [str(root / rel) for split, rel in wanted.items() if split not in found]
    return found, missing


def load_hub(cfg: DatasetConfig, config_name: str | None, missing: list[str]) -> datasets.DatasetDict:
    """The Hub copy, for when local files are missing. Any failure to load it means the data
    is not available, so it becomes a UserError naming the missing files and the hub error."""
    where = ", ".join(missing) if cfg.cache else f"{', '.join(missing)} (dataset.cache is not set)"
    if not cfg.hub_id:
        raise UserError(f"dataset {cfg.name}: missing {where} and no dataset.hub_id to download from; "
                        f"{FIX_HINT}")
    try:
        return datasets.load_dataset(cfg.hub_id, config_name)
    except Exception as err:  # network, auth, missing repo: all mean "no data"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"dataset {cfg.name}: missing {where}, and the Hugging Face Hub copy "
                        f"{cfg.hub_id!r} could not be loaded ({reason}); {FIX_HINT}") from None


def malformed(path: Path, line: int, problem: str) -> UserError:
    return UserError(f"malformed data in {path}, line {line}: {problem}")


def read_table(path: Path, delimiter: str, names: tuple[str, ...] | None = None,
               required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row as {column: text}) from a CSV/TSV file.

    TSVs are read with QUOTE_NONE because GLUE text holds unbalanced quotes, and as utf-8-sig
    because MRPC's header starts with a BOM. `names` is for headerless files (CoLA); otherwise
    the first row is the header and must contain the `required` columns.
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        try:
            header = list(names) if names else next(reader, [])
            absent = [col for col in required if col not in header]
            if absent:
                raise malformed(path, 1, f"header {header} lacks column(s) {absent}")
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise malformed(path, reader.line_num,
                                    f"expected {len(header)} fields {header}, found {len(row)}: {row!r:.300}")
                if any("\0" in field for field in row):
                    raise malformed(path, reader.line_num, "binary data (a NUL byte), not a text table")
                yield reader.line_num, dict(zip(header, row))
        except UnicodeDecodeError as err:
            raise not_utf8(path, err) from None
        except csv.Error as err:  # NUL bytes, runaway fields: a binary or damaged file
            raise malformed(path, reader.line_num + 1, f"not a {'TSV' if delimiter == chr(9) else 'CSV'} "
                            f"text file ({err})") from None


def not_utf8(path: Path, err: UnicodeDecodeError) -> UserError:
    """Name the line of the first byte that is not UTF-8 (the decoder only knows its offset
    within one read buffer, so the file is decoded again to find it)."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
        offset = 0
    except UnicodeDecodeError as full:
        offset = full.start
    return malformed(path, raw[:offset].count(b"\n") + 1,
                     f"not UTF-8 text (byte 0x{raw[offset]:02x} at offset {offset}: {err.reason})")


def cap(split: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first `limit` rows (all when None): caps are applied before tokenizing."""
    return split if limit is None or limit >= len(split) else split.select(range(limit))


def pad_right(rows: list[dict[str, Any]], fills: dict[str, int]) -> dict[str, torch.Tensor]:
    """Right-pad each sequence column in `fills` with its fill value, and build attention_mask
    from the input_ids lengths (so rows need not store one)."""
    width = max(len(row["input_ids"]) for row in rows)
    batch = {key: torch.tensor([row[key] + [fill] * (width - len(row[key])) for row in rows])
             for key, fill in fills.items() if key in rows[0]}
    batch["attention_mask"] = torch.tensor(
        [[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in rows])
    return batch


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, else its eos (GPT-2 style tokenizers have no pad); the
    vocabulary is never changed."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise UserError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token")
    return pad


def read_json_rows(path: Path, required: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a JSON array file or a JSON Lines file (`.jsonl`), each holding `required`."""
    import json

    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise malformed(path, err.lineno, f"invalid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None
    if not isinstance(rows, list):
        raise malformed(path, 1, "expected a JSON array of objects")
    for number, row in enumerate(rows, 1):
        absent = [key for key in required if not isinstance(row, dict) or key not in row]
        if absent:
            raise malformed(path, number, f"row {number} lacks field(s) {absent}")
    return rows
