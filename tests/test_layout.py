"""The shape of the code, read from its imports (type-checking imports
included): no import cycle among the front end's modules, the model side
never reaches up into the front end, test modules never import each other,
and the benchmarks never import the tests."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def imports(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, anywhere in it, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def modules(package: str) -> dict[str, pathlib.Path]:
    return {
        f"{package}.{path.stem}" if path.stem != "__init__" else package: path
        for path in sorted((ROOT / package).glob("*.py"))
    }


def test_no_import_cycle_in_the_front_end():
    service = modules("service")
    graph = {
        name: {other for other in imports(path) if other in service and other != name} for name, path in service.items()
    }
    visiting, done, cycles = [], set(), []

    def visit(name: str) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append([*visiting[visiting.index(name) :], name])
            return
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)
    assert graph["service.batcher"] and "service.pool" not in graph["service.batcher"]  # the control: edges are seen


def test_the_model_side_never_imports_the_front_end():
    reaching_up = {
        name: sorted(other for other in imports(path) if other == "service" or other.startswith("service."))
        for name, path in modules("workers").items()
    }
    assert not {name: found for name, found in reaching_up.items() if found}


def test_test_modules_never_import_each_other_and_bench_never_imports_tests():
    tests = {path.stem for path in (ROOT / "tests").glob("test_*.py")}
    crossing = {
        path.name: sorted(other for other in imports(path) if other.split(".")[-1] in tests or ".test_" in other)
        for path in (ROOT / "tests").glob("*.py")
    }
    assert not {name: found for name, found in crossing.items() if found}
    into_tests = {
        path.name: sorted(other for other in imports(path) if other == "tests" or other.startswith("tests."))
        for path in (ROOT / "bench").glob("*.py")
    }
    assert not {name: found for name, found in into_tests.items() if found}
