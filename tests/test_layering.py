"""vera_fx's modules depend one way (docs/architecture.md, Layers): no import cycle, no import upward across
layers, and no function-level import of a vera_fx module (the old way of hiding a cycle).

The imports are read with ``ast`` from the source files, so the test sees every import statement, also
those under ``if TYPE_CHECKING:``. Importing ``vera_fx.passes.match`` from outside ``vera_fx.passes`` also runs
``vera_fx/passes/__init__.py``: that package edge counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Optional

import pytest

PACKAGE = "vera_fx"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Layer of each module (lower layers never import higher ones). A name ending in "." covers a package's
# submodules. Keep this table and docs/architecture.md (Layers) in step.
LAYERS: dict[str, int] = {
    "vera_fx.config": 0, "vera_fx.sites": 0, "vera_fx.runtime": 0, "vera_fx.versions": 0, "vera_fx.compat": 0,
    "vera_fx.folder": 0, "vera_fx.checks": 1,
    "vera_fx.methods": 1, "vera_fx.methods.": 1, "vera_fx.quantized": 1, "vera_fx.capture": 1, "vera_fx.blocks": 1,
    "vera_fx.block_export": 1, "vera_fx.signatures": 1,
    "vera_fx.state": 2,
    "vera_fx.passes": 3, "vera_fx.passes.": 3,
    "vera_fx.adapters": 4, "vera_fx.checkpoint": 4, "vera_fx.sampling": 4, "vera_fx.uncertainty": 4,
    "vera_fx.model": 4, "vera_fx.generation": 4, "vera_fx.serving": 4, "vera_fx.blockwise": 4,
    "vera_fx.distributed": 4, "vera_fx.surface": 4, "vera_fx.variants": 4,
    "vera_fx.inspect": 5,
    "vera_fx.cli": 6, "vera_fx.demo": 6, "vera_fx": 6,
}
LAYER_NAMES = ["config, sites, runtime, versions, compat, folder",
               "methods, quantized, capture, signatures, blocks, block_export, checks",
               "state", "passes",
               "adapters, checkpoint, sampling, uncertainty, model, generation, variants, "
               "serving, blockwise, distributed, surface",
               "inspect", "cli, demo, vera_fx"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(importer: str, node: ast.AST) -> list[str]:
    """The vera_fx modules an import statement of ``importer`` names (submodules included)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = importer.split(".") if _is_package(importer) else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source != PACKAGE and not source.startswith(PACKAGE + "."):
        return []
    # ``from package import submodule`` imports the submodule; any other name comes from ``source`` itself.
    found = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    if len(found) < len(node.names):
        found.insert(0, source)
    return found


def _imports(module: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(module-level imports, function-level imports) of vera_fx modules in ``module``, with line numbers."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))
    top: list[tuple[str, int]] = []
    nested: list[tuple[str, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _resolve(module, child):
                    (nested if in_function else top).append((target, child.lineno))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, nested


def _graph() -> dict[str, set[str]]:
    """Module -> the vera_fx modules importing it runs (package ``__init__`` files of other packages too)."""
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        edges: set[str] = set()
        for target, _ in _imports(module)[0]:
            parts = target.split(".")
            for i in range(2, len(parts)):  # parent packages below the root run first
                parent = ".".join(parts[:i])
                if not (module == parent or module.startswith(parent + ".")):
                    edges.add(parent)
            edges.add(target)
        edges.discard(module)
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One import cycle of ``graph`` (as a path that ends where it starts), or None."""
    colour: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> Optional[list[str]]:
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if colour.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in colour:
                found = dfs(m)
                if found:
                    return found
        stack.pop()
        colour[n] = 2
        return None

    for n in sorted(graph):
        if n not in colour:
            found = dfs(n)
            if found:
                return found
    return None


def _layer(module: str) -> Optional[int]:
    if module in LAYERS:
        return LAYERS[module]
    prefixes = [p for p in LAYERS if p.endswith(".") and module.startswith(p)]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def test_the_parser_sees_the_package():
    assert {"vera_fx", "vera_fx.passes.inject", "vera_fx.methods.base", "vera_fx.state"} <= set(MODULES)
    graph = _graph()
    assert "vera_fx.state" in graph["vera_fx.passes.inject"]
    assert "vera_fx.passes" in graph["vera_fx.adapters"]  # the package edge of an import from outside it


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, ("import cycle: " + " -> ".join(cycle) + ". Move what both modules need into the lower "
                           "one (or a new module below both); see docs/architecture.md, Layers")


def test_no_function_level_import_of_vera_fx():
    found = [f"{MODULES[m].relative_to(ROOT.parent)}:{line}: imports {target}"
             for m in MODULES for target, line in _imports(m)[1]]
    assert not found, ("function-level imports of vera_fx modules (import at the top of the module; a cycle "
                       "means the shared piece belongs in a lower layer):\n" + "\n".join(found))


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if _layer(m) is None]
    assert not missing, (f"modules without a layer: {missing}; add them to LAYERS here and to docs/architecture.md "
                         "(Layers, Modules)")


def test_imports_go_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        mine = _layer(module)
        for target in targets:
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}: {LAYER_NAMES[mine]}) imports {target} "
                              f"(layer {theirs}: {LAYER_NAMES[theirs]})")
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_importing_vera_fx_has_no_side_effects():
    """``import vera_fx`` and ``from vera_fx import *`` print nothing, warn nothing, leave torch's and logging's
    global settings as they were and import no bitsandbytes (not even ``vera_fx.quantized`` does)."""
    code = textwrap.dedent("""
        import logging, warnings
        warnings.simplefilter("error")
        import torch
        def settings():
            return (torch.get_default_dtype(), torch.is_grad_enabled(), torch.are_deterministic_algorithms_enabled(),
                    torch.get_num_threads(), logging.getLogger().level, list(logging.getLogger().handlers),
                    logging.getLogger("vera_fx").level, list(logging.getLogger("vera_fx").handlers))
        before = settings()
        from vera_fx import *
        import sys, vera_fx, vera_fx.cli, vera_fx.quantized
        assert settings() == before, (before, settings())
        assert "bitsandbytes" not in sys.modules
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == "" and done.stderr == "", (done.stdout, done.stderr)


@pytest.mark.parametrize("source,expected", [
    ("from .. import quantized", ["vera_fx.quantized"]),
    ("from ..state import bias_targets", ["vera_fx.state"]),
    ("from . import chains", ["vera_fx.passes.chains"]),
    ("import vera_fx", ["vera_fx"]),
    ("import torch", []),
])
def test_resolve_relative_imports(source, expected):
    node = ast.parse(source).body[0]
    assert _resolve("vera_fx.passes.inject", node) == expected
