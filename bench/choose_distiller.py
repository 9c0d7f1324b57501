"""Distiller files scored on the recipe's validation tasks, to choose the one to ship (never on test tasks).

    .venv/bin/python bench/choose_distiller.py RECIPE DISTILLER.safetensors ... [--set key=value ...] [--out JSON]

Each file is loaded into the recipe's models (as `distill.checkpoint=` would) and scored on
`tasks.validation` with `finetune.eval_queries` queries a task, as the learning curves score it:
macro-F1, agreement with ICL and KL(ICL || MEND), beside zero-shot's. The lowest KL is chosen.
A file trained with another `num_vectors` or `distiller` section (anchor, depth, ...) than the
recipe's is scored with its own, read from the recipe saved with it; the rest is RECIPE's.
Writes bench/results/choose_distiller.json, or --out.
"""
import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from mendctl.training.checkpoint import load_distiller, saved_recipe
from mendctl.models.backend import Models
from mendctl.core.config import DistillerSpec, Recipe, load_recipe
from mendctl.training.curves import Validation
from mendctl.data.prepare import prepare
from mendctl.core.provenance import file_hash, stamp
from mendctl.core.registry import get_backend


def own_keys(path: Path) -> list[str]:
    """The overrides that give a recipe the distiller `path` was trained as: its num_vectors and distiller keys."""
    saved = saved_recipe(path)
    # every key of the section, those added since the file was written at their defaults (which build the
    # distiller as it was), so that none comes from the recipe at hand
    section = DistillerSpec.model_validate(saved["distiller"]).model_dump(mode="json") if "distiller" in saved else {}
    keys = [f"distiller.{k}={json.dumps(v)}" for k, v in sorted(section.items())]
    return keys + ([f"num_vectors={saved['num_vectors']}"] if "num_vectors" in saved else [])


def distiller_args(out: str) -> argparse.Namespace:
    """RECIPE DISTILLER... [--set key=value ...] [--out JSON]: the command line of the scripts that score files."""
    ap = argparse.ArgumentParser()
    ap.add_argument("recipe")
    ap.add_argument("distillers", nargs="+", type=Path)
    ap.add_argument("--set", action="append", default=[], help="key=value recipe override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap.parse_args()


def by_recipe(args: argparse.Namespace, queries: int | None = None
              ) -> Iterator[tuple[Recipe, Models, Validation, list[Path]]]:
    """The files grouped by the recipe each was trained as, with that recipe's models and validation sets
    (`queries` a set, default finetune.eval_queries), built once a group."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    for path in args.distillers:
        groups.setdefault(tuple(own_keys(path)), []).append(path)
    for keys, paths in groups.items():
        recipe = load_recipe(args.recipe, [*args.set, *keys])
        prepare(recipe, "finetune", "finetune")
        backend = get_backend(recipe.backend)
        models = backend.build(recipe)
        validation = Validation(recipe, models, backend.template(recipe), queries or recipe.finetune.eval_queries,
                                recipe.finetune.eval_sets)
        yield recipe, models, validation, paths


def main() -> None:
    args = distiller_args("bench/results/choose_distiller.json")
    scores = {}
    for recipe, models, validation, paths in by_recipe(args):
        for path in paths:
            load_distiller(models.distiller, path)
            models.distiller.eval()
            scores[str(path)] = {"sha256_16": file_hash(path), "num_vectors": recipe.num_vectors,
                                 "anchor": recipe.distiller.anchor,
                                 **validation.score_distiller(recipe.distiller.max_length, 4)}
            print(path, json.dumps(scores[str(path)]), flush=True)
    chosen = min(scores, key=lambda p: scores[p]["val_kl"])
    print("chosen (lowest val_kl):", chosen)
    result = {"recipe": args.recipe, "overrides": args.set, "validation_tasks": recipe.tasks.validation,
              "queries_per_task": recipe.finetune.eval_queries, "scores": scores, "chosen": chosen, **stamp()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
