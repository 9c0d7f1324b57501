"""The recipe's models with its trained distiller loaded: what `distill` and `eval` start from."""
from __future__ import annotations

import torch

from ..core.config import Recipe
from ..core.registry import get_backend
from ..data.workspace import trained_distiller
from ..models.backend import Models
from .checkpoint import load_distiller

UNTRAINED = "untrained"  # the distiller hash load_trained reports when no trained weights exist


def load_trained(recipe: Recipe, require: bool = True) -> tuple[Models, str]:
    """The recipe's models, on the GPU when there is one, with the latest trained distiller loaded.

    Returns them and the distiller weights' hash ("untrained" when `require` is off and none exists,
    and always when the vectors start from the anchors: distill.refine_from: anchors runs no distiller,
    so none is needed, and its weights changing leaves the vectors as they were).
    """
    models = get_backend(recipe.backend).build(recipe)
    if recipe.distill.refine_from == "anchors":
        require, source = False, None
    else:
        source = trained_distiller(recipe)
    if source is None and require:
        raise FileNotFoundError(f"no trained distiller under {recipe.output_dir}: run `mendctl pretrain` and/or "
                                "`mendctl finetune` first, or set distill.checkpoint")
    distiller_hash = load_distiller(models.distiller, source) if source is not None else UNTRAINED
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models.llm.to(device)
    models.distiller.to(device)
    return models, distiller_hash
