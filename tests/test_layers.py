"""The package's layers (docs/architecture.md): every import, function-level ones too, points
down or sideways, and no two modules import each other, directly or around a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "saeflow"

# Layer of each module (a name ending in "." covers a package). Unlisted top-level modules are
# algorithms (layer 2), so a new algorithm module needs no entry here.
LAYERS = {
    0: ["saeflow.sites", "saeflow.io", "saeflow.atomic", "saeflow.configs"],
    1: ["saeflow.models", "saeflow.hooks", "saeflow.sae", "saeflow.formats", "saeflow.formats.",
        "saeflow.suite", "saeflow.corpus", "saeflow.tokens"],
    3: ["saeflow.catalog", "saeflow.recipes", "saeflow.recipes.", "saeflow.plots",
        "saeflow.presets", "saeflow.demo", "saeflow.report", "saeflow.report_html"],
    4: ["saeflow.cli", "saeflow.commands", "saeflow.commands.", "saeflow.viewer",
        "saeflow.viewer."],
    5: ["saeflow"],  # the package root: the public API, a facade over everything (no module
}                    # imports it)
NAMES = ["sites, io, configs", "models, hooks, SAEs, formats, suite, corpus", "algorithms",
         "experiments (catalog, recipes, plots, presets, demo, report)",
         "surfaces (cli, commands, viewer)", "the public API"]
# Pairs that are forbidden although the layers alone would allow them.
FORBIDDEN = [("saeflow.viewer.", "saeflow.commands"), ("saeflow.viewer.", "saeflow.cli")]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """saeflow modules imported anywhere in the file (``from saeflow import x`` counts as
    ``saeflow.x`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # saeflow.x.y (an attribute) -> saeflow.x
                name = name.rpartition(".")[0]
            if name.startswith("saeflow") and name != here:
                out.add(name)
    return out


def layer(name: str) -> int:
    best, found = 2, -1
    for level, patterns in LAYERS.items():
        for pat in patterns:
            hit = name.startswith(pat) if pat.endswith(".") else name == pat
            if hit and len(pat) > found:
                best, found = level, len(pat)
    return best


def _matches(name: str, pat: str) -> bool:
    return name.startswith(pat) if pat.endswith(".") else name == pat or \
        name.startswith(pat + ".")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def test_the_parser_sees_function_level_and_package_imports(tmp_path):
    mods = set(modules())
    assert {"saeflow.catalog", "saeflow.train", "saeflow.commands.steer"} <= mods
    g = {name: imports(path, mods) for name, path in modules().items()}
    assert "saeflow.train" in g["saeflow.catalog"]  # a function-level import
    assert "saeflow.recipes.steering" in g["saeflow.commands.steer"]
    assert layer("saeflow.formats.saelens") == 1 and layer("saeflow.lineage") == 2
    assert layer("saeflow.recipes.steer_eval") == 3 and layer("saeflow.viewer.api") == 4


def test_every_import_points_down_or_sideways(graph):
    bad = [f"{a} (layer {layer(a)}: {NAMES[layer(a)]}) imports {b} (layer {layer(b)})"
           for a, deps in graph.items() for b in sorted(deps) if layer(b) > layer(a)]
    bad += [f"{a} imports {b}" for a, deps in graph.items() for b in deps
            for src, dst in FORBIDDEN if _matches(a, src) and _matches(b, dst)]
    assert not bad, "imports against the layers:\n  " + "\n  ".join(bad)


def test_no_import_cycles(graph):
    """Tarjan's strongly connected components: any with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_package_root_declares_its_api_and_imports_nothing_heavy():
    import subprocess
    import sys

    import saeflow
    assert sorted(saeflow.__all__) == sorted(saeflow._WHERE)  # the list ruff and pyright read
    assert all(hasattr(saeflow, n) for n in saeflow.__all__)
    code = "import sys, saeflow; print(sorted(m for m in ('torch', 'numpy', 'transformers') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _parser_imports(names: list[str]) -> list[str]:
    """The heavy modules loaded by registering the commands ``names`` (in a fresh process)."""
    import subprocess
    import sys
    code = ("import argparse, importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module('saeflow.commands.' + name).add("
            "argparse.ArgumentParser().add_subparsers())\n"
            "print(sorted(m for m in ('torch', 'numpy', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(out.stdout.strip())


@pytest.mark.parametrize("name", ["train", "quality", "graph", "match", "permute", "prune",
                                  "groups", "steer", "themes", "contexts", "view", "info", "atlas",
                                  "deactivate", "steer_eval", "demo"])
def test_building_a_command_parser_imports_no_torch(name):
    """``saeflow --help`` builds every parser: their defaults come from torch-free config
    modules (``saeflow.configs``, the recipes' options), the work imports inside ``run``."""
    assert _parser_imports([name]) == []


def test_building_the_cli_parser_imports_no_torch():
    from saeflow.cli import COMMANDS
    assert _parser_imports(COMMANDS) == []
