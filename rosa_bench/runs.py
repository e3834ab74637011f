"""The run-folder format: the one module that knows how a run folder is laid out.

    <output.path>/<task dir>/<run name>/
        config.yaml          the resolved, validated config
        overrides.yaml       the command-line overrides that named the run
        metrics.json         final and best validation scores, run status
        events.out.tfevents.*  TensorBoard scalars and text samples
        checkpoints/last/    model.safetensors, optimizer.safetensors, state.json
        checkpoints/last.1/  the previous 'last' (train.keep_checkpoints of them in all)
        checkpoints/best/    model.safetensors, state.json (chosen on validation only)
        data.json            fingerprints of the data the run trained on (resume compares them)
        .lock                host and process id of the process training in the folder

Everything is written atomically (temporary file or folder, then rename), so a crash
never leaves a half-written file that a resume would trust; the temporary files a kill
leaves behind are removed at the next start (`remove_temporaries`). JSON is strict: a
non-finite number is written as null, never as a bare NaN.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError
from yaml import YAMLError

from rosa_bench.config import RunConfig, validate
from rosa_bench.errors import UserError

CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
METRICS_FILE = "metrics.json"
DATA_FILE = "data.json"
CHECKPOINTS = "checkpoints"
TMP_MARK = ".tmp"  # in the names of temporary checkpoint folders: .<which>.tmp<random>


class CorruptFile(UserError):
    """A run-folder file that exists but cannot be parsed (readers may skip the run)."""

# Overrides that do not change what is trained, or are already in the folder path.
_NAME_SKIP_PREFIXES = ("dataset.cache", "dataset.name", "dataset.task", "dataset=", "fnmodel=",
                       "fnmodel.name", "model=", "model.name", "output.", "logging.progress",
                       "hydra.", "hydra/", "train.num_workers", "train.gradient_checkpointing",
                       "fnmodel.fused=")  # '=': fnmodel.fused_slices changes what is trained
_MAX_NAME = 160


def run_name(run: RunConfig, overrides: list[str]) -> str:
    """Readable, stable name: '<method>_<model>' plus the remaining overrides, sorted, so the
    same command always maps to the same folder (and resumes there)."""
    if run.output.name:
        return run.output.name
    model = run.model.name.replace("/", "-")
    extra = sorted(o.lstrip("+~") for o in overrides
                   if not o.lstrip("+~").startswith(_NAME_SKIP_PREFIXES))
    name = ",".join([f"{run.fnmodel.name}_{model}", *extra]).replace("/", "-")
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME - 9]}-{digest}"
    return name


def run_dir(run: RunConfig, task_subdir: str, overrides: list[str]) -> Path:
    return Path(run.output.path) / task_subdir / run_name(run, overrides)


@contextlib.contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """A failed write (disk full, quota, read-only or missing folder, a file where a folder
    should be) becomes one line naming the path, instead of a traceback."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
    except SafetensorError as err:  # safetensors reports its own I/O failures this way
        if "I/O error" not in str(err):
            raise
        raise UserError(f"cannot write {path}: {str(err).splitlines()[0]}") from None


def atomic_write_text(path: Path, text: str) -> None:
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def finite_json(data: Any) -> Any:
    """`data` with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (a NaN score is written as null)."""
    atomic_write_text(path, json.dumps(finite_json(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path} is not valid JSON ({err})") from None


def write_config(folder: Path, run: RunConfig, overrides: list[str]) -> None:
    atomic_write_text(folder / CONFIG_FILE, OmegaConf.to_yaml(OmegaConf.structured(run)))
    atomic_write_text(folder / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))


def read_overrides(folder: Path) -> list[str] | None:
    """The command-line overrides a run was started with (None when the folder has none)."""
    path = Path(folder) / OVERRIDES_FILE
    if not path.is_file():
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path} is not a valid override list ({str(err).splitlines()[0]})") from None
    if not isinstance(data, list):
        raise CorruptFile(f"{path} is not a valid override list (not a list)")
    return [str(item) for item in data]


def _load_config(folder: Path) -> Any:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a run folder: {CONFIG_FILE} is missing")
    try:
        cfg = OmegaConf.load(path)
    except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
        raise CorruptFile(f"{path} is not a valid config ({str(err).splitlines()[0]})") from None
    if not isinstance(cfg, dict) and not OmegaConf.is_dict(cfg):
        raise CorruptFile(f"{path} is not a valid config (not a mapping)")
    return cfg


