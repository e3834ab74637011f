"""One process per run folder: a lock file naming its owner's host and process id.

The lock is an exclusive `flock` on `<run folder>/.lock`, held for as long as the process
trains there; the kernel releases it when the process dies, however it dies, so a lock left
by a killed process is recognised as stale and taken over (with a warning naming the dead
owner). The file's content names the owner, so a second process refuses with a message
saying who holds the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from rosa_bench.errors import UserError
from rosa_bench.runs import storage_errors

LOCK_FILE = ".lock"

log = logging.getLogger(__name__)


def _owner(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


def _describe(owner: dict) -> str:
    return f"process {owner.get('pid', '?')} on host {owner.get('host', '?')}"


def acquire(folder: Path) -> int:
    """Lock `folder` (which must exist) for this process; returns the descriptor to keep open.
    Raises UserError naming the owner when another live process holds it."""
    path = Path(folder) / LOCK_FILE
    while True:
        with storage_errors(path):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise UserError(f"run folder {folder} is in use by {_describe(owner)} (lock {path}); "
                            "wait for it to finish, or use another output.name") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous owner removed the file while we opened it: try again
    previous = _owner(fd)
    if previous:
        log.warning("taking over the stale lock %s of %s (no longer running)", path, _describe(previous))
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
    with storage_errors(path):
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        os.fsync(fd)
    return fd


def release(folder: Path, fd: int) -> None:
    """Remove the lock file, then let go of the lock (in this order, see `acquire`)."""
    (Path(folder) / LOCK_FILE).unlink(missing_ok=True)
    os.close(fd)


@contextlib.contextmanager
def held(folder: Path) -> Iterator[None]:
    fd = acquire(folder)
    try:
        yield
    finally:
        release(folder, fd)
