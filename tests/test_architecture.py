"""Structural rules of the package, checked on the source (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import glmtune

SRC = Path(glmtune.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> glmtune modules it imports, counting imports inside functions (and TYPE_CHECKING)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, f in modules.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                anchor = package[: len(package) - node.level + 1] if node.level else []
                prefix = ".".join(anchor + ([node.module] if node.module else []))
                names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:  # `from .x import func` -> module .x
                    name = name.rpartition(".")[0]
                # A package's own __init__ runs before its modules anyway: not an edge of the design.
                if name and name != mod and not mod.startswith(name + "."):
                    graph[mod].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_among_glmtune_modules():
    graph = import_graph()
    assert "glmtune.weights" in graph["glmtune.adapters"]  # the walk sees imports (sanity)
    assert cycles(graph) == []


def test_leaf_modules_import_no_glmtune_module_above_them():
    graph = import_graph()
    assert graph["glmtune.atomic"] == set()
    assert graph["glmtune.weights"] <= {"glmtune.errors", "glmtune.specs"}
    assert "glmtune.quantize" not in graph["glmtune.adapters"]  # quantization imports adapters, not back


# Comparisons of a model's generation, type or loader: these belong in the registry (specs.py) or in the
# model classes (models/); everywhere else asks the spec.
_MODEL_BRANCH = re.compile(
    r"(\bspec\.name|\bspec\.loader|\bgeneration|get\([\"']model_type[\"']\)|\[[\"']model_type[\"']\]"
    r"|(?<!trainer_spec)\.model_type)\s*(==|!=|in \(|not in \()"
)


def test_branch_pattern_catches_the_usual_spellings():
    for line in ('spec.name == "chatglm"', 'cfg.get("model_type") in ("chatglm",)', "generation != 'glm4'"):
        assert _MODEL_BRANCH.search(line), line
    assert not _MODEL_BRANCH.search("proto.trainer_spec.model_type != 2")  # sentencepiece's, not a model


def test_no_model_type_branches_outside_the_registry():
    offenders = []
    for f in _modules().values():
        if f.name == "specs.py" and f.parent == SRC or f.parent.name == "models":
            continue
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if _MODEL_BRANCH.search(line.split("#", 1)[0]):
                offenders.append(f"{f.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []
