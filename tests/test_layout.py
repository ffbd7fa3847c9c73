"""The tree is the architecture (docs/architecture.md): these are its rules, read from the source itself.

Every import counts, also those inside functions: a circle that only closes lazily still means two modules
that cannot be understood (or moved) apart.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"extract": "pathseg.extract", "train_head": "pathseg.train_head", "predict": "pathseg.predict",
          "pretrain": "pathseg.pretrain"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for top in ("pathseg", *STAGES):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join([STAGES.get(parts[0], parts[0]), *parts[1:]])
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = modules()


def imports() -> dict[str, set[str]]:
    """Module -> the pathseg modules it imports (a package's `__init__` when the name is a package's export)."""
    def resolve(name: str) -> str:
        while name not in MODULES and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in MODULES else ""

    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pathseg"):
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("pathseg")]
            graph[name].update(t for t in map(resolve, targets) if t and t != name)
    return graph


GRAPH = imports()


def stage_of(module: str) -> str:
    return next((stage for stage, package in STAGES.items() if module.startswith(package)), "shared")


def test_the_layout_is_read_from_the_real_tree():
    assert {"pathseg.store", "pathseg.metrics.objects", "pathseg.loading.checkpoints", "pathseg.imaging.slides",
            "pathseg.extract.cli", "pathseg.train_head.cli", "pathseg.predict.cli",
            "pathseg.pretrain.cli"} <= set(GRAPH)
    assert "pathseg.store.feature_store" in GRAPH["pathseg.store.integrity"]


def test_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in GRAPH[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert circles == []


def test_the_house_rules_hold():
    broken = []
    for module, imported in GRAPH.items():
        for other in imported:
            here, there = stage_of(module), stage_of(other)
            if {here, there} == {"extract", "train_head"}:
                broken.append((module, other, "extract/ and train_head/ never import each other"))
            if there == "predict" and here != "predict" and module != "pathseg.cli":
                broken.append((module, other, "only the CLI imports predict/"))
            if here == "pretrain" and there == "train_head":
                broken.append((module, other, "pretrain/ never imports train_head/"))
            if here == "shared" and there != "shared" and module != "pathseg.cli":
                broken.append((module, other, "pathseg/ never imports a stage (but cli.py, which assembles them)"))
            if module.startswith("pathseg.store") and not other.startswith("pathseg.store") and other.split(".")[1] in (
                    "metrics", "predict", "train_head", "extract", "pretrain", "datasets"):
                broken.append((module, other, "the store knows nothing of what uses it"))
    assert broken == []


def test_no_module_is_over_the_size_limit_or_named_after_its_package():
    too_long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert too_long == {}
    prefixed = [name for name in MODULES if name.count(".") >= 2
                and name.rsplit(".", 1)[1].startswith(name.rsplit(".", 2)[1].rstrip("s") + "_")]
    assert prefixed == []
