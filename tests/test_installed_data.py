"""The tiny recipes run from any folder: their `data/tiny/...` paths read the tiny data installed with the
package when the working folder has none, as shipped recipes are found from any folder."""
import subprocess
import sys
import tomllib
from pathlib import Path

from click.testing import CliRunner

from mendctl.cli import cli
from mendctl.core.shipped import installed_data, tiny_data_dir

ROOT = Path(__file__).resolve().parents[1]
MENDCTL = Path(sys.executable).parent / "mendctl"


def test_a_tiny_recipe_copied_into_an_empty_folder_validates_and_trains(tmp_path, monkeypatch):
    def run(*args):
        result = subprocess.run([str(MENDCTL), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    run("cp", "tiny/gpt2", "x.yaml")
    assert "ok x.yaml" in run("validate", "x.yaml").stdout
    # Training in this process (torch is loaded already), from the same empty folder.
    monkeypatch.chdir(tmp_path)
    trained = CliRunner().invoke(cli, ["finetune", "x.yaml", "finetune.steps=2"])
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "runs" / "tiny-gpt2" / "finetune" / "distiller.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "x.yaml"]


def test_the_working_folder_comes_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert installed_data("data/tiny/partition.json") == tiny_data_dir() / "partition.json"
    (tmp_path / "data" / "tiny").mkdir(parents=True)
    (tmp_path / "data" / "tiny" / "partition.json").write_text("{}")
    assert installed_data("data/tiny/partition.json") == Path("data/tiny/partition.json")
    # Only data/tiny/ is installed: other missing paths stay as written, for validate to report.
    assert installed_data("data/other/x.json") == Path("data/other/x.json")
    assert installed_data("data/tiny/nothing.json") == Path("data/tiny/nothing.json")


def test_the_package_installs_every_file_the_tiny_recipes_read():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["mendctl.tiny"] == "data/tiny"
    patterns = setuptools["package-data"]["mendctl.tiny"]
    root = ROOT / "data" / "tiny"
    installed = {p for pattern in patterns for p in root.glob(pattern)}
    needed = {p for p in root.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt", ".json")}
    assert needed and needed <= installed
