"""The folders are the architecture: no import cycles, serving imports no training code, the CLI
imports no torch until a command needs it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "lotus_deploy"

# Modules that train or prune: serving (runtime, a run directory opened for serving) never imports them.
TRAINING = ("lotus_deploy.stages", "lotus_deploy.train", "lotus_deploy.pipeline", "lotus_deploy.prune.soup",
            "lotus_deploy.prune.tickets", "lotus_deploy.prune.early_bird", "lotus_deploy.prune.sweep",
            "lotus_deploy.prune.permute", "lotus_deploy.state", "lotus_deploy.schedule")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the lotus_deploy modules it imports anywhere (top level, functions, TYPE_CHECKING)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in files else prefix for a in node.names]
            for t in targets:
                while t and t not in files:  # `import lotus_deploy.a.b` -> the module that exists
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("lotus_deploy"):
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_lotus_modules():
    graph = import_graph()
    assert len(graph) > 30 and graph["lotus_deploy.pipeline"], "the graph builder found no modules or edges"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_package_imports_respect_the_layers():
    """Algorithms never import stages or the runner; serving and export never import training."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith(("lotus_deploy.prune", "lotus_deploy.masks", "lotus_deploy.scope", "lotus_deploy.recipe")):
            bad = {d for d in deps if d.startswith(("lotus_deploy.stages", "lotus_deploy.pipeline", "lotus_deploy.bench"))}
            assert not bad, f"{mod} imports {sorted(bad)}"
        if mod.startswith(("lotus_deploy.export", "lotus_deploy.runtime", "lotus_deploy.run")) and mod != "lotus_deploy.runtime_check":
            bad = {d for d in deps if d.startswith(TRAINING)}
            assert not bad, f"{mod} imports training code {sorted(bad)}"
        if mod == "lotus_deploy.distributed":  # low level: run, data, train, prune and the runner build on it
            assert deps <= {"lotus_deploy.errors"}, f"{mod} imports {sorted(deps - {'lotus_deploy.errors'})}"


def _imported(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", [
    pytest.param("import lotus_deploy.runtime", id="import-runtime"),
    pytest.param("import lotus_deploy.runtime as r\nr.load(RUN)", id="load-run-for-serving"),
    pytest.param("import lotus_deploy.runtime as r\nr.load(RUN + '/export/model.onnx')", id="load-onnx"),
])
def test_serving_imports_no_training_code(code, tiny_run):
    mods = _imported(f"RUN = {str(tiny_run)!r}\n" + code)
    bad = [m for m in mods if m.startswith(TRAINING)]
    assert not bad, f"serving imported {bad}"


@pytest.mark.parametrize("argv", [["--help"], ["validate", "recipes/demo.yaml"], ["schema"]], ids=["help", "validate", "schema"])
def test_cli_imports_no_torch(argv):
    code = f"import sys\nsys.argv = ['lotus', *{argv!r}]\nfrom lotus_deploy.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code"
    mods = _imported(code)
    heavy = [m for m in ("torch", "timm", "onnx", "onnxruntime", "torchvision") if m in mods]
    assert not heavy, f"lotus {' '.join(argv)} imported {heavy}"
