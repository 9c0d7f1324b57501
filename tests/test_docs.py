"""Every recipe key is documented: the schema and docs/recipes.md must not drift apart."""
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from mendctl.config import Recipe

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


def test_every_recipe_key_is_in_docs_recipes_md():
    documented = set(re.findall(r"`([a-z_.]+)`", DOC))
    missing = [k for k in keys(Recipe) if k not in documented and k.rsplit(".", 1)[-1] not in documented]
    assert not missing, f"undocumented recipe keys: {missing}"


def test_schema_walk_sees_nested_keys():
    assert {"finetune.kl_weight", "llm.random_init.init_std", "tasks.seeds"} <= set(keys(Recipe))
