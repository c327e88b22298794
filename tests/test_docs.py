"""The docs: the site builds with `mkdocs build --strict` (a broken link, a missing page or
an anchor that does not exist fails), its reference pages follow the code they are
generated from, and the README stays a door (short, no history, its job file shipped and
valid)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import argparse

from pydantic import Field, create_model

from baez_ray import reference, schema
from baez_ray.config import JobSpec, LLMConfig
from baez_ray.methods import registry

ROOT = Path(__file__).resolve().parents[1]


def build_site(docs_root: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(docs_root / "mkdocs.yml"), "-d", str(out)],
                          cwd=docs_root, env=env, capture_output=True, text=True, timeout=300)


def test_the_site_builds_strict_with_the_generated_reference(tmp_path):
    res = build_site(ROOT, tmp_path / "site")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for page in ("reference/config", "reference/tables", "reference/methods", "reference/cli", "results/benchmarks"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    html = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "merge_buffer_mb" in html and "contexts_per_block" in html


def test_a_broken_link_fails_the_build(tmp_path):
    """The strict build is a check: a copy of the docs with one link to a missing page fails."""
    copy = tmp_path / "repo"
    copy.mkdir()
    (copy / "mkdocs.yml").write_text((ROOT / "mkdocs.yml").read_text())
    subprocess.run(["cp", "-r", str(ROOT / "docs"), str(copy / "docs")], check=True)
    (copy / "docs" / "hooks.py").write_text((ROOT / "docs" / "hooks.py").read_text().replace(
        "ROOT = Path(__file__).resolve().parents[1]", f"ROOT = Path({str(ROOT)!r})"))
    page = copy / "docs" / "operations.md"
    page.write_text(page.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    res = build_site(copy, tmp_path / "site")
    assert res.returncode != 0 and "no-such-page.md" in res.stdout + res.stderr


def _fields(model, seen=None):
    """(model, field name) of every field reachable from `model`."""
    seen = set() if seen is None else seen
    if model in seen:
        return []
    seen.add(model)
    out = []
    for name, f in model.model_fields.items():
        out.append((model, name, f))
        out += [x for sub, _ in reference._models_in(f.annotation) for x in _fields(sub, seen)]
    return out


def test_the_config_page_lists_every_field_with_its_default_and_description():
    page = reference.config_page()
    for model, name, f in _fields(JobSpec):
        section = page.split(f"{{#{model.__name__.lower()}}}")[1].split("\n### ")[0]
        row = next((line for line in section.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, f"{model.__name__}.{name}"
        assert reference.default_text(f).replace("|", "\\|") in row and reference.cell(f.description) in row, (name, row)
    assert "| `engine_kwargs` | mapping str → any | `{}` |" in page
    assert "| `tau_cross` | float (≥ -1, ≤ 1) | `0.5` |" in page
    assert "The same section at: `label.small_llm`, `benchmark.explainer`" in page  # LLMConfig documented once


def test_the_config_page_changes_when_a_field_is_added_to_the_schema():
    """A key added to a section appears on the page with its type, default and description:
    the page is the schema's, not a copy."""
    LLMPlus = create_model("LLMConfig", __base__=LLMConfig,
                           warmup_prompts=(int, Field(3, ge=0, description="prompts sent before timing starts")))
    JobPlus = create_model("JobSpec", __base__=JobSpec,
                           label_llm=(LLMPlus | None, Field(None, description="an extra LLM section")))
    before, after = reference.config_page(JobSpec), reference.config_page(JobPlus)
    added = [line for line in after.splitlines() if line not in before.splitlines()]
    assert "| `warmup_prompts` | int (≥ 0) | `3` | prompts sent before timing starts |" in added
    assert any(line.startswith("| `label_llm` |") and "an extra LLM section" in line for line in added)


def test_the_tables_page_lists_every_column_with_its_source_comment():
    page = reference.tables_page()
    for name, table in schema.TABLES.items():
        section = page.split(f"## {name} {{#{name}}}")[1].split("\n## ")[0]
        for field in table:
            assert f"| `{field.name}` |" in section, (name, field.name)
    assert "| `n_firing` | int64 | no | tokens with activation > 0 |" in page
    assert "| `examples` | list of [EXAMPLE](#example) | no |" in page
    assert "| `decile` | int8 | yes | 1..10 for samples: ceil(10*value/max_activation) |" in page  # a nested struct's column


def test_the_methods_page_lists_every_registered_method():
    page = reference.methods_page()
    for m in registry._METHODS:
        assert f"| `{m.shown}` |" in page, m.shown
    assert "- tier 1: " in page and "`token_freq`" in page


def test_the_cli_page_lists_every_subcommand_and_flag():
    from baez_ray import cli

    parser = cli._parser()
    page = reference.cli_page(parser)
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        assert f"## baez-ray {name} {{#{name}}}" in page, name
        for action in sub._actions:
            for opt in action.option_strings:
                assert opt in page, (name, opt)
    assert "--schema-only" in page and "check the job file only" in page


def test_the_readme_is_a_door():
    """At most 200 lines, no commit hashes, and its job file is the shipped
    jobs/label_minimal.yaml, which validates (`baez-ray validate --schema-only`)."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)
    assert hashes == []
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert block == (ROOT / "jobs" / "label_minimal.yaml").read_text()
    res = subprocess.run([sys.executable, "-m", "baez_ray.cli", "validate", "--schema-only", "jobs/label_minimal.yaml"],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "is a valid 'label' job" in res.stderr, res.stderr
