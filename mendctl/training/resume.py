"""Checks before `--resume`: a run continues from every part of its state, or not at all.

Accelerate's load_state skips an unreadable RNG state file with an info-level log, and the run
then diverges silently from the one it continues. Every file a checkpoint must hold is therefore
read here first, with the loader Accelerate uses (weights_only: a file never runs code), and a
damaged or missing one stops the resume with its name.
"""
from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import STATE


class DamagedCheckpoint(ValueError):
    pass


AVERAGE = "custom_checkpoint_0.pkl"  # the weight average (`ema`), the one object registered for checkpointing


def _expected(checkpoint: Path, num_processes: int, averaged: bool) -> list[str]:
    return (["model.safetensors", "optimizer.bin", "scheduler.bin", STATE]
            + [f"random_states_{i}.pkl" for i in range(num_processes)] + [AVERAGE] * averaged)


def _load(path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(str(path))
    elif path.suffix == ".json":
        json.loads(path.read_text())
    else:
        from accelerate.utils import load

        state = load(path, map_location="cpu")
        if path.name.startswith("random_states_") and not (
                isinstance(state, dict) and {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(state)):
            raise ValueError("not a random state")


def verify_checkpoint(checkpoint: Path, num_processes: int = 1, averaged: bool = False) -> None:
    """Raises DamagedCheckpoint naming the first file of `checkpoint` that is missing or unreadable."""
    checkpoint = Path(checkpoint)
    for name in _expected(checkpoint, num_processes, averaged):
        path = checkpoint / name
        if name == AVERAGE and not path.is_file():
            raise DamagedCheckpoint(f"cannot resume with ema: {checkpoint} holds no weight average (it was written "
                                    "without ema); resume with the ema it was written with, or start over with --restart")
        if not path.is_file():
            raise DamagedCheckpoint(f"cannot resume: {path} is missing; start over with --restart, or delete "
                                    f"{checkpoint} to resume from the checkpoint before it")
        try:
            _load(path)
        except Exception as e:  # each loader has its own error types; any of them means damaged
            raise DamagedCheckpoint(f"cannot resume: {path} is damaged ({type(e).__name__}: {str(e)[:200]}); "
                                    f"start over with --restart, or delete {checkpoint} to resume from the "
                                    "checkpoint before it") from None


def trim_metrics(path: Path, resume_step: int) -> str | None:
    """Keeps metrics.jsonl's lines up to the checkpoint; drops a last line cut short by a kill.

    Returns a note for the user when a partial line was dropped.
    """
    if not path.exists():
        return None
    if resume_step == 0:  # a fresh run: nothing of an earlier one is kept, readable or not
        path.write_text("")
        return None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    keep, note = [], None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if n == len(lines):  # a write cut short by a kill: the step it logged is re-run anyway
                note = f"{path}:{n}: dropped a partial last line (the run was killed while writing it)"
                continue
            raise DamagedCheckpoint(f"{path}:{n}: not a metrics record; fix or delete the line") from None
        if step <= resume_step:
            keep.append(line)
    from ..core.fileio import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
    return note
