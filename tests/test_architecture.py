"""The import structure: layers that import only downward, and no import circles.

Every `import` / `from ... import` of a samhq module anywhere in a file (functions included, so a
lazy import cannot hide an arrow running back up) is read with `ast`. A module may import modules of
its own layer or a lower one; `samhq/__init__.py`, the public facade, may import anything. Within a
layer the imports must not form a circle. docs/ARCHITECTURE.md draws the same layers.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "samhq"

# Lowest first. A module belongs to the first layer with a prefix that matches its dotted name.
LAYERS = [
    ("core", ["samhq.config", "samhq.config_sam2", "samhq.image_io", "samhq.masks", "samhq.visualize", "samhq.limits",
              "samhq.dtypes", "samhq.formats"]),
    ("checkpoint files", ["samhq.checkpoints", "samhq.checkpoints_sam2"]),
    ("modeling", ["samhq.modeling"]),
    ("processing", ["samhq.processing"]),
    ("export", ["samhq.export"]),
    ("engines", ["samhq.engines"]),
    ("predictor", ["samhq.predictor"]),
    ("applications", ["samhq.automatic", "samhq.pipelines", "samhq.server", "samhq.data", "samhq.eval",
                      "samhq.train", "samhq.fast", "samhq.tiles", "samhq.geo", "samhq.prompt_files",
                      "samhq.distributed", "samhq.label_studio", "samhq.video"]),
    ("cli", ["samhq.cli"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS here and to docs/ARCHITECTURE.md")


def imports_of(path: Path) -> set[str]:
    """The samhq modules a file imports (resolving relative imports; `from pkg import mod` counts as pkg.mod)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "samhq")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "samhq":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                is_module = (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists() or \
                    (ROOT.parent / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else target)
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_has_a_layer():
    for name in GRAPH:
        if name != "samhq":
            layer_of(name)


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n != "samhq"))
def test_imports_run_downward(name):
    mine = layer_of(name)
    up = sorted(t for t in GRAPH[name] if t != "samhq" and layer_of(t) > mine)
    assert not up, f"{name} ({LAYERS[mine][0]}) imports from higher layers: " + ", ".join(
        f"{t} ({LAYERS[layer_of(t)][0]})" for t in up)
    assert "samhq" not in GRAPH[name], f"{name} imports the samhq facade; import the module it needs"


def test_no_import_circles():
    graph = {n: {t for t in ts if t in GRAPH and t != n and not n.startswith(t + ".")} for n, ts in GRAPH.items()
             if n != "samhq"}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for t in sorted(graph.get(n, ())):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_check_sees_arrows():
    """The reader finds relative, absolute and function-level imports (so the tests above can fail)."""
    assert "samhq.modeling.model" in GRAPH["samhq.predictor"] or "samhq.engines" in GRAPH["samhq.predictor"]
    assert "samhq.checkpoints" in GRAPH["samhq.modeling.pretrained"]
    assert "samhq.pipelines" in GRAPH["samhq.cli.segment"]  # imported inside run()
