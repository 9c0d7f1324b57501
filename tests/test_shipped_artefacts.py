"""Files shipped in the repository name no folder of the machine that made them."""
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from mendctl.core.provenance import portable_paths
from mendctl.core.registry import get_backend
from mendctl.training.checkpoint import write_distiller

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "data").rglob("*.safetensors"))


def _absolute_paths(value) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [value] if Path(value).is_absolute() else []
        if isinstance(value, str):
            return [value] if Path(value).is_absolute() else []
    if isinstance(value, dict):  # a template is text, not a path
        return [p for k, v in value.items() if k != "template" for p in _absolute_paths(v)]
    if isinstance(value, list):
        return [p for v in value for p in _absolute_paths(v)]
    return []


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_no_shipped_artefact_records_an_absolute_path(path):
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    assert metadata and not _absolute_paths(metadata)


def test_portable_paths_keep_paths_inside_the_root_relative_and_drop_the_rest(tmp_path):
    data = {"a": str(tmp_path / "runs" / "x"), "b": ["/elsewhere/data", "relative/y"], "c": 3, "d": "text"}
    assert portable_paths(data, tmp_path) == {"a": "runs/x", "b": [None, "relative/y"], "c": 3, "d": "text"}


def test_a_written_distiller_records_no_absolute_path(tiny, tmp_path):
    recipe = tiny("gpt2", f"tasks.data_dir={(ROOT / 'data' / 'tiny' / 'tasks').resolve()}", "template.output='/{output}'")
    assert Path(recipe.tasks.data_dir).is_absolute()
    distiller = get_backend(recipe.backend).build(recipe).distiller
    path = tmp_path / "d.safetensors"
    write_distiller(path, distiller, recipe, {"initialised_from": str(tmp_path / "pretrain")})
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert not _absolute_paths(metadata)
    saved = json.loads(metadata["recipe"])
    assert saved["tasks"]["data_dir"] == "data/tiny/tasks"  # the tests run in the repo
    assert saved["template"]["output"] == "/{output}"  # text that starts like a path stays as it is
