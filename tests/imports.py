"""The import graph of vmmgate/: every import, function-level and TYPE_CHECKING ones too.

``python -m tests.imports`` prints its figures (modules, edges, layers,
cycles, the longest chain); ``tests/test_architecture.py`` holds the rules.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "vmmgate"
#: The only layer that may import these (plus app.py and gunicorn.conf.py).
WEB_LIBRARIES = frozenset({"flask", "werkzeug", "gunicorn"})


def _modules(root: Path) -> dict[str, Path]:
    """Map each module name under vmmgate/ to its file."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported_names(tree: ast.AST, package: str) -> Iterator[tuple[str, list[str]]]:
    """Yield (module, names taken from it) for every import, relative ones resolved."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            yield module, [alias.name for alias in node.names]


@dataclass
class ImportGraph:
    """Modules of vmmgate/ and the imports between them."""

    files: dict[str, Path]
    edges: dict[str, set[str]] = field(default_factory=dict)
    libraries: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, root: Path = ROOT) -> ImportGraph:
        """Parse every module under ``root``/vmmgate."""
        graph = cls(_modules(root))
        for name, path in graph.files.items():
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            graph.edges[name], graph.libraries[name] = set(), set()
            for module, names in _imported_names(ast.parse(path.read_text()), package):
                top = module.partition(".")[0]
                if top != PACKAGE:
                    graph.libraries[name].add(top)
                    continue
                # `from pkg import mod` depends on pkg.mod; `from mod import name` on mod.
                submodules = [
                    f"{module}.{n}" for n in names if f"{module}.{n}" in graph.files
                ]
                for target in submodules or [graph._owner(module)]:
                    if target and target != name:
                        graph.edges[name].add(target)
        return graph

    def _owner(self, dotted: str) -> str | None:
        """Return the module ``dotted`` names (the longest known prefix)."""
        while dotted and dotted not in self.files:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def layer(self, module: str) -> str:
        """Return the top-level part of vmmgate a module is in (web, core, vmm, ...)."""
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else "root"

    def reachable(self, module: str) -> set[str]:
        """Return every module ``module`` loads, parent packages included."""
        seen: set[str] = set()
        todo = [module]
        while todo:
            current = todo.pop()
            parents = [
                ".".join(current.split(".")[:i])
                for i in range(1, current.count(".") + 1)
            ]
            for target in [*self.edges[current], *parents]:
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    def cycles(self) -> list[list[str]]:
        """Return the strongly connected groups of more than one module (Tarjan)."""
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        found: list[list[str]] = []
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

        def visit(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            for target in self.edges[node]:
                if target not in index:
                    visit(target)
                    low[node] = min(low[node], low[target])
                elif target in stack:
                    low[node] = min(low[node], index[target])
            if low[node] == index[node]:
                group = []
                while (member := stack.pop()) != node:
                    group.append(member)
                group.append(node)
                if len(group) > 1:
                    found.append(sorted(group))

        for node in sorted(self.files):
            if node not in index:
                visit(node)
        return found

    @cached_property
    def longest_chain(self) -> list[str]:
        """Return the longest import chain (the graph must have no cycle)."""
        memo: dict[str, list[str]] = {}

        def chain(node: str) -> list[str]:
            if node not in memo:
                best = max(
                    (chain(t) for t in sorted(self.edges[node])), key=len, default=[]
                )
                memo[node] = [node, *best]
            return memo[node]

        return max((chain(node) for node in sorted(self.files)), key=len)


def main() -> None:
    """Print the graph's figures."""
    graph = ImportGraph.read()
    cycles = graph.cycles()
    print(f"modules: {len(graph.files)}")
    print(f"edges: {sum(len(e) for e in graph.edges.values())}")
    print(f"cycles: {len(cycles)} {cycles}")
    if not cycles:
        chain = graph.longest_chain
        print(f"layers (longest chain): {len(chain)}")
        print("  " + " -> ".join(chain))
    web = sorted(m for m, libs in graph.libraries.items() if libs & WEB_LIBRARIES)
    print(f"modules importing flask/werkzeug/gunicorn: {web}")


if __name__ == "__main__":
    main()
