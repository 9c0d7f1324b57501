"""A third-party package adds a backend through the `mendctl.backends` entry-point group alone;
names resolve from the metadata without importing any backend."""
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from mendctl.core.registry import UnknownBackend, get_backend, load, registered, resolve_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "acme_mend").mkdir(parents=True)
    (site / "acme_mend" / "__init__.py").write_text(textwrap.dedent('''
        from mendctl.backends.gpt2 import Backend as GPT2

        class Backend(GPT2):
            name = "acme"

        class NotABackend:
            pass
    '''))
    info = site / "acme_mend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-mend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mendctl.backends]\nacme = acme_mend:Backend\nrogue = acme_mend:NotABackend\n"
                                           "[mendctl.backend_aliases]\nacme-lm = acme_mend:Backend\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "acme_mend", raising=False)
    return site


@pytest.fixture
def declared(tmp_path, monkeypatch):
    """mendctl's metadata as pyproject.toml declares it: an editable install keeps the entry points of
    its last `pip install` (make redoes it when pyproject.toml changes)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    info = tmp_path / "declared" / f"mendctl-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: mendctl\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items())
        for group, points in project["entry-points"].items()))
    monkeypatch.syspath_prepend(str(info.parent))


def test_entry_point_backend_is_discovered_and_usable(third_party, tiny):
    assert "acme" in registered()
    assert resolve_name("acme-lm") == "acme"
    assert "acme_mend" not in sys.modules  # resolving a name imports nothing
    recipe = tiny("gpt2", "backend=acme-lm")
    assert recipe.backend == "acme"
    models = get_backend(recipe.backend).build(recipe)
    assert models.distiller.num_vectors == recipe.num_vectors


def test_an_entry_point_that_is_not_a_backend_is_refused_when_loaded(third_party):
    assert resolve_name("rogue") == "rogue"
    with pytest.raises(TypeError, match="rogue = 'acme_mend:NotABackend'.*not a subclass of mendctl.models.backend.Backend"):
        load("rogue")


def test_without_the_plugin_the_name_is_unknown():
    assert "acme" not in registered()
    with pytest.raises(UnknownBackend, match="Registered: gpt2, llama, t5"):
        resolve_name("acme")


def test_declared_aliases_and_did_you_mean(declared):
    assert [resolve_name(a) for a in ("gpt-2", "smollm2", "flan-t5")] == ["gpt2", "llama", "t5"]
    with pytest.raises(UnknownBackend, match="Did you mean 'llama'"):
        resolve_name("lama")
    with pytest.raises(UnknownBackend, match="Did you mean 'smollm2'"):
        resolve_name("smolm2")


def test_recipe_with_unknown_backend_fails_validation(tiny):
    from mendctl.core.config import RecipeError

    with pytest.raises(RecipeError, match="unknown backend 'acme'"):
        tiny("gpt2", "backend=acme")
