"""The package's import graph follows DESIGN.md's floors and has no cycle.

Every ``import`` statement of every module counts (module level, inside functions and under
``TYPE_CHECKING`` alike), so a lazy import that climbs a floor is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resq_brevitas"

#: DESIGN.md section 3: config <- quant <- nn <- policy <- temporal <- convert/calibrate/train/cost
#: <- deploy/experiments <- recipes. A module may import its own floor or lower ones.
FLOORS: list[tuple[str, int]] = [
    ("resq_brevitas.checks", 0),
    ("resq_brevitas.config", 0),
    ("resq_brevitas.quant", 1),
    ("resq_brevitas.nn", 2),
    ("resq_brevitas.policy", 3),
    ("resq_brevitas.temporal", 4),
    ("resq_brevitas.bn_fold", 5),
    ("resq_brevitas.convert", 5),
    ("resq_brevitas.calibrate", 5),
    ("resq_brevitas.cost", 5),
    ("resq_brevitas.train", 5),
    ("resq_brevitas.deploy", 6),
    ("resq_brevitas.observers", 6),
    ("resq_brevitas.experiments", 6),
    ("resq_brevitas.demo", 6),
]
#: The package's own __init__ re-exports the public API from every floor.
FACADE = "resq_brevitas"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(name: str) -> int:
    for prefix, floor in FLOORS:
        if name == prefix or name.startswith(prefix + "."):
            return floor
    raise AssertionError(f"module {name} has no floor in FLOORS: add it to DESIGN.md's order")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports (a ``from pkg import sub`` names the submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("resq_brevitas"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("resq_brevitas"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def test_every_module_has_a_floor(graph: dict[str, set[str]]) -> None:
    for name in graph:
        if name != FACADE:
            floor_of(name)


def test_no_module_imports_a_higher_floor(graph: dict[str, set[str]]) -> None:
    upward = [f"{name} (floor {floor_of(name)}) imports {dep} (floor {floor_of(dep)})"
              for name, deps in graph.items() if name != FACADE
              for dep in sorted(deps) if dep != FACADE and floor_of(dep) > floor_of(name)]
    assert not upward, "\n".join(upward)


def test_no_module_imports_the_facade(graph: dict[str, set[str]]) -> None:
    assert not [name for name, deps in graph.items() if FACADE in deps and name != FACADE]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph (its nodes, first repeated last), or ``None``."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_import_graph_has_no_cycle(graph: dict[str, set[str]]) -> None:
    # A package's __init__ re-exports its own modules; an edge from a module to its own
    # package's __init__ is that re-export seen backwards, not a dependency.
    edges = {name: {d for d in deps if not name.startswith(d + ".")}
             for name, deps in graph.items() if name != FACADE}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checker_sees_a_planted_violation(tmp_path: Path) -> None:
    """The graph builder reads relative and absolute imports (else the tests above pass
    vacuously)."""
    known = {"resq_brevitas.nn.layers", "resq_brevitas.temporal.model", "resq_brevitas.nn"}
    source = tmp_path / "layers.py"
    source.write_text("from ..temporal import model\nimport resq_brevitas.nn\n")
    found = imports_of("resq_brevitas.nn.layers", source, known)
    assert found == {"resq_brevitas.temporal.model", "resq_brevitas.nn"}
    assert floor_of("resq_brevitas.temporal.model") > floor_of("resq_brevitas.nn.layers")
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
