"""Shipped recipes are reachable from any folder (`ls`, `cp`), and the commands that load no model
(`validate`, `ls`) import neither torch nor transformers (nor datasets)."""
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from mendctl.cli import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets")


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, printing at the end which heavy modules it imported."""
    code = ("import sys\nfrom mendctl.cli import cli\ntry:\n    cli.main(sys.argv[1:], prog_name='mendctl')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            f"print('imported:', [m for m in {HEAVY!r} if m in sys.modules])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def test_validate_imports_neither_torch_nor_transformers_nor_datasets():
    result = run_cli(["validate", "recipes/tiny/gpt2.yaml", "recipes/llama/smollm2-demo.yaml", "recipes/gpt2/metaicl.yaml",
                      "recipes/t5/metaicl.yaml"], ROOT)
    assert result.returncode == 0, result.stderr
    assert "ok recipes/tiny/gpt2.yaml" in result.stdout
    assert "imported: []" in result.stdout


def test_ls_lists_shipped_recipes_from_any_folder(tmp_path):
    result = run_cli(["ls"], tmp_path)
    assert result.returncode == 0, result.stderr
    for word in ("tiny/gpt2", "llama/smollm2-demo", "mendctl.backends.gpt2:Backend", "class_to_class"):
        assert word in result.stdout
    assert "imported: []" in result.stdout


def test_cp_copies_a_shipped_recipe_by_name_and_keeps_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = (ROOT / "recipes" / "llama" / "smollm2-demo.yaml").read_text()
    assert CliRunner().invoke(cli, ["cp", "smollm2-demo", "mine.yaml"]).exit_code == 0
    assert (tmp_path / "mine.yaml").read_text() == demo

    (tmp_path / "mine.yaml").write_text("edited\n")
    refused = CliRunner().invoke(cli, ["cp", "llama/smollm2-demo", "mine.yaml"])
    assert refused.exit_code == 2 and "--force" in refused.output
    assert (tmp_path / "mine.yaml").read_text() == "edited\n"
    assert CliRunner().invoke(cli, ["cp", "llama/smollm2-demo.yaml", "mine.yaml", "--force"]).exit_code == 0
    assert (tmp_path / "mine.yaml").read_text() == demo

    (tmp_path / "here").mkdir()
    assert CliRunner().invoke(cli, ["cp", "tiny/t5", "here"]).exit_code == 0
    assert (tmp_path / "here" / "t5.yaml").read_text() == (ROOT / "recipes" / "tiny" / "t5.yaml").read_text()


@pytest.mark.parametrize("name, message", [("smolm2-demo", "Did you mean 'smollm2-demo'"),
                                           ("tiny/gtp2", "Did you mean 'tiny/gpt2'"),
                                           ("nothing-like-it", "Shipped: gpt2/metaicl, llama/llama3.2-1b-metaicl, llama/smollm2-bench")])
def test_cp_unknown_names_suggest_the_closest(tmp_path, name, message):
    result = CliRunner().invoke(cli, ["cp", name, str(tmp_path / "x.yaml")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x.yaml").exists()


def test_the_explicit_package_list_names_every_package():
    # pyproject lists packages by hand (to map recipes/ and backends/ into mendctl): a new one must be added there.
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {p.parent.relative_to(ROOT).as_posix().replace("/", ".") for p in (ROOT / "mendctl").rglob("__init__.py")}
    found |= {"mendctl." + p.parent.relative_to(ROOT).as_posix().replace("/", ".")
              for p in (ROOT / "backends").rglob("__init__.py")}
    assert found | {"mendctl.recipes"} == set(setuptools["packages"])
    assert setuptools["package-dir"] == {"mendctl.recipes": "recipes", "mendctl.backends": "backends"}
    assert all(p.startswith("mendctl") for p in setuptools["packages"])  # no top-level package but mendctl
