"""The vectors a recipe makes of each demonstration set, and how each was made.

`mendctl distill` makes one vectors folder per variant: the distill section itself
(`output_dir/vectors`) and each of `distill.variants`, the distill section with some refine_* keys
changed (`output_dir/vectors-<key>=<value>,...`, named by those keys). `mendctl eval` scores each
folder as its own row.

How a file's vectors were made is a fact recorded in its metadata (`method`), not a name a recipe
gives them:

- `fitted`: no distiller ran; the vectors were fitted to the set alone (refine_from: anchors);
- `mend`: the trained distiller's vectors, one forward pass, no steps;
- `mend+fit`: the trained distiller's vectors, then refine_steps steps on the set.

Rows are named by the method and, where there are steps, their number: `mend`, `mend+fit@5`,
`fitted@30`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..core.config import DistillSpec, Recipe
from .trained import UNTRAINED

METHOD = "method"  # the metadata key of a vectors file
ORDER = ("mend", "mend+fit", "fitted")  # the trained distiller first


def method_of(refinement: dict) -> str:
    """The method of vectors made with this refinement (refine.refinement / refinement_of)."""
    if refinement["refine_from"] == "anchors":
        return "fitted"
    return "mend+fit" if refinement["refine_steps"] else "mend"


def made_by(spec: DistillSpec, distiller_hash: str) -> str:
    """The distiller hash vectors made with `spec` record: none ran when they start from the anchors."""
    return UNTRAINED if spec.refine_from == "anchors" else distiller_hash


def row_name(method: str, steps: int) -> str:
    return method if method == "mend" else f"{method}@{steps}"


@dataclass
class Variant:
    recipe: Recipe  # the recipe with this variant's distill section
    folder: str     # under output_dir
    keys: dict      # what it changes of the distill section ({} for the section itself)

    @property
    def spec(self) -> DistillSpec:
        return self.recipe.distill


def folder_name(keys: dict) -> str:
    return "vectors" + ("-" + ",".join(f"{k}={v}" for k, v in sorted(keys.items())) if keys else "")


def variants(recipe: Recipe) -> list[Variant]:
    """The distill section, then each of distill.variants, each with its own recipe and folder."""
    out = [Variant(recipe, folder_name({}), {})]
    for v in recipe.distill.variants:
        spec = recipe.distill.model_copy(update={**v.keys(), "variants": []})
        out.append(Variant(recipe.model_copy(update={"distill": spec}), folder_name(v.keys()), v.keys()))
    return out


def needing_distiller(recipe: Recipe) -> Recipe:
    """The recipe to load models for: one that loads the trained distiller when some variant runs it."""
    return next((v.recipe for v in variants(recipe) if v.spec.refine_from == "distiller"), recipe)


def ordered(rows: dict[str, tuple[str, int]]) -> list[str]:
    """Row names in table order: mend, mend+fit by steps, fitted by steps; `rows` maps name -> (method, steps)."""
    return sorted(rows, key=lambda name: (ORDER.index(rows[name][0]), rows[name][1]))
