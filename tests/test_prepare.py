"""Every command that reads a recipe's inputs prepares them once, before its own body runs."""
import importlib
from pathlib import Path

import pytest
from click.testing import CliRunner

from mendctl.cli import cli

TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "gpt2.yaml"

BODIES = {"pretrain": ("train", "train"), "finetune": ("train", "train"), "teacher": ("teacher", "fill_teacher"),
          "export": ("export", "export_checkpoint"), "distill": ("distill", "run_distill"),
          "eval": ("eval", "run_eval")}
RETURNS = {"teacher": {"positions": 0, "computed": 0, "folder": "-"}, "export": Path("-")}


# {tmp}: the test's folder; the output folder is {tmp} too.
@pytest.mark.parametrize("argv, stage", [
    (["pretrain"], None), (["finetune"], None), (["teacher", "finetune"], "finetune"),
    (["teacher", "pretrain"], "pretrain"), (["export", "{tmp}", "{tmp}/d.safetensors"], None), (["distill"], None),
    (["eval"], None)], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_each_command_prepares_once_before_its_body(argv, stage, tmp_path, monkeypatch):
    import mendctl.data.prepare

    command = argv[0]
    calls = []
    monkeypatch.setattr(mendctl.data.prepare, "prepare", lambda recipe, cmd, stg=None, console=None:
                        calls.append(("prepare", cmd, stg, recipe.output_dir)))
    module, name = BODIES[command]
    monkeypatch.setattr(importlib.import_module(f"mendctl.commands.{module}"), name,
                        lambda *a, **kw: calls.append(("body",)) or RETURNS.get(command))
    # The recipe comes first, its overrides last, the command's own arguments in between.
    args = [a.format(tmp=tmp_path) for a in argv[1:]]
    result = CliRunner().invoke(cli, [command, str(TINY), *args, f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    assert calls == [("prepare", command, stage, tmp_path), ("body",)]


def test_a_failing_prepare_stops_the_command_with_its_exit_code(tmp_path, monkeypatch):
    import mendctl.commands.eval
    import mendctl.data.prepare
    from mendctl.data.metaicl import DataError

    def prepare(*a, **kw):
        raise DataError("no such task file")

    monkeypatch.setattr(mendctl.data.prepare, "prepare", prepare)
    monkeypatch.setattr(mendctl.commands.eval, "run_eval", lambda *a, **kw: pytest.fail("the body ran"))
    result = CliRunner().invoke(cli, ["eval", str(TINY), f"output_dir={tmp_path}"])
    assert result.exit_code == 2 and "no such task file" in result.output
