"""`mendctl export`: one training checkpoint as a distiller file to ship or load with `distill.checkpoint`.

Training saves the last step as `output_dir/<stage>/distiller.safetensors`; the step to ship is the
one the learning curves chose, often an earlier checkpoint. The file holds what training changed,
with the recipe and provenance in its metadata (checkpoint.write_distiller).
"""
from __future__ import annotations

from pathlib import Path

from ..core.config import Recipe
from ..core.registry import get_backend
from ..training.checkpoint import STATE, load_trainable, read_state, write_distiller


def export_checkpoint(recipe: Recipe, checkpoint: Path, dest: Path) -> Path:
    checkpoint = Path(checkpoint)
    weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    if not weights.is_file():
        raise FileNotFoundError(f"no checkpoint weights at {weights}")
    models = get_backend(recipe.backend).build(recipe)
    load_trainable(models.distiller, weights)  # refuses, naming the file, weights of another recipe
    info = {"exported_from": str(checkpoint)}
    if (checkpoint / STATE).is_file():
        info["steps"] = read_state(checkpoint)["step"]
    write_distiller(dest, models.distiller, recipe, info)
    return Path(dest)
