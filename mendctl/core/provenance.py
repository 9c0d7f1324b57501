"""What every output is stamped with: package versions and the git commit it was made from, and for
results the models that made them."""
from __future__ import annotations

import hashlib
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
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
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
