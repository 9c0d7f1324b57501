"""The recipes shipped with mendctl, found from any folder.

They live in the repository's top-level `recipes/`. A wheel installs them as package data in
`mendctl/recipes/` (pyproject maps the package `mendctl.recipes` onto `recipes/`); a checkout or an
editable install reads the repository's folder itself, so an edited recipe is seen at once.
"""
from __future__ import annotations

from pathlib import Path

from .suggest import did_you_mean


def recipes_dir() -> Path:
    installed = Path(__file__).parents[1] / "recipes"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


def shipped_recipes() -> dict[str, Path]:
    """Name ("llama/smollm2-demo") -> file, for every shipped recipe."""
    root = recipes_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def find_recipe(name: str) -> Path:
    """A shipped recipe by its name, with or without its folder: `llama/smollm2-demo` or `smollm2-demo`."""
    table = shipped_recipes()
    key = name.removesuffix(".yaml")
    if key in table:
        return table[key]
    same_stem = [n for n in table if n.rsplit("/", 1)[-1] == key]
    if len(same_stem) == 1:
        return table[same_stem[0]]
    if same_stem:
        raise ValueError(f"{name!r} names several shipped recipes: {', '.join(same_stem)}; give its folder too")
    stems = [n.rsplit("/", 1)[-1] for n in table]
    raise ValueError(f"no shipped recipe {name!r}.{did_you_mean(key, [*table, *stems])} "
                     f"Shipped: {', '.join(table) or 'none'} (mendctl ls recipes)")