def read_config(folder: Path, trust_remote_code: bool = False) -> RunConfig:
    """The saved config, validated. A run folder may come from anyone: its
    model.trust_remote_code is honoured only when the caller passes trust_remote_code too."""
    return refuse_untrusted(folder, validate(_load_config(folder)), trust_remote_code)


def refuse_untrusted(folder: Path, run: RunConfig, trust_remote_code: bool) -> RunConfig:
    """`run` unless its model.trust_remote_code (from a folder that may come from anyone) was
    not also asked for by the caller."""
    if run.model.trust_remote_code and not trust_remote_code:
        raise UserError(f"{Path(folder) / CONFIG_FILE} sets model.trust_remote_code=true, which runs code "
                        "from the hub; pass --trust-remote-code to allow it")
    return run


def read_config_dict(folder: Path) -> dict[str, Any]:
    """The saved config as plain data, not validated: readers such as figures.py must also
    read runs of methods this checkout does not know."""
    try:
        return OmegaConf.to_container(_load_config(folder), resolve=True)
    except OmegaConfBaseException as err:
        raise CorruptFile(f"{Path(folder) / CONFIG_FILE} is not a valid config ({err})") from None


def read_metrics(folder: Path) -> dict[str, Any]:
    path = Path(folder) / METRICS_FILE
    data = read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise CorruptFile(f"{path} is not a JSON object")
    return data


def is_complete(folder: Path) -> bool:
    return bool(read_metrics(folder).get("complete"))


def checkpoint_dir(folder: Path, which: str) -> Path:
    """`which` is 'last' or 'best'. A crash between the two renames of a checkpoint swap
    leaves only the previous one ('<which>.1', or '<which>.old' from older versions): fall
    back to it."""
    path = Path(folder) / CHECKPOINTS / which
    if not path.exists():
        for fallback in (path.with_name(which + ".1"), path.with_name(which + ".old")):
            if fallback.exists():
                return fallback
    return path


def checkpoint_history(folder: Path, which: str) -> list[Path]:
    """'<which>', '<which>.1', '<which>.2'... as they exist, newest first."""
    base = Path(folder) / CHECKPOINTS / which
    found = [base] if base.exists() else []
    index = 1
    while base.with_name(f"{which}.{index}").exists():
        found.append(base.with_name(f"{which}.{index}"))
        index += 1
    return found


def replace_dir(tmp: Path, final: Path, keep: int = 1) -> None:
    """Swap a fully written temporary folder into place, keeping the `keep - 1` previous
    versions as '<name>.1' (the newest), '<name>.2'... At every moment at least one whole
    version exists under a name that `checkpoint_dir` / `checkpoint_history` find."""
    with storage_errors(final):
        # keep=1 still moves the current one aside first ('.1'), so a crash between the two
        # renames leaves a whole checkpoint that checkpoint_dir finds
        versions = [final] + [final.with_name(f"{final.name}.{i}") for i in range(1, max(keep, 2))]
        if versions[-1].exists():
            shutil.rmtree(versions[-1])
        for newer, older in zip(reversed(versions[:-1]), reversed(versions[1:])):
            if newer.exists():
                os.rename(newer, older)
        os.rename(tmp, final)
        for stale in final.parent.glob(f"{final.name}.*"):  # beyond `keep`, or the older '.old'
            suffix = stale.name.rsplit(".", 1)[-1]
            if suffix == "old" or (suffix.isdigit() and int(suffix) >= keep):
                shutil.rmtree(stale)


def checkpoint_slot(path: Path) -> Path:
    """The canonical '<which>' folder of a path `checkpoint_dir` may have returned
    ('last.1' -> 'last'): new checkpoints are always written there."""
    return Path(path).with_name(Path(path).name.split(".", 1)[0])


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete what interrupted writes left in a run folder: '.<file>.<random>' files from
    atomic_write_text and '.<which>.tmp<random>' checkpoint folders. Call it only while
    holding the folder's lock (another process's writes in progress look the same)."""
    folder = Path(folder)
    stray = [p for p in folder.glob(".*.*") if p.is_file() and p.name != ".lock"]
    stray += [p for p in (folder / CHECKPOINTS).glob(f".*{TMP_MARK}*")]
    for path in stray:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return stray


def config_dict(run: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(run)
