"""One writer per output folder: every command that writes holds a lock on it for its whole run.

The lock is an OS file lock (the `filelock` library), so it goes away with the process that held it,
even after a SIGKILL: a stale lock file never blocks a later run. Beside it, a small JSON file says
who holds it (pid, host, command, start time), for the message a second run is refused with.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

LOCK = ".mendctl.lock"
HOLDER = ".mendctl.lock.json"


class OutputDirError(ValueError):
    """The output folder cannot be used: not a folder, not writable, or held by another run."""


def _is_main_process() -> bool:
    # Under `accelerate launch` every process runs the command; the one of global rank 0 holds the lock.
    return os.environ.get("RANK", "0") == "0"


def prepare_output_dir(path: Path) -> Path:
    """Creates `path` if needed and checks it is a writable folder, with a message the user can act on."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise OutputDirError(f"output folder {path}: {parent} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create the output folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputDirError(f"output folder {path} is not writable")
    return path


def _holder(path: Path) -> str:
    try:
        info = json.loads((path / HOLDER).read_text())
        return (f"pid {info['pid']} on {info['host']}, `{info['command']}`, started {info['started']}")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are unreadable)"


@contextmanager
def output_lock(path: Path, command: str):
    """Holds the lock of output folder `path` for the block; refuses at once if another run holds it."""
    path = prepare_output_dir(path)
    if not _is_main_process():
        yield path
        return
    lock = FileLock(str(path / LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputDirError(f"{path} is in use by another mendctl run ({_holder(path)}); wait for it to end, "
                             "or use another output_dir") from None
    except OSError as e:
        raise OutputDirError(f"cannot lock the output folder {path}: {e.strerror}") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        (path / HOLDER).write_text(json.dumps(info) + "\n")
        yield path
    finally:
        try:
            (path / HOLDER).unlink(missing_ok=True)
        finally:
            lock.release()


def command_line() -> str:
    return " ".join(["mendctl", *sys.argv[1:]])
