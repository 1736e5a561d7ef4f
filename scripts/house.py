"""Print the shape of the package: its internal import graph and its biggest functions.

    .venv/bin/python scripts/house.py                 # graph by module, then the 10 longest functions
    .venv/bin/python scripts/house.py --packages      # graph by sub-package (core, data, scoring, ...)
    .venv/bin/python scripts/house.py --src other/src # another checkout

The graph comes from grimp (import-linter's own graph builder), so it shows exactly what the import
contracts in pyproject.toml are checked against; imports inside functions are counted like any other.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import grimp


def import_graph(package: str, by_package: bool) -> dict[str, set[str]]:
    graph = grimp.build_graph(package, cache_dir=None)
    depth = 2 if by_package else 99
    edges: dict[str, set[str]] = {}
    for module in sorted(graph.modules):
        source = ".".join(module.split(".")[:depth])
        for imported in graph.find_modules_directly_imported_by(module):
            target = ".".join(imported.split(".")[:depth])
            if target != source:
                edges.setdefault(source, set()).add(target)
        edges.setdefault(source, set())
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def longest_functions(root: Path, top: int) -> list[tuple[int, str]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root.parent)}:{node.name}"))
    return sorted(found, reverse=True)[:top]


def inner_imports(root: Path) -> int:
    """Imports of the package's own modules made inside functions."""
    count = 0
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("miniplm"):
                        count += 1
                    elif isinstance(inner, ast.Import) and any(a.name.startswith("miniplm") for a in inner.names):
                        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", default=str(Path(__file__).parents[1] / "src"))
    parser.add_argument("--packages", action="store_true", help="group modules by sub-package")
    parser.add_argument("--top", type=int, default=10, help="how many of the longest functions")
    args = parser.parse_args()
    sys.path.insert(0, args.src)
    edges = import_graph("miniplm", args.packages)
    for source, targets in sorted(edges.items()):
        print(f"{source} -> {', '.join(sorted(targets)) or '-'}")
    found = cycles(edges)
    print(f"\nimport cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    root = Path(args.src) / "miniplm"
    print(f"package-internal imports inside functions: {inner_imports(root)}")
    print("\nlongest functions (lines):")
    for lines, name in longest_functions(root, args.top):
        print(f"  {lines:4d}  {name}")


if __name__ == "__main__":
    main()
