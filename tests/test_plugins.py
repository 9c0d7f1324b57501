"""A third-party package adds a backend through the `mendctl.backends` entry-point group alone."""
import textwrap

import pytest

from mendctl.registry import UnknownBackend, available, get_backend, resolve_name


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "acme_mend").mkdir(parents=True)
    (site / "acme_mend" / "__init__.py").write_text(textwrap.dedent('''
        from backends.gpt2 import Backend as GPT2

        class Backend(GPT2):
            name = "acme"
            aliases = ("acme-lm",)
    '''))
    info = site / "acme_mend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-mend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mendctl.backends]\nacme = acme_mend:Backend\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_entry_point_backend_is_discovered_and_usable(third_party, tiny):
    assert "acme" in available()
    assert resolve_name("acme-lm") == "acme"
    recipe = tiny("gpt2", "backend=acme-lm")
    assert recipe.backend == "acme"
    models = get_backend(recipe.backend).build(recipe)
    assert models.distiller.num_vectors == recipe.num_vectors


def test_without_the_plugin_the_name_is_unknown():
    assert "acme" not in available()
    with pytest.raises(UnknownBackend, match="Registered: gpt2, llama, t5"):
        resolve_name("acme")


def test_aliases_and_did_you_mean():
    assert resolve_name("gpt-2") == "gpt2"
    with pytest.raises(UnknownBackend, match="Did you mean 'llama'"):
        resolve_name("lama")


def test_recipe_with_unknown_backend_fails_validation(tiny):
    from mendctl.config import RecipeError

    with pytest.raises(RecipeError, match="unknown backend 'acme'"):
        tiny("gpt2", "backend=acme")
