"""The shape of the code: data flows one way, from the runtime up to the control plane.

- `dynamo_grpc` (contracts, registry, engines, KV, servicers, routing, frontend) never imports
  `control_plane`; only the command-line entry point sees both.
- No two modules import each other, directly or around a circle.
- Engines, KV transports and routing policies are chosen by name in one registry each: nothing else
  compares a name to one of theirs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from dynamo_grpc.engine.registry import ENGINES
from dynamo_grpc.routing.policies import POLICIES

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dynamo_grpc", "control_plane")
ENTRY_POINT = "dynamo_grpc.cli"
# The one module allowed to spell each kind of name, beside the module that defines it.
REGISTRIES = {"engine": ("dynamo_grpc.engine.registry",), "routing policy": ("dynamo_grpc.routing.policies",)}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if "v1" in parts:  # generated stubs
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every project module `module` imports, at the top or inside a function (a lazy import is still a
    dependency), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skip = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If)
            and isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING"
            for node in ast.walk(stmt)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: set(imported(name, path, set(found))) for name, path in found.items()}


def test_the_runtime_never_imports_the_control_plane() -> None:
    upward = sorted(f"{module} imports {target}" for module, targets in graph().items()
                    if module.startswith("dynamo_grpc") and module != ENTRY_POINT
                    for target in targets if target.startswith("control_plane"))
    assert upward == []


def test_no_modules_import_each_other_around_a_circle() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            # A package importing its own modules (its __init__ re-exporting them) is not a circle.
            if len(component) > 1 and not all(m.startswith(min(component) + ".") or m == min(component)
                                              for m in component):
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert circles == []


def compared_names(path: Path, names: set[str]) -> Iterator[tuple[int, str]]:
    """(line, name) wherever a comparison or a membership test spells one of `names`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            constants = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            for constant in constants:
                if isinstance(constant, ast.Constant) and constant.value in names:
                    yield node.lineno, constant.value


def test_engines_and_policies_are_named_only_in_their_registries() -> None:
    kinds = {"engine": set(ENGINES), "routing policy": set(POLICIES)}
    found = []
    for module, path in modules().items():
        for kind, names in kinds.items():
            if module in REGISTRIES[kind]:
                continue
            found += [f"{path.relative_to(ROOT)}:{line} compares a {kind} name ({name!r})"
                      for line, name in compared_names(path, names)]
    for path in sorted((ROOT / "bench").glob("*.py")):
        found += [f"{path.relative_to(ROOT)}:{line} compares an engine name ({name!r})"
                  for line, name in compared_names(path, kinds["engine"])]
    assert found == []
