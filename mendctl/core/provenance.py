"""What every output is stamped with: package versions and the git commit it was made from, and for
results the models that made them."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import __version__

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "pydantic")


def versions() -> dict[str, str]:
    out = {"mendctl": __version__, "python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_hash() -> str | None:
    """The commit of the mendctl checkout in use ("+dirty" when it has local changes); None outside git."""
    here = Path(__file__).resolve().parent
    # Read only: `git status` would otherwise refresh the checkout's index (a write, and a lock another
    # git command may trip over); --no-optional-locks and GIT_OPTIONAL_LOCKS=0 make it leave the index alone.
    git = ["git", "--no-optional-locks"]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        rev = subprocess.run([*git, "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, env=env)
        if rev.returncode:
            return None
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, env=env).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def stamp() -> dict:
    return {"versions": versions(), "git": git_hash()}


SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")


def models_stamp(models, distiller_hash: str, backend: str) -> dict:
    """Which LLM, distiller and LLM tokenizer made a result, as lm-evaluation-harness stamps its own:
    two scores compare only when the same LLM read the same special tokens (a BOS more or less, or
    another pad, moves every option loss)."""
    tok = models.llm_tokenizer
    named = tok.special_tokens_map  # only the tokens set: asking a tokenizer for an unset one logs an error
    specials = {}
    for name in SPECIAL_TOKENS:
        token = named.get(f"{name}_token")
        specials[name] = {"token": None, "id": None} if token is None else \
            {"token": str(token), "id": tok.convert_tokens_to_ids(str(token))}
    return {"backend": backend, "llm_id": models.llm_id, "llm_config_hash": models.llm_config_hash,
            "distiller_hash": distiller_hash, "tokenizer": specials}


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """A cheap hash of a model's weights: a strided sample of every tensor, enough to tell two models of
    one config apart (the teacher cache's key and vectors files record it)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().flatten()[::997].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def portable_paths(value, root: Path):
    """`value` (JSON-like data) with every absolute path made relative to `root`, or None where it lies
    outside: what a file meant to be shipped records, so that it names no folder of the machine that
    made it."""
    if isinstance(value, dict):
        return {k: portable_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_paths(v, root) for v in value]
    if isinstance(value, str) and Path(value).is_absolute():
        try:
            return Path(value).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            return None
    return value
