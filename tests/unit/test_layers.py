"""The layers import one way (STYLE.md, issue 9), checked on the import graph grimp builds
from the source (every import, including those inside functions).

From the bottom up: domain/ imports nothing of ours; infra/ (plumbing: the log, the codec,
settings, the local stack) imports only the domain; commands/ (the command processor and
client) and projections/ (the read models) import infra and the domain, not each other;
streams/ (the process managers) also sends commands; api/ serves commands and read
models, and never runs a process manager. The composition root (infra/bootstrap.py) and
the CLI that calls it (infra/cli.py) are the one place allowed to import every layer:
they build the parts. sdk/ speaks HTTP and SSE only, so it imports nothing of ours.
bench/ and demo/ are users: they may import any layer, but only its public names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("domain", "infra", "commands", "projections", "streams", "api", "sdk", "demo", "bench")

#: Which of our packages each layer may import (besides itself).
ALLOWED: dict[str, frozenset[str]] = {
    "domain": frozenset(),
    "infra": frozenset({"domain"}),
    "commands": frozenset({"domain", "infra"}),
    "projections": frozenset({"domain", "infra"}),
    "streams": frozenset({"domain", "infra", "commands"}),
    "api": frozenset({"domain", "infra", "commands", "projections"}),
    "sdk": frozenset(),
}

#: The composition root and the command line that calls it: they wire every layer.
COMPOSITION_ROOT = frozenset({"infra.bootstrap", "infra.cli"})


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*OURS)


def crossings(graph: grimp.ImportGraph, layer: str) -> list[str]:
    """Every ``importer -> imported`` edge from ``layer`` to a package of ours it may not
    import, as sorted strings (empty when the layer keeps its rule)."""
    bad: list[str] = []
    for module in graph.find_children(layer) | graph.find_descendants(layer) | {layer}:
        if module in COMPOSITION_ROOT:
            continue
        for imported in graph.find_modules_directly_imported_by(module):
            top = imported.split(".")[0]
            if top != layer and top in OURS and top not in ALLOWED[layer]:
                bad.append(f"{module} -> {imported}")
    return sorted(bad)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(graph: grimp.ImportGraph, layer: str) -> None:
    assert crossings(graph, layer) == []


def test_the_composition_root_is_the_only_part_of_infra_that_imports_above_it(
    graph: grimp.ImportGraph,
) -> None:
    above = {"commands", "projections", "streams", "api", "demo", "bench"}
    importers = {
        module
        for module in graph.find_descendants("infra")
        for imported in graph.find_modules_directly_imported_by(module)
        if imported.split(".")[0] in above
    }
    assert importers <= COMPOSITION_ROOT


def private_imports(source: str, module: str) -> list[str]:
    """Names starting with ``_`` (not dunders) that ``source`` (the text of ``module``)
    takes from another module of ours: ``from x import _y``, or ``x._y`` on a module
    imported as ``import x`` / ``import x as z``. Returned as ``line: name`` strings."""
    found: list[str] = []
    tree = ast.parse(source, module)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in OURS or node.module == module:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.lineno}: {node.module}.{alias.name}")
                else:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS and alias.name != module:
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return sorted(found, key=lambda hit: int(hit.split(":")[0]))


def test_the_private_name_check_sees_both_ways_of_reaching_a_private_name() -> None:
    source = (
        "from demo.swarm import _free_port, wait_ready\n"
        "import bench.lifecycle as lc\n"
        "from infra import kafka\n"
        "lc._driver()\n"
        "kafka._hidden\n"
        "kafka.__name__\n"
        "wait_ready._x\n"
    )
    assert private_imports(source, "bench.other") == [
        "1: demo.swarm._free_port",
        "4: bench.lifecycle._driver",
        "5: infra.kafka._hidden",
        "7: demo.swarm.wait_ready._x",
    ]
    assert private_imports("from bench.other import _own\n", "bench.other") == []


@pytest.mark.parametrize("package", ["bench", "demo"])
def test_bench_and_demo_use_only_public_names(package: str) -> None:
    found: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found += [f"{module}:{hit}" for hit in private_imports(path.read_text(), module)]
    assert found == []
