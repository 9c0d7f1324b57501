"""A file a user names with --out: written whole or not at all, and never over one that exists
unless they say --force (as `cp` does)."""
from __future__ import annotations

from pathlib import Path


def check_out(path: Path, force: bool) -> None:
    if path.is_dir():
        raise ValueError(f"{path}: --out names a folder; give a file path")
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists: pass --force to overwrite it")
