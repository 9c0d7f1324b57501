"""The layers of docs/architecture.md: who may import whom, computed from the source."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package's files are in the repository (pyproject's package-dir).
SOURCES = {"mendctl": ROOT / "mendctl", "mendctl.backends": ROOT / "backends"}

# The packages from the top down: a module imports its own package or one further down this list,
# never one above. "mendctl" is the top level itself: cli.py, entry.py, __main__.py and the public API (__init__.py).
ORDER = ["mendctl", "commands", "api", "training", "evaluation", "data", "backends", "models", "core"]
MAX_DEPTH = 9  # modules in the longest chain of module-level imports
TOP = {"mendctl", "mendctl.cli", "mendctl.__main__", "mendctl.entry"}  # the only modules outside a package


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module installed under mendctl."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "mendctl"
    if len(parts) == 2:  # mendctl.cli, mendctl.__main__ or a subpackage's __init__
        return parts[1] if MODULES[module].name == "__init__.py" else "mendctl"
    return parts[1]


def _known(name: str) -> str | None:
    """The module a dotted name refers to: itself, or the module that defines it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[str, bool]]:
    """(mendctl module imported, whether inside a function) for every import of the module's file."""
    path = MODULES[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: the file's own package, `level - 1` packages up
                    base = ".".join([*package[:len(package) - (child.level - 1)], *filter(None, [child.module])])
                if base.split(".")[0] == "mendctl":
                    # `from pkg import name`: name is a module of pkg, or something pkg defines
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else _known(base)
                               for a in child.names]
            elif isinstance(child, ast.Import):
                targets = [_known(a.name) for a in child.names if a.name.split(".")[0] == "mendctl"]
            found.extend((t, inside) for t in targets if t and t != module)
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return found


def _edges() -> list[tuple[str, str, bool]]:
    """(importer, imported, inside a function) for every import between two mendctl modules."""
    return [(me, other, inside) for me in sorted(MODULES) for other, inside in _imports(me)]


def _cycle(edges) -> list[str] | None:
    graph = {m: sorted({b for a, b, _ in edges if a == m}) for m in MODULES}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = "done"
        return None

    for m in graph:
        if m not in state and (found := visit(m)):
            return found
    return None


def _longest_chain(edges) -> list[str]:
    graph = {m: {b for a, b, _ in edges if a == m} for m in MODULES}
    memo = {}

    def chain(m):
        if m not in memo:
            memo[m] = [m, *max((chain(n) for n in graph[m]), key=len, default=[])]
        return memo[m]

    return max((chain(m) for m in graph), key=len)


def test_every_package_is_on_a_layer():
    layers = {_layer(m) for m in MODULES}
    assert layers <= set(ORDER), f"put these packages in ORDER (here and in docs/architecture.md): {layers - set(ORDER)}"
    top = {m for m in MODULES if _layer(m) == "mendctl"}
    assert top == TOP, f"put these modules in a package (docs/architecture.md says which): {top - TOP}"


def test_no_import_cycle_counting_imports_inside_functions():
    assert _cycle(_edges()) is None, " -> ".join(_cycle(_edges()))


def test_imports_point_down_only():
    rank = {name: i for i, name in enumerate(ORDER)}
    offenders = [e for e in _edges() if rank[_layer(e[1])] < rank[_layer(e[0])]]
    assert not offenders, offenders


def test_commands_never_import_each_other_and_only_the_cli_imports_one_inside_a_function():
    offenders = [e for e in _edges() if _layer(e[1]) == "commands" and e[1] != "mendctl.commands"
                 and not (e[0] == "mendctl.cli" and e[2])]
    assert not offenders, offenders


def test_the_longest_chain_of_module_level_imports():
    chain = _longest_chain([e for e in _edges() if not e[2]])
    assert len(chain) <= MAX_DEPTH, " -> ".join(chain)


def test_the_import_walk_sees_relative_nested_and_absolute_imports():
    edges = _edges()
    assert ("mendctl.cli", "mendctl.commands.eval", True) in edges  # from .commands.eval import run_eval, inside eval_
    assert ("mendctl.data.bigbench", "mendctl.core.suggest", False) in edges  # from ..core.suggest import did_you_mean
    assert ("mendctl.commands.eval", "mendctl.evaluation.report", False) in edges  # from ..evaluation import ..., report
    assert ("mendctl.data.text", "mendctl.data.metaicl", False) in edges  # from .metaicl import DataError
    assert ("mendctl.backends.gpt2", "mendctl.models.backend", False) in edges  # from mendctl.models.backend import
    assert ("mendctl", "mendctl.api.apply", True) in edges  # the public apply, loaded when asked for
    assert _layer("mendctl.core") == "core" and _layer("mendctl.cli") == "mendctl" and _layer("mendctl") == "mendctl"


def test_the_checks_fail_on_a_cycle_and_a_long_chain():
    assert _cycle([("mendctl.core.config", "mendctl.core.registry", True),
                   ("mendctl.core.registry", "mendctl.core.config", False)]) is not None
    chain = [f"mendctl.{m}" for m in ("cli", "commands.train", "training.curves", "evaluation.scoring")]
    assert _longest_chain([(a, b, False) for a, b in zip(chain, chain[1:])]) == chain
