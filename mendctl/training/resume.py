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
        from ..core.bounded import loads_json

        loads_json(path.read_text(encoding="utf-8"), str(path))
    else:
        from accelerate.utils import load

        state = load(path, map_location="cpu")
        if path.name.startswith("random_states_") and not (
                isinstance(state, dict) and {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(state)):
            raise ValueError("not a random state")
        if path.name == "optimizer.bin" and not (
                isinstance(state, dict) and isinstance(state.get("state"), dict)
                and isinstance(state.get("param_groups"), list) and state["param_groups"]):
            raise ValueError("not an optimizer state")


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


# What may differ between a run and its --resume, in the stage's own section: how long it runs, how often
# it saves, scores and keeps checkpoints, and where it logs. Everything else the checkpoint was trained
# with (lr, data, models, K, seeds...) must be what the resumed run trains with, or its end would be
# neither run's, while run.json and the distiller's metadata recorded the new recipe.
MAY_CHANGE_ON_RESUME = ("steps", "save_every", "keep_last", "eval_every", "trackers")
# Sections that training never reads, and where the run lives: free to differ.
_NOT_TRAINED_ON = ("output_dir", "distill", "eval")


def _flat(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict) and data:
        out = {}
        for k, v in data.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: data}


def recipe_changes(saved: dict, now: dict, stage: str) -> list[str]:
    """The keys (dotted) whose values differ between the checkpoint's resolved recipe and this one,
    leaving out what may change on resume; each as `key: old -> new`."""
    other = {"pretrain": "finetune", "finetune": "pretrain"}[stage]
    free = {f"{stage}.{k}" for k in MAY_CHANGE_ON_RESUME}
    skip = (*_NOT_TRAINED_ON, other)
    a, b = _flat(saved), _flat(now)
    changed = []
    for key in sorted(a.keys() | b.keys()):
        if key in free or key.split(".")[0] in skip:
            continue
        if a.get(key, "(unset)") != b.get(key, "(unset)"):
            changed.append(f"{key}: {json.dumps(a.get(key, '(unset)'))} -> {json.dumps(b.get(key, '(unset)'))}")
    return changed


def check_same_recipe(state: dict, now: dict, stage: str, checkpoint: Path) -> None:
    """Refuses a --resume whose recipe differs from the one `checkpoint` was trained with, naming the keys."""
    saved = state.get("recipe")
    if saved is None:  # written before checkpoints recorded their recipe: nothing to compare with
        return
    if not isinstance(saved, dict):
        raise DamagedCheckpoint(f"{checkpoint / STATE} is damaged (its recipe is not a mapping); start over with "
                                "--restart")
    changed = recipe_changes(saved, now, stage)
    if changed:
        allowed = ", ".join(f"{stage}.{k}" for k in MAY_CHANGE_ON_RESUME)
        raise DamagedCheckpoint(f"--resume: the recipe differs from the one {checkpoint} was trained with: "
                                f"{'; '.join(changed)}. Only {allowed} may change on resume: resume with the run's "
                                "own values, or start over with --restart")


def trim_metrics(path: Path, resume_step: int) -> str | None:
    """Keeps metrics.jsonl's lines up to the checkpoint; drops a last line cut short by a kill.

    Returns a note for the user when a partial line was dropped.
    """
    if not path.exists():
        return None
    from ..core.fileio import atomic_path, write_text

    if resume_step == 0:  # a fresh run: nothing of an earlier one is kept, readable or not
        write_text(path, "")
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
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))
    return note
