"""The package's shape (docs/maintainers/architecture.md): imports flow one way, functions stay short,
private helpers are not copied from module to module."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "baez_ray"


def modules() -> dict[str, ast.Module]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(p.read_text(), str(p))
    return out


def import_graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module → the package modules it imports, counting imports inside functions."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, tree in mods.items():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert cycles(import_graph(modules())) == []


def test_the_checker_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_function_longer_than_60_lines():
    long = [(f"{name}.{node.name}", node.end_lineno - node.lineno + 1) for name, tree in modules().items()
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def test_no_private_helper_in_more_than_two_modules():
    where = defaultdict(set)
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_") \
                    and not node.name.startswith("__"):
                where[node.name].add(name)
    assert {k: sorted(v) for k, v in where.items() if len(v) > 2} == {}


def test_layers_import_downwards_only():
    """Stages, methods, llm, av and models never import a job or the CLI."""
    graph = import_graph(modules())
    low = ("baez_ray.stages", "baez_ray.methods", "baez_ray.llm", "baez_ray.av", "baez_ray.models", "baez_ray.schema",
           "baez_ray.config", "baez_ray.rundir", "baez_ray.ray_pool")
    bad = [(m, t) for m, ts in graph.items() if m.startswith(low) for t in ts if t.startswith(("baez_ray.jobs", "baez_ray.cli"))]
    assert bad == []


def undescribed_fields(module) -> list[str]:
    """`Model.field` for every field of the module's pydantic models without a description."""
    from pydantic import BaseModel

    models = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, BaseModel) and v.__module__ == module.__name__]
    return [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not (f.description or "").strip()]


def test_every_job_file_field_has_a_description():
    """The job file reference (docs/reference/config.md) is generated from these."""
    from baez_ray import config
    from baez_ray.tools import train_sae

    assert undescribed_fields(config) == [] and undescribed_fields(train_sae) == []


def test_the_description_check_sees_a_field_without_one():
    import types

    from pydantic import BaseModel, Field

    mod = types.ModuleType("fake_config")
    mod.Section = type("Section", (BaseModel,), {"__module__": "fake_config", "__annotations__": {"a": int, "b": int},
                                                "a": Field(1, description="described"), "b": 2})
    assert undescribed_fields(mod) == ["Section.b"]


def test_jobs_hold_no_stage():
    """A job module orders stages: it maps no batches and builds no actor pool itself."""
    bad = []
    for name, tree in modules().items():
        if not name.startswith("baez_ray.jobs"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                fn = node.func
                called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
                if called in ("map_batches", "map_groups", "actor_map", "from_arrow_refs"):
                    bad.append(f"{name}:{node.lineno} {called}")
    assert bad == []


def test_test_modules_import_no_other_test_module():
    """Shared builders live in tests/helpers.py and tests/conftest.py, not in a test module."""
    bad = []
    for p in (PKG.parent / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{p.name}: {n}" for n in names if n.split(".")[0].startswith("test_")]
    assert bad == []
