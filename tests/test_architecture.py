"""The layers of vmmgate/ hold (docs/architecture.md): read from the code's own imports."""

from __future__ import annotations

import re

import pytest

from tests.imports import WEB_LIBRARIES, ImportGraph

#: What each layer may import (besides itself and the root package).
ALLOWED = {
    # Cluster mode: the core on Ray; only the web layer (when VMMGATE_CLUSTER is set) imports it.
    "cluster": {"cluster", "core", "infra", "model", "errors", "shared"},
    "core": {"core", "infra", "model", "errors", "shared"},
    "infra": {"infra", "model", "errors", "shared"},
    "shared": {"shared"},
    "model": {"model", "errors"},
    "errors": {"errors"},
}
#: The server side: never reaches into the VMM's own modules.
SERVER = ("web", "cluster", "core", "infra")
MAX_LINES = 400


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    """The import graph of the checkout."""
    return ImportGraph.read()


def test_the_import_graph_has_no_cycle(graph: ImportGraph) -> None:
    assert graph.cycles() == []


def test_only_the_web_layer_imports_flask_werkzeug_or_gunicorn(
    graph: ImportGraph,
) -> None:
    outside = {
        module: sorted(libraries & WEB_LIBRARIES)
        for module, libraries in graph.libraries.items()
        if libraries & WEB_LIBRARIES and graph.layer(module) != "web"
    }
    assert outside == {}


def test_only_the_cluster_layer_imports_ray(graph: ImportGraph) -> None:
    """Single-host mode never loads Ray: nothing outside vmmgate/cluster/ imports it."""
    outside = sorted(
        module
        for module, libraries in graph.libraries.items()
        if "ray" in libraries and graph.layer(module) != "cluster"
    )
    assert outside == []
    assert any(
        "ray" in graph.libraries.get(m, ())
        for m in graph.files
        if m.startswith("vmmgate.cluster")
    )


def test_nothing_the_vmm_imports_leads_to_flask(graph: ImportGraph) -> None:
    web_importers = {m for m, libs in graph.libraries.items() if libs & WEB_LIBRARIES}
    reaching = {
        module: sorted(graph.reachable(module) & web_importers)
        for module in graph.files
        if graph.layer(module) in ("vmm", "shared", "root", "model", "errors")
        and graph.reachable(module) & web_importers
    }
    assert reaching == {}


def test_each_layer_imports_only_what_is_below_it(graph: ImportGraph) -> None:
    wrong = sorted(
        (module, target)
        for module, targets in graph.edges.items()
        for target in targets
        if (
            graph.layer(module) in ALLOWED
            and graph.layer(target) not in {*ALLOWED[graph.layer(module)], "root"}
        )
        or (graph.layer(module) in SERVER and graph.layer(target) == "vmm")
    )
    assert wrong == []


def test_no_module_is_over_400_lines(graph: ImportGraph) -> None:
    long = {
        module: count
        for module, path in graph.files.items()
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_the_flavor_names_are_written_in_one_module(graph: ImportGraph) -> None:
    name = re.compile(r"""["'](bundled|original)["']""")
    holders = sorted(
        module for module, path in graph.files.items() if name.search(path.read_text())
    )
    assert holders == ["vmmgate.infra.config"]


def test_the_checks_see_a_violation(tmp_path) -> None:
    """A tree with a cycle and Flask in core is caught (the checks can fail)."""
    package = tmp_path / "vmmgate"
    for sub in ("core", "infra"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text(
        "import flask\nfrom vmmgate.infra import b\n"
    )
    (package / "infra" / "b.py").write_text(
        "def f():\n    from vmmgate.core import a\n"
    )
    bad = ImportGraph.read(tmp_path)
    assert bad.cycles() == [["vmmgate.core.a", "vmmgate.infra.b"]]
    assert "flask" in bad.libraries["vmmgate.core.a"]
    assert ("vmmgate.core" in bad.edges["vmmgate.infra.b"]) or (
        "vmmgate.core.a" in bad.edges["vmmgate.infra.b"]
    )
