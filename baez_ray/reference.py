"""The reference pages of the docs site, generated from the code when the site is built
(`docs/hooks.py` hands them to mkdocs), so that they cannot drift from it:

    config.py  (pydantic models, Field descriptions)   ─config_page─▶  reference/config.md
    schema.py  (Arrow schemas, their source comments)  ─tables_page─▶  reference/tables.md
    methods/   (the registry)                          ─methods_page─▶ reference/methods.md
    cli.py     (the argparse parser)                   ─cli_page─▶     reference/cli.md

Nothing here is written by hand about a key, a column, a method or a flag: a field added
to the schema appears on the page at the next build, with its type, default and
description (tests/test_docs.py).
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import json
import os
import tokenize
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

GENERATED = "<!-- generated from the code by baez_ray/reference.py when the site is built: edit the code, not this page -->\n"


def cell(text: object) -> str:
    """Text for one Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


# ---- config.md ---------------------------------------------------------------------------


def _section_models(root: type[BaseModel]) -> dict[type[BaseModel], list[str]]:
    """Every section model reachable from `root`, in the order a job file reads, with the
    key paths it appears at (`label.explainer`, `saes[]`, ...)."""
    found: dict[type[BaseModel], list[str]] = {root: [""]}
    queue = [(root, "")]
    while queue:
        model, prefix = queue.pop(0)
        for name, field in model.model_fields.items():
            for sub, many in _models_in(field.annotation):
                path = f"{prefix}{name}{'[]' if many else ''}"
                if sub in found:
                    found[sub].append(path)
                else:
                    found[sub] = [path]
                    queue.append((sub, path + "."))
    return found


def _models_in(annotation, many: bool = False):
    """(section model, inside a list) for every pydantic model an annotation names."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, many
        return
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        yield from _models_in(arg, many or origin in (list, tuple))


def _anchor(model: type) -> str:
    return model.__name__.lower()


def type_text(annotation) -> str:
    """A job file's view of a type: `int | null`, `"a" | "b"`, `list of str`, a link to a section."""
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[section](#{_anchor(annotation)})"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_text(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"mapping {type_text(args[0])} → {type_text(args[1])}"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, default=str) + "`"


def _bounds(field) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥"}
    out = []
    for m in field.metadata:
        out += [f"{sign} {getattr(m, attr)}" for attr, sign in signs.items() if getattr(m, attr, None) is not None]
    return ", ".join(out)


def _model_doc(model: type[BaseModel]) -> str:
    doc = model.__doc__ or ""
    inherited = any(doc == (b.__doc__ or "") for b in model.__mro__[1:])
    return "" if inherited else inspect.cleandoc(doc)


def model_table(model: type[BaseModel]) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        kind = type_text(f.annotation) + (f" ({_bounds(f)})" if _bounds(f) else "")
        rows.append(f"| `{name}` | {cell(kind)} | {cell(default_text(f))} | {cell(f.description or '')} |")
    return "\n".join(rows)


def config_sections(root: type[BaseModel], title: str) -> list[str]:
    out = []
    for model, paths in _section_models(root).items():
        shown = [p for p in paths if p] or [title]
        head = f"### `{shown[0]}`" if paths[0] else f"### {title}"
        out.append(f"{head} {{#{_anchor(model)}}}\n")
        if len(shown) > 1:
            out.append("The same section at: " + ", ".join(f"`{p}`" for p in shown[1:]) + ".\n")
        if _model_doc(model):
            out.append(_model_doc(model) + "\n")
        out.append(model_table(model) + "\n")
    return out


def config_page(root: type[BaseModel] | None = None, train_root: type[BaseModel] | None = None) -> str:
    """Every key of a job file: its type (with bounds), default and description."""
    from baez_ray.config import JobSpec

    if root is None:
        root = JobSpec
    if train_root is None:
        from baez_ray.tools.train_sae import TrainSAEJob

        train_root = TrainSAEJob
    out = [GENERATED, "# Job file reference\n",
           "Every key a job file may hold, as `baez-ray validate` checks it (`baez_ray/config.py`). "
           "Unknown keys are refused, naming the key; `--set key.path=value` overrides any of them "
           "(the value is read as YAML). *required* marks a key without a default.\n",
           "## collect, ingest, label and benchmark jobs\n"]
    out += config_sections(root, "Top level")
    out += ["## train_sae jobs\n", "Training an SAE has a schema of its own (`baez_ray/tools/train_sae.py`).\n"]
    out += config_sections(train_root, "Top level (train_sae)")
    return "\n".join(out)


# ---- tables.md ---------------------------------------------------------------------------


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """line → its comment's text, and the lines that hold nothing but a comment."""
    text, alone = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                alone.add(tok.start[0])
    return text, alone


def _above(line: int, text: dict[int, str], alone: set[int]) -> str:
    """The comment-only lines right above `line`, joined."""
    got = []
    while line - 1 in alone:
        line -= 1
        got.insert(0, text[line])
    return " ".join(got)


def _field_calls(node: ast.AST) -> list[ast.Call]:
    return sorted((n for n in ast.walk(node) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "field"
                   and n.args and isinstance(n.args[0], ast.Constant)), key=lambda n: n.lineno)


def column_notes(module) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """From a schema module's source: per module-level name, column → its comment (trailing,
    or the comment lines right above it), following names the value refers to; and per
    name, the comment lines above its assignment."""
    source = inspect.getsource(module)
    text, alone = _comments(source)
    assigns = {t.id: node for node in ast.parse(source).body if isinstance(node, ast.Assign)
               for t in node.targets if isinstance(t, ast.Name)}

    def notes(name: str, seen: frozenset = frozenset()) -> dict[str, str]:
        node = assigns.get(name)
        if node is None or name in seen:
            return {}
        got: dict[str, str] = {}
        for ref in (n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)):
            got.update(notes(ref, seen | {name}))
        for call in _field_calls(node.value):
            note = text.get(call.end_lineno) if call.end_lineno not in alone else None
            got[call.args[0].value] = note or _above(call.lineno, text, alone)
        return got

    return {name: notes(name) for name in assigns}, {name: _above(node.lineno, text, alone) for name, node in assigns.items()}


