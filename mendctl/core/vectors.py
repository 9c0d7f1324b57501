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

from . import __version__
from .fileio import atomic_path, save_safetensors
from .provenance import weights_fingerprint

FORMAT_VERSION = "1"
REQUIRED = ("format_version", "llm_id", "llm_config_hash", "distiller_hash", "num_vectors", "dtype", "task",
            "num_demos", "demos_hash", "template", "mendctl_version", "backend")


# The fingerprint of the LLM's weights (provenance.weights_fingerprint), beside its config hash.
WEIGHTS_KEY = "llm_weights"


class VectorsMismatch(ValueError):
    pass


class BadVectors(ValueError):
    """A vectors file whose tensor cannot be what mendctl wrote: another shape, dtype or non-finite values.
    Never used: an all-NaN prefix scores every option alike, and the results would not show it."""


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(vectors: torch.Tensor, meta: dict[str, str], where: str, num_vectors: int | None = None) -> None:
    """Raises BadVectors naming `where` and the fault: shape [K, hidden] (K as the metadata says, and as
    `num_vectors` when given), a float dtype as the metadata says, finite values."""
    if vectors.dim() != 2:
        raise BadVectors(f"{where}: the vectors tensor has shape {list(vectors.shape)}, not [K, hidden]")
    k = vectors.shape[0]
    if k < 1 or vectors.shape[1] < 1:
        raise BadVectors(f"{where}: the vectors tensor is empty (shape {list(vectors.shape)})")
    if meta.get("num_vectors") != str(k):
        raise BadVectors(f"{where}: holds {k} vectors, its metadata says num_vectors={meta.get('num_vectors')!r}")
    if num_vectors is not None and k != num_vectors:
        raise BadVectors(f"{where}: holds {k} vectors, the recipe has num_vectors={num_vectors}; make them again "
                         "with `mendctl distill --force`")
    if vectors.dtype not in FLOAT_DTYPES or meta.get("dtype") != str(vectors.dtype).removeprefix("torch."):
        raise BadVectors(f"{where}: the vectors are {str(vectors.dtype).removeprefix('torch.')}, its metadata says "
                         f"dtype={meta.get('dtype')!r} (one of float32, bfloat16, float16)")
    if not bool(torch.isfinite(vectors).all()):
        bad = int((~torch.isfinite(vectors)).sum())
        raise BadVectors(f"{where}: {bad} of its {vectors.numel()} values are not finite (nan or inf); make them "
                         "again with `mendctl distill --force`")


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
    # A distiller that made nan (say, from a diverged checkpoint) must not leave a file that eval would use.
    check_tensor(vectors, meta, str(path))
    save_safetensors(Path(path), {"vectors": vectors.detach().cpu().contiguous()}, meta)


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


def weights_match(meta: dict[str, str], weights: str | None) -> bool:
    """Whether a file was made for these weights. A file written before files recorded the weights'
    fingerprint (no `llm_weights`) is held to its LLM's config alone."""
    return weights is None or meta.get(WEIGHTS_KEY, weights) == weights


def check_compatible(vf: VectorsFile, config_hash: str, hidden_size: int, where: str,
                     weights: str | None = None) -> None:
    """Refuses a file made for another LLM: another config, or (`weights`, the fingerprint of the
    weights in use) the same config with other weights."""
    meta = vf.metadata
    if meta.get("format_version") != FORMAT_VERSION:
        raise VectorsMismatch(f"{where}: format version {meta.get('format_version')!r}, this mendctl reads {FORMAT_VERSION}")
    if meta["llm_config_hash"] != config_hash or vf.vectors.shape[-1] != hidden_size:
        raise VectorsMismatch(
            f"{where} was distilled for LLM {meta['llm_id']} (config {meta['llm_config_hash']}, "
            f"hidden {vf.vectors.shape[-1]}), not for the LLM in use (config {config_hash}, hidden {hidden_size}). "
            "Distil vectors for this LLM with `mendctl distill`.")
    if not weights_match(meta, weights):
        raise VectorsMismatch(
            f"{where} was distilled for LLM {meta['llm_id']} with weights {meta[WEIGHTS_KEY]}, not for the "
            f"weights in use ({weights}; the same config {config_hash}). "
            "Distil vectors for these weights with `mendctl distill`.")


def load_vectors(path: str | Path, model=None) -> VectorsFile:
    """Reads a vectors file; with `model` (a transformers model) also checks it was made for that LLM."""
    path = Path(path)
    if path.is_dir():
        raise VectorsMismatch(f"{path} is a folder, not a vectors file")
    with _open(path) as f:
        meta = dict(f.metadata() or {})
        if "vectors" not in f.keys():
            raise VectorsMismatch(f"{path}: not a mendctl vectors file (no 'vectors' tensor)")
        vectors = f.get_tensor("vectors")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise VectorsMismatch(f"{path}: not a mendctl vectors file (metadata lacks {', '.join(missing)})")
    check_tensor(vectors, meta, str(path))
    vf = VectorsFile(vectors, meta, path)
    if model is not None:
        check_model(vf, model, str(path))
    return vf


def check_model(vf: VectorsFile, model, where: str) -> None:
    """Refuses a file made for another LLM than `model` (its config or its weights)."""
    check_compatible(vf, config_hash(model.config), model.get_input_embeddings().weight.shape[1], where,
                     weights_fingerprint(model))
