"""Where training state lives on disk.

output_dir/<stage>/
  distiller.safetensors, distiller.json, run.json   the final distiller, read by later stages
  best.safetensors                                  with keep_best: the distiller at the lowest val_kl
  checkpoints/step_0000100/                         resumable state (Accelerate's save_state + ours)
  metrics.jsonl
A checkpoint is written to a temporary folder and renamed when complete, so a run killed while
saving leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.config import Recipe, resolved_dict
from ..core.fileio import atomic_path, write_json
from ..core.provenance import file_hash, stamp
from ..data.workspace import WEIGHTS, find_distiller
from ..models.adapters import trainable_state

BEST = "best.safetensors"  # finetune.keep_best: the distiller at the lowest validation KL
STATE = "trainer_state.json"


def write_distiller(path: Path, distiller: nn.Module, recipe: Recipe, info: dict) -> dict:
    """Writes only what training changes (the rest, frozen body or shared LLM layers, comes from the
    recipe), with the recipe and provenance in the file's metadata: a shipped or copied distiller
    explains itself. Returns that run record."""
    run = {"recipe": resolved_dict(recipe), **stamp(), **info}
    metadata = {"format": "mendctl-distiller", "recipe": json.dumps(run["recipe"]),
                "provenance": json.dumps({k: v for k, v in run.items() if k != "recipe"}, default=str)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(Path(path)) as tmp:
        save_file({k: v.detach().contiguous() for k, v in trainable_state(distiller).items()}, str(tmp), metadata)
    return run


def save_distiller(out_dir: Path, distiller: nn.Module, recipe: Recipe, info: dict) -> Path:
    """The stage's final distiller, and beside it what it is and how it was made."""
    path = out_dir / WEIGHTS
    run = write_distiller(path, distiller, recipe, info)
    write_json(out_dir / "distiller.json", {
        "backend": recipe.backend, "num_vectors": distiller.num_vectors, "causal": distiller.causal,
        "body_config": distiller.body.config.to_dict(), "weights_sha256_16": file_hash(path)})
    write_json(out_dir / "run.json", run)
    return path


def load_distiller(distiller: nn.Module, path: Path, for_vectors: bool = True) -> str:
    """Loads trained weights into `distiller`, built from the recipe; returns their hash (what vectors files record).

    `for_vectors`: refuse weights trained with another distiller.anchor or distiller.max_correction,
    keys that change the vectors but no tensor (a training start may change them: stage 1's text
    gives every anchor mode the same anchors, and a bound only scales what the weights make)."""
    path = find_distiller(path)
    if not path.is_file():
        raise FileNotFoundError(f"no distiller weights at {path}")
    load_trainable(distiller, path)
    # Only the recipe saved with the weights tells these apart (a file without one is taken as fitting).
    trained = saved_recipe(path).get("distiller")
    if for_vectors and trained is not None:
        for key, default in (("anchor", distiller.anchor), ("max_correction", None)):
            was, now = trained.get(key, default), getattr(distiller, key)
            if was != now:
                raise ValueError(f"{path} was trained with distiller.{key}={was}; this recipe has "
                                 f"distiller.{key}={now}: its vectors would not be the ones it was trained to make")
    return file_hash(path)


def saved_recipe(path: Path) -> dict:
    """The resolved recipe a distiller file was trained with, from its metadata ({} when it has none)."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("recipe", "{}"))


def load_trainable(model: nn.Module, path: Path) -> None:
    """Exactly the model's trainable tensors, from `path`: any key missing or extra is an error."""
    try:
        saved = load_file(str(path))
    except Exception as e:  # safetensors' own error for a truncated or foreign file
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    params = trainable_state(model)
    missing, unexpected = sorted(params.keys() - saved.keys()), sorted(saved.keys() - params.keys())
    misshapen = sorted(k for k in params.keys() & saved.keys() if saved[k].shape != params[k].shape)
    problems = [f"{what} {keys[:3]}" for what, keys in
                (("missing", missing), ("unexpected", unexpected), ("other shape", misshapen)) if keys]
    if problems:
        raise ValueError(f"{path} does not fit this recipe's distiller ({', '.join(problems)}): "
                         "was it trained with another recipe?")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


def keep_trainable_in_checkpoints(accelerator) -> None:
    """Accelerate's save_state and load_state see only the distiller's trainable tensors (its model.safetensors)."""
    from accelerate.utils.constants import SAFE_MODEL_NAME

    def on_save(models, weights, _dir):
        for model, state in zip(models, weights):
            keep = trainable_state(model).keys()
            for k in [k for k in state if k not in keep]:
                del state[k]

    def on_load(models, input_dir):
        for i, model in enumerate(models):
            load_trainable(model, Path(input_dir) / f"{SAFE_MODEL_NAME}{f'_{i}' if i else ''}.safetensors")
        models.clear()  # loaded here, strictly: Accelerate's loader would want the frozen tensors too

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step_") and (p / STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator, root: Path, step: int, state: dict, keep_last: int) -> Path:
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            (tmp / STATE).write_text(json.dumps(state, indent=2))
    except BaseException:
        # A full disk or a kill while saving: leave no half-written folder behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict:
    path = checkpoint / STATE
    try:
        state = json.loads(path.read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is damaged (not the JSON this trainer writes); start over with --restart, or "
                         f"delete {checkpoint} to resume from the checkpoint before it") from None
    return state