def _table_summaries(module) -> dict[str, str]:
    """The `name  description` lines of the schema module's docstring."""
    out, last = {}, None
    for line in (module.__doc__ or "").splitlines():
        head, _, rest = line.partition(" ")
        if line and not line.startswith(" ") and rest.strip() and head.isidentifier():
            last = head
            out[last] = rest.strip()
        elif last and line.startswith(" ") and line.strip():
            out[last] += " " + line.strip()
        else:
            last = None
    return out


def arrow_type_text(t, named: dict[str, object]) -> str:
    import pyarrow as pa

    for name, struct in named.items():
        if t.equals(struct):
            return f"[{name}](#{name.lower()})"
    if pa.types.is_list(t):
        return "list of " + arrow_type_text(t.value_type, named)
    return str(t)


def _columns(fields, notes: dict[str, str], named: dict[str, object]) -> str:
    rows = ["| column | type | null | description |", "|---|---|---|---|"]
    for f in fields:
        rows.append(f"| `{f.name}` | {cell(arrow_type_text(f.type, named))} | {'yes' if f.nullable else 'no'} | {cell(notes.get(f.name, ''))} |")
    return "\n".join(rows)


def tables_page() -> str:
    """Every table's columns (`schema.TABLES`) and the struct types they nest."""
    import pyarrow as pa

    from baez_ray import schema

    notes, above = column_notes(schema)
    named = {k: v for k, v in vars(schema).items() if isinstance(v, pa.StructType)}
    name_of = {id(v): k for k, v in vars(schema).items() if isinstance(v, pa.Schema)}
    summaries = _table_summaries(schema)
    out = [GENERATED, "# Table reference\n",
           "Every table of a run directory is Parquet with these columns (`baez_ray/schema.py`; "
           f"schema version {schema.SCHEMA_VERSION}). Stages cast what they write to them with `schema.conform`.\n"]
    for table, sch in schema.TABLES.items():
        var = name_of.get(id(sch), table.upper())
        out.append(f"## {table} {{#{table}}}\n")
        intro = " ".join(" ".join(s.split()) for s in (summaries.get(table, ""), above.get(var, "")) if s)
        if intro:
            out.append(intro + "\n")
        out.append(_columns(sch, notes.get(var, {}), named) + "\n")
    out.append("## Nested types\n")
    for name, struct in named.items():
        out.append(f"### {name} {{#{name.lower()}}}\n")
        if above.get(name):
            out.append(above[name] + "\n")
        out.append(_columns([struct.field(i) for i in range(struct.num_fields)], notes.get(name, {}), named) + "\n")
    return "\n".join(out)


# ---- methods.md --------------------------------------------------------------------------


def method_description(method) -> str:
    """The method's own description, else its function's docstring, else its module's
    first paragraph."""
    import importlib

    text = getattr(method, "description", "") or inspect.getdoc(method.label) or \
        inspect.getdoc(importlib.import_module(method.label.__module__)) or ""
    return " ".join(text.split("\n\n")[0].split())


