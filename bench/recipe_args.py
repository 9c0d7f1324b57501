"""What the bench scripts that measure on a recipe share: their common arguments, and the recipe's
models built (the scripts run as `python bench/NAME.py`, so this folder is on the import path)."""
import argparse
from pathlib import Path

from mendctl.core.config import load_recipe
from mendctl.data.prepare import prepare
from mendctl.core.registry import get_backend


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    """RECIPE, --set key=value (repeatable) and --out (default `out`); a script adds its own after."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], help="key=value recipe override (repeatable)")
    ap.add_argument("--out", type=Path, default=Path(out))
    return ap


def build(args: argparse.Namespace, *stage: str):
    """The recipe with its overrides, its data prepared for `stage` (as `prepare` takes it), its models and template."""
    recipe = load_recipe(args.recipe, args.set)
    prepare(recipe, *stage)
    backend = get_backend(recipe.backend)
    return recipe, backend.build(recipe), backend.template(recipe)
