"""Writing files: whole or absent, never through a link, and a full disk said as such.

Atomic writes: a reader, or a run killed mid-write, never sees half a file. Every file is written to a
new temporary file beside its place and renamed over it; a file opened to append is opened without
following a link. A link planted where a file or folder of ours goes (say, in a shared run folder) is
refused, naming it: mendctl never writes to what a link points to. A write that fails because the disk
is full is reported as a DiskFull naming the folder and the bytes, whichever library did the writing.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class LinkRefused(ValueError):
    """A symbolic link where mendctl writes a file or folder of its own."""


class DiskFull(ValueError):
    """No room left for what mendctl writes: the user's to fix (free space, or another folder)."""


# How libraries report a full disk without an OSError: safetensors' Rust error, torch's zip writer.
_FULL_DISK_TEXT = ("no space left", "os error 28", "code: 28", "storagefull", "file write failed", "unexpected pos",
                   "disk quota")
_LOW_SPACE = 1 << 20  # a write that failed with less than this free failed for want of space


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def refuse_link(path: Path) -> Path:
    """`path` if it is no symbolic link; a LinkRefused naming it if it is one."""
    path = Path(path)
    if path.is_symlink():
        raise LinkRefused(f"{path} is a symbolic link (to {os.readlink(path)}); mendctl writes no file through "
                          "a link: remove it, or use another output_dir")
    return path


def refuse_links_in(root: Path) -> None:
    """Refuses any symbolic link inside the folder `root` (not `root` itself, which a user may link to a
    larger disk): every file and folder below it is one mendctl writes or may rewrite."""
    root = Path(root)
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root):  # followlinks=False: a linked folder is listed, not entered
        for name in dirs + files:
            refuse_link(Path(folder) / name)


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full(folder: Path, needed: int | None = None) -> DiskFull:
    free = free_bytes(folder)
    need = f"{needed} bytes needed, " if needed else ""
    have = f"{free} free" if free is not None else "no room left"
    return DiskFull(f"{folder}: No space left on device ({need}{have}); free some space there, or write elsewhere "
                    "(another output_dir, or MENDCTL_CACHE for the cache)")


def is_disk_full(error: BaseException, folder: Path, needed: int | None = None) -> bool:
    """Whether `error`, raised while writing into `folder`, came of a full disk."""
    if isinstance(error, DiskFull):
        return False  # already said
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(error, Exception) or isinstance(error, LinkRefused):
        return False
    if says_disk_full(error):
        return True
    free = free_bytes(folder)
    return free is not None and free < max(needed or 0, _LOW_SPACE)


def says_disk_full(error: BaseException) -> bool:
    """Whether a library's error, not an OSError, says the disk is full in its own words."""
    return not isinstance(error, DiskFull) and any(text in str(error).lower() for text in _FULL_DISK_TEXT)


def check_space(folder: Path, needed: int) -> None:
    """Refuses, before anything is written, a write of `needed` bytes that cannot fit in `folder`."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise disk_full(folder, needed)


@contextmanager
def full_disk_said(folder: Path, needed: int | None = None):
    """Turns an error of the block that came of a full disk into a DiskFull naming `folder`."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e, folder, needed):
            raise disk_full(folder, needed) from None
        raise


@contextmanager
def atomic_path(path: Path, size: int | None = None):
    """Yields a temporary path beside `path`; renames it over `path` only if the block succeeds.

    `size`, when known, is checked against the free space first. A link at `path`, or a folder, is
    refused rather than replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    refuse_link(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder is in the place of this file: remove it", str(path))
    if size is not None:
        check_space(path.parent, size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with full_disk_said(path.parent, size):
            yield Path(tmp)
            # mkstemp makes the file private (0600); give it the permissions a plain open() would.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def open_append(path: Path):
    """`path` opened to append text, created if absent; a link there is refused, never followed."""
    path = Path(path)
    refuse_link(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written atomically, byte for byte the same for the same tensors and metadata.

    safetensors writes its JSON header from a hash map, in an order that changes from run to run; the
    header is written again here with its keys sorted (its offsets are relative to the data, which stays
    where it is)."""
    from safetensors.torch import save_file

    size = sum(t.numel() * t.element_size() for t in tensors.values()) + sum(
        len(k) + len(v) for k, v in (metadata or {}).items())
    with atomic_path(path, size) as tmp:
        save_file(tensors, str(tmp), metadata)
        _sort_header(tmp)


def _sort_header(path: Path) -> None:
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.dumps(json.loads(f.read(n)), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(header) <= n:  # the same keys and values in another order: it fits where the old one was
            f.seek(8)
            f.write(header + b" " * (n - len(header)))
            return
        f.seek(8 + n)
        data = f.read()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