def methods_page() -> str:
    """Every method the registry holds (`baez_ray.methods`), as job files name them."""
    from baez_ray import methods
    from baez_ray.methods import registry

    rows = ["| method | name pattern | tiers | needs | module | description |", "|---|---|---|---|---|---|"]
    for m in registry._METHODS:
        rows.append(f"| `{m.shown}` | `{cell(m.pattern)}` | {', '.join(map(str, m.tiers))} | "
                    f"{', '.join(m.needs) or '–'} | `{m.label.__module__}` | {cell(method_description(m))} |")
    tiers = "\n".join(f"- tier {t}: " + ", ".join(f"`{n}`" for n in methods.known(tier=t)) for t in (1, 2, 3))
    return "\n".join([GENERATED, "# Method reference\n",
                      "The labelling methods registered in `baez_ray/methods/` (`@register`), which job files name in "
                      "`label.tier1`/`tier2`/`tier3` and `benchmark.methods` and which are checked when a job is loaded. "
                      "A name pattern is a regular expression: `eleuther_acts_top(\\d+)` takes `eleuther_acts_top5`, "
                      "`eleuther_acts_top20`. How each works: [Methods](../methods.md).\n",
                      "\n".join(rows) + "\n", "Methods a label job may use per tier:\n", tiers + "\n"])


# ---- cli.md ------------------------------------------------------------------------------


def _usage(parser: argparse.ArgumentParser) -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the page must not depend on it
    try:
        return parser.format_usage().strip()
    finally:
        os.environ.pop("COLUMNS") if before is None else os.environ.__setitem__("COLUMNS", before)


def _arguments(parser: argparse.ArgumentParser) -> str:
    rows = ["| argument | default | description |", "|---|---|---|"]
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction) or a.help == argparse.SUPPRESS:
            continue
        name = ", ".join(a.option_strings) or a.dest
        if a.option_strings and a.nargs != 0:
            name += f" {a.metavar or a.dest.upper()}"
        default = "" if a.default in (None, False, [], argparse.SUPPRESS) else f"`{a.default}`"
        rows.append(f"| `{cell(name)}` | {default} | {cell(a.help or '')} |")
    return "\n".join(rows)


def cli_page(parser: argparse.ArgumentParser | None = None) -> str:
    """Every subcommand of `baez-ray` with its usage and arguments, from the parser itself."""
    if parser is None:
        from baez_ray import cli

        parser = getattr(cli, "parser", None) or cli._parser
        parser = parser()
    out = [GENERATED, "# Command reference\n", f"{parser.description or ''} Exit codes: [Operations](../operations.md#exit-codes).\n",
           "```text\n" + _usage(parser) + "\n```\n", _arguments(parser) + "\n"]
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    helps = {c.dest: c.help for c in subs._choices_actions} if subs else {}
    for name, sub in (subs.choices.items() if subs else ()):
        out += [f"## baez-ray {name} {{#{name}}}\n", (helps.get(name) or sub.description or "") + "\n",
                "```text\n" + _usage(sub) + "\n```\n", _arguments(sub) + "\n"]
    return "\n".join(out)


# ---- results/benchmarks.md -----------------------------------------------------------------


def _flat(value, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, scalar or short list) pairs of a result object."""
    if isinstance(value, dict):
        return [kv for k, v in value.items() if k != "bench" for kv in _flat(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), value)]


def results_page(results_dir: str | Path) -> str:
    """Every recorded run of `bench/results/<bench>-<machine>.json`, latest first."""
    out = [GENERATED, "# All recorded runs\n",
           "Rendered from `bench/results/*.json` ([format](../benchmarks.md#results-files)); what moved a figure, "
           "and why, is told on the dated pages of [Results](index.md).\n"]
    for path in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        out.append(f"## {data['bench']} on {data['machine']} {{#{path.stem}}}\n")
        out.append(f"`{path.name}`: `{data.get('script', '')}` on {data.get('machine_description', data['machine'])}.\n")
        rows = ["| date | command | conditions | figures |", "|---|---|---|---|"]
        for run in reversed(data["runs"]):
            figures = "; ".join(f"{k} {json.dumps(v)}" for k, v in _flat(run.get("result", {})))
            rows.append(f"| {run.get('date', '')} | `{cell(run.get('command', ''))}` | {cell(run.get('conditions', ''))} | {cell(figures)} |")
        out.append("\n".join(rows) + "\n")
    return "\n".join(out)


PAGES = {"reference/config.md": config_page, "reference/tables.md": tables_page,
         "reference/methods.md": methods_page, "reference/cli.md": cli_page}


def pages(root: str | Path | None = None) -> dict[str, str]:
    """docs path → Markdown of every generated page; with the checkout's `root`, also the
    page of its benchmark results."""
    out = {path: make() for path, make in PAGES.items()}
    if root is not None and (Path(root) / "bench" / "results").is_dir():
        out["results/benchmarks.md"] = results_page(Path(root) / "bench" / "results")
    return out


def write(out_dir: str | Path, root: str | Path | None = None) -> list[Path]:
    """Write the generated pages under `out_dir` (to read them without building the site)."""
    written = []
    for path, text in pages(root).items():
        p = Path(out_dir) / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written
