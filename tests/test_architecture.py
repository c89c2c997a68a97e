"""The package's structure, checked from its import statements (function-level imports included).

- No import circles between modules.
- The product (io, models, tuning, runs, inference and the top-level modules below the CLI) never imports the
  harness that measures it (toy, studies) nor the command line; rich is drawn only by cli.py and reporting.py.
- The floors stand in order: io and models (the lowest product floors) never import config or any folder above
  them, so following a setting from the CLI down to a file never climbs back up.
- At most a dozen modules on the package's top level.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vmc_fast"
HARNESS = ("vmc_fast.toy", "vmc_fast.studies")
PRODUCT = ("vmc_fast.io", "vmc_fast.models", "vmc_fast.tuning", "vmc_fast.runs", "vmc_fast.inference",
           "vmc_fast.config", "vmc_fast.runtime", "vmc_fast.errors", "vmc_fast.losses", "vmc_fast.surgery")
UI = ("vmc_fast.cli", "vmc_fast.reporting")
BASEMENT = ("vmc_fast.io", "vmc_fast.models")
ABOVE_BASEMENT = ("vmc_fast.config", "vmc_fast.tuning", "vmc_fast.runs", "vmc_fast.inference") + HARNESS + UI


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package (and rich) that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "rich":
                found.add("rich")
            elif name in modules:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return result


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_the_package():
    graph = _graph()
    assert "vmc_fast.tuning.session" in graph and "vmc_fast.models.registry" in graph["vmc_fast.tuning.session"]


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_product_never_imports_the_harness_or_the_command_line():
    wrong = {name: sorted(n for n in deps if _within(n, HARNESS + UI))
             for name, deps in _graph().items() if _within(name, PRODUCT)}
    assert {name: deps for name, deps in wrong.items() if deps} == {}


def test_rich_only_in_the_command_line_layer():
    drawing = sorted(name for name, deps in _graph().items() if "rich" in deps)
    assert drawing == sorted(UI)


def test_at_most_a_dozen_top_level_modules():
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top


def test_io_and_models_never_import_the_floors_above_them():
    upward = {name: sorted(n for n in deps if _within(n, ABOVE_BASEMENT))
              for name, deps in _graph().items() if _within(name, BASEMENT)}
    assert {name: deps for name, deps in upward.items() if deps} == {}
