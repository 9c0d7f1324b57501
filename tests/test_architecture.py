"""The commands are siblings: no command module imports another (docs/architecture.md)."""
import ast
from pathlib import Path

COMMANDS = {"trainer", "distill", "evaluate", "fill_teacher", "export"}
PACKAGE = Path(__file__).resolve().parents[1] / "mendctl"


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y
            names.add((node.module or "").split(".")[0])
            if not node.module:
                names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mendctl."):
            names.add(node.module.split(".")[1])
    return names


def test_no_command_imports_another_command():
    offenders = {c: sorted(_imported(PACKAGE / f"{c}.py") & (COMMANDS - {c})) for c in COMMANDS}
    assert not any(offenders.values()), offenders


def test_no_module_below_the_commands_imports_one():
    below = [p for p in PACKAGE.rglob("*.py") if p.stem not in COMMANDS | {"cli", "__main__"}]
    offenders = {str(p.relative_to(PACKAGE)): sorted(_imported(p) & COMMANDS) for p in below}
    assert not any(offenders.values()), {k: v for k, v in offenders.items() if v}
