"""The recipes shipped with mendctl, and the tiny data they read, found from any folder.

They live in the repository's top-level `recipes/` and `data/tiny/`. A wheel installs them as package
data in `mendctl/recipes/` and `mendctl/tiny/` (pyproject maps the packages `mendctl.recipes` and
`mendctl.tiny` onto those folders); a checkout or an editable install reads the repository's folders
themselves, so an edited recipe is seen at once.
"""
from __future__ import annotations

from pathlib import Path

from .suggest import did_you_mean


def recipes_dir() -> Path:
    installed = Path(__file__).parents[1] / "recipes"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


# A recipe's relative path under this folder names the tiny data installed with the package.
TINY_DATA = ("data", "tiny")


def tiny_data_dir() -> Path:
    installed = Path(__file__).parents[1] / "tiny"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2].joinpath(*TINY_DATA)


def installed_data(path: str | Path) -> Path:
    """A recipe's path as it is read: the path itself when it exists; a relative `data/tiny/...` that does
    not exist in the working folder is the installed tiny data's copy, so that a copied tiny recipe runs
    from any folder, as a shipped recipe is found from any."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:len(TINY_DATA)] != TINY_DATA:
        return path
    installed = tiny_data_dir().joinpath(*path.parts[len(TINY_DATA):])
    return installed if installed.exists() else path


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
