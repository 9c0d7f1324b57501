"""Distilled vectors files: one safetensors file per demonstration set, usable without the distiller.

A file holds the tensor `vectors` [K, d_llm] and string metadata saying what made it and for which
LLM; loading it against another LLM is refused rather than silently giving garbage.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .fileio import atomic_path

FORMAT_VERSION = "1"
REQUIRED = ("format_version", "llm_id", "llm_config_hash", "distiller_hash", "num_vectors", "dtype", "task",
            "num_demos", "demos_hash", "template", "mendctl_version", "backend")


class VectorsMismatch(ValueError):
    pass


@dataclass
class VectorsFile:
    vectors: torch.Tensor  # [K, d_llm]
    metadata: dict[str, str]
    path: Path | None = None

    @property
    def template(self) -> dict:
        return json.loads(self.metadata["template"])


def as_metadata(values: dict) -> dict[str, str]:
    """Values as safetensors stores metadata (strings; dicts and lists as sorted JSON)."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v) for k, v in values.items()}


def file_metadata(vectors: torch.Tensor, metadata: dict) -> dict[str, str]:
    """`metadata` as a vectors file holds it: strings, with the format's own keys."""
    meta = as_metadata(metadata)
    meta.update(format_version=FORMAT_VERSION, mendctl_version=__version__, num_vectors=str(vectors.shape[0]),
                dtype=str(vectors.dtype).removeprefix("torch."))
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"vectors metadata lacks {missing}")
    return meta


def save_vectors(path: Path, vectors: torch.Tensor, metadata: dict) -> None:
    meta = file_metadata(vectors, metadata)
    with atomic_path(Path(path)) as tmp:
        save_file({"vectors": vectors.detach().cpu().contiguous()}, str(tmp), metadata=meta)


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise VectorsMismatch(f"{path}: not a readable safetensors file ({e})") from None


def read_metadata(path: Path) -> dict[str, str]:
    with _open(path) as f:
        return dict(f.metadata() or {})


def config_hash(config) -> str:
    """What a transformers config says the LLM is: vectors files made for another are refused on it."""
    keep = {k: v for k, v in config.to_dict().items()
            if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_compatible(vf: VectorsFile, config_hash: str, hidden_size: int, where: str) -> None:
    meta = vf.metadata
    if meta.get("format_version") != FORMAT_VERSION:
        raise VectorsMismatch(f"{where}: format version {meta.get('format_version')!r}, this mendctl reads {FORMAT_VERSION}")
    if meta["llm_config_hash"] != config_hash or vf.vectors.shape[-1] != hidden_size:
        raise VectorsMismatch(
            f"{where} was distilled for LLM {meta['llm_id']} (config {meta['llm_config_hash']}, "
            f"hidden {vf.vectors.shape[-1]}), not for the LLM in use (config {config_hash}, hidden {hidden_size}). "
            "Distil vectors for this LLM with `mendctl distill`.")


def load_vectors(path: str | Path, model=None) -> VectorsFile:
    """Reads a vectors file; with `model` (a transformers model) also checks it was made for that LLM."""
    path = Path(path)
    with _open(path) as f:
        meta = dict(f.metadata() or {})
        if "vectors" not in f.keys():
            raise VectorsMismatch(f"{path}: not a mendctl vectors file (no 'vectors' tensor)")
        vectors = f.get_tensor("vectors")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise VectorsMismatch(f"{path}: not a mendctl vectors file (metadata lacks {', '.join(missing)})")
    vf = VectorsFile(vectors, meta, path)
    if model is not None:
        check_compatible(vf, config_hash(model.config), model.get_input_embeddings().weight.shape[1], str(path))
    return vf

