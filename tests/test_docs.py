"""Every recipe key is documented: the schema and docs/recipes.md must not drift apart.

A key is documented by a table row whose first cell names it in backticks, either in full
(`finetune.kl_weight`) or relative to the section: under a heading that names prefixes in
backticks (`## \\`pretrain\\` and \\`finetune\\``), the row `steps` documents `pretrain.steps` and
`finetune.steps`, and the heading documents the sections `pretrain` and `finetune` themselves.
A mention in prose documents nothing.
"""
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from mendctl.core.config import Recipe

DOC = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text()


def _models(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = prefix + name
        out.append(path)
        for sub in _models(field.annotation):
            out += keys(sub, path + ".")
    return out


def documented(doc: str) -> set[str]:
    found, prefixes = set(), []
    for line in doc.splitlines():
        if line.startswith("#"):
            prefixes = re.findall(r"`([a-z_.]+)`", line)
            found |= set(prefixes)
        elif line.startswith("| `"):
            for name in re.findall(r"`([a-z_.]+)`", line.split("|")[1]):
                full = not prefixes or any(name.startswith(p + ".") for p in prefixes)
                found |= {name} if full else {f"{p}.{name}" for p in prefixes}
    return found


def test_every_recipe_key_is_in_docs_recipes_md():
    missing = [k for k in keys(Recipe) if k not in documented(DOC)]
    assert not missing, f"undocumented recipe keys: {missing}"


def test_a_key_counts_only_by_its_full_path():
    doc = ("## Top level\n| `seed` | 0 | seeds |\nThe `eval.seed` in prose.\n"
           "## `pretrain` and `finetune`: shared\n| key | default |\n|---|---|\n| `steps` | required |\n")
    assert documented(doc) == {"seed", "pretrain", "finetune", "pretrain.steps", "finetune.steps"}


def test_schema_walk_sees_nested_keys():
    assert {"finetune.kl_weight", "llm.random_init.init_std", "tasks.seeds"} <= set(keys(Recipe))
