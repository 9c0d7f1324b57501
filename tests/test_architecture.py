"""The floors of docs/architecture.md: who may import whom."""
import ast
from pathlib import Path

COMMANDS = {"trainer", "distill", "evaluate", "fill_teacher", "export", "distill_demos", "predict", "serve", "harness"}
PACKAGE = Path(__file__).resolve().parents[1] / "mendctl"

# Every module's floor, as docs/architecture.md draws them; a new module goes on one (the test below
# fails until it does). `data` is the package of task data, on floor 4 as a whole.
FLOORS = {
    1: {"cli", "__main__"},
    2: COMMANDS,
    3: {"backend", "lm", "distiller", "refine", "adapters", "anchors", "tokenizer", "model_sources", "render",
        "examples", "losses", "averaging", "teacher_cache", "checkpoint", "resume", "curves", "stage", "padding",
        "scoring", "metrics", "bootstrap", "flops", "compress", "eval_cache", "results", "report",
        "workspace", "prepare", "trained", "vectors", "provenance", "fileio", "lock", "api", "engine", "rows", "outputs",
        "batching", "prefix_kv"},
    4: {"__init__", "config", "positions", "partitions", "data", "registry", "shipped", "suggest"},
}
FLOOR = {module: floor for floor, modules in FLOORS.items() for module in modules}


def _module(path: Path) -> str:
    """The name a file has among mendctl's modules (a file of a subpackage: the subpackage)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(mendctl module imported, whether inside a function) for every import of the file."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for mendctl/x.py, 1 for mendctl/data/x.py
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                names = []
                if child.level:  # relative: from the file's own package, `level - 1` packages up
                    up = depth - (child.level - 1)
                    target = [*path.relative_to(PACKAGE).parts[:up], *(child.module or "").split(".")]
                    target = [t for t in target if t]
                    names = [target[0]] if target else [a.name for a in child.names]
                elif (child.module or "").startswith("mendctl."):
                    names = [child.module.split(".")[1]]
                elif child.module == "mendctl":
                    names = [a.name for a in child.names]
                found.extend((n, inside) for n in names)
            elif isinstance(child, ast.Import):
                found.extend((a.name.split(".")[1], inside) for a in child.names if a.name.startswith("mendctl."))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def _edges() -> list[tuple[str, str, bool, str]]:
    """(importer, imported, inside a function, file) for every import between two mendctl modules."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        out += [(me, other, inside, str(path.relative_to(PACKAGE))) for other, inside in _imports(path)
                if other != me and other in FLOOR]
    return out


def test_every_module_has_a_floor():
    modules = {_module(p) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(FLOOR), f"put these on a floor (here and in docs/architecture.md): {modules - set(FLOOR)}"
    assert set(FLOOR) <= modules, f"gone: {set(FLOOR) - modules}"


def test_no_command_imports_another_command():
    offenders = [e for e in _edges() if e[0] in COMMANDS and e[1] in COMMANDS]
    assert not offenders, offenders


def test_no_module_below_the_commands_imports_one():
    offenders = [e for e in _edges() if FLOOR[e[0]] > 2 and FLOOR[e[1]] <= 2]
    assert not offenders, offenders


def test_no_module_imports_upwards_but_floor_4_inside_a_function_for_a_model():
    # Floor 4 stays free of torch at import time: it may reach floor 3 only from inside a function.
    offenders = [e for e in _edges() if FLOOR[e[1]] < FLOOR[e[0]] and not (FLOOR[e[0]] == 4 and FLOOR[e[1]] == 3
                                                                               and e[2])]
    assert not offenders, offenders


def test_commands_are_imported_only_by_the_cli_inside_a_function():
    offenders = [e for e in _edges() if e[1] in COMMANDS and not (e[0] == "cli" and e[2])]
    assert not offenders, offenders


def test_the_import_walk_sees_relative_and_nested_imports():
    edges = _edges()
    assert ("cli", "evaluate", True, "cli.py") in edges  # from .evaluate import run_eval, inside eval_
    assert ("data", "suggest", False, "data/bigbench.py") in edges  # from ..suggest import did_you_mean
    assert ("evaluate", "report", False, "evaluate.py") in edges  # from . import ..., report
    assert not any(e[0] == e[1] for e in edges)  # data/text.py's `from .metaicl` stays inside data
