from pathlib import Path

import pytest

from mendctl.core.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("gpt2", "t5", "llama")


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    # Shipped recipes resolve relative paths against the working directory, as users run them.
    monkeypatch.chdir(ROOT)


@pytest.fixture
def tiny(tmp_path):
    """tiny(backend, *overrides) -> the tiny recipe with output_dir in tmp_path."""

    def make(backend: str, *overrides: str):
        return load_recipe(ROOT / "recipes" / "tiny" / f"{backend}.yaml", [f"output_dir={tmp_path / backend}", *overrides])

    return make


@pytest.fixture(autouse=True)
def _private_cache(request, tmp_path_factory, monkeypatch):
    # Tests must not share (or pollute) the user's teacher cache; the real model still lives in the real one.
    if "real_model" not in request.keywords:
        monkeypatch.setenv("MENDCTL_CACHE", str(tmp_path_factory.mktemp("cache")))
        # Nor the machine's BIG-bench copy: the tests of fetching decide where it comes from.
        monkeypatch.delenv("MENDCTL_BIGBENCH", raising=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models: intra-op threads only add overhead, and on a busy small machine they spin.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
