"""The newcomer's commands: `baez-ray --version`, `new` (a job file that validates),
`methods` (the registry listed), `export` (labels out as JSONL, CSV and Neuronpedia
explanation files that validate against the schema of Neuronpedia's exports)."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.cli import main
from baez_ray.methods.registry import methods as registered
from baez_ray.methods.registry import register
from baez_ray.tools.export import NEURONPEDIA_SCHEMA

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "baez_ray.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_version_prints_the_package_version():
    from importlib.metadata import version

    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"baez-ray {version('baez_ray')}"


@pytest.mark.parametrize("kind, sae", [
    ("label", ["--sae-release", "gemma-scope-2b-pt-res-canonical", "--sae-id", "layer_12/width_16k/canonical"]),
    ("benchmark", ["--sae-path", "assets/sae/gemma-3-270m-l12-res-4k", "--explainer", "openai:http://127.0.0.1:8000/v1"]),
    ("collect", ["--sae-release", "gemma-scope-2-27b-it-res-all", "--sae-id", "blocks.41.hook_resid_post", "--corpus", "data/*.txt"]),
])
def test_new_writes_a_job_file_that_validates(kind, sae, tmp_path):
    out = tmp_path / "job.yaml"
    assert main(["new", kind, "--model", "google/gemma-2-2b", *sae, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# A baez-ray job file") and "# your text" in text
    res = cli("validate", "--schema-only", str(out))
    assert res.returncode == 0, res.stderr
    assert f"is a valid '{kind}' job" in res.stderr
    layer = 41 if kind == "collect" else 12
    assert f"layer: {layer}" in text


def test_new_refuses_what_it_cannot_write(tmp_path, capsys):
    out = tmp_path / "job.yaml"
    out.write_text("mine\n")
    assert main(["new", "label", "--model", "m", "--sae-path", "s-l3-x", "-o", str(out)]) == 2
    assert out.read_text() == "mine\n" and "exists" in capsys.readouterr().err
    assert main(["new", "label", "--model", "m", "--sae-path", "weights", "-o", str(tmp_path / "a.yaml")]) == 2
    assert "give --layer N" in capsys.readouterr().err
    assert main(["new", "label", "--model", "m", "--sae-path", "w", "--layer", "3", "--explainer", "bard:x", "-o", str(tmp_path / "b.yaml")]) == 2
    assert "--explainer 'bard:x'" in capsys.readouterr().err and not (tmp_path / "b.yaml").exists()


def test_methods_lists_every_registered_method():
    res = cli("methods")
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["method", "tiers", "needs"]
    for m in registered():
        row = next(line for line in lines if line.split()[0] == m.shown)
        assert m.description and m.description in row


def test_the_registry_refuses_a_name_it_already_answers_to():
    with pytest.raises(ValueError, match="overlaps the registered method 'eleuther_acts_topK'"):
        register("eleuther_acts_top7", tiers=(2,))(lambda f, c: None)
    with pytest.raises(ValueError, match="overlaps the registered method 'token_freq'"):
        register("token_freq", tiers=(1,))(lambda f, c: None)
    with pytest.raises(ValueError, match="unknown needs"):
        register("brand_new", tiers=(1,), needs=("gpu",))(lambda f, c: None)
    assert "brand_new" not in [m.shown for m in registered()]


def _run_dir(tmp_path: Path) -> Path:
    """A finished label run's tables, as the label job writes them: two SAEs (one
    collected, one ingested from Neuronpedia), a failed row, scores with the control."""
    run = tmp_path / "run"
    lab = [
        {"sae_id": "12-res-4k", "layer": 12, "feature": 3, "method": "token_freq", "label": "input: cat / cats", "tier": 1, "kind": "input"},
        {"sae_id": "12-res-4k", "layer": 12, "feature": 5, "method": "eleuther_acts_top5", "label": "names of \"rivers\"", "tier": 2,
         "kind": "cross", "backend": "openai", "model": "m1", "input_tokens": 300, "output_tokens": 12, "cost_usd": 0.001, "tries": 1},
        {"sae_id": "12-res-4k", "layer": 12, "feature": 7, "method": "eleuther_acts_top5", "label": None, "tier": 2, "kind": "cross",
         "tries": 3, "error": "unparsed answer"},
        {"sae_id": "gemma-3-27b-it/41-gemmascope-2-res-262k", "layer": 41, "feature": 262143, "method": "baez", "label": "legal text",
         "tier": 3, "kind": "obscure", "model": "claude-sonnet-4-5"},
    ]
    base = {"n_examples": 5, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 1}
    (run / "labels").mkdir(parents=True)
    full = [{c: {**base, **r}.get(c) for c in schema.LABELS.names} for r in lab]
    pq.write_table(pa.Table.from_pylist(full, schema=schema.LABELS), run / "labels" / "part-00000.parquet")
    sc = [{"sae_id": "12-res-4k", "layer": 12, "feature": 5, "method": m, "benchmark": b, "n_shown": 20, "n_failed": 0,
           "balanced_accuracy": v, "auroc": v, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
          for m, b, v in (("eleuther_acts_top5", "detection", 0.8), ("eleuther_acts_top5", "embedding", 0.7), ("random_label", "detection", 0.5))]
    (run / "scores").mkdir()
    sc = [{c: r.get(c) for c in schema.SCORES.names} for r in sc]
    pq.write_table(pa.Table.from_pylist(sc, schema=schema.SCORES), run / "scores" / "part-00000.parquet")
    feats = [{"sae_id": s, "model_id": m, "layer": ly, "feature": f, "n_tokens": 0, "n_firing": 0, "max_activation": 1.0, "examples": []}
             for s, m, ly, f in (("12-res-4k", "gemma-3-270m", 12, 3), ("gemma-3-27b-it/41-gemmascope-2-res-262k", "gemma-3-27b-it", 41, 262143))]
    (run / "features").mkdir()
    pq.write_table(schema.conform(pa.Table.from_pylist(feats, schema=schema.FEATURES), schema.FEATURES), run / "features" / "part-00000.parquet")
    return run


def test_export_writes_one_line_per_label_with_its_scores(tmp_path):
    run = _run_dir(tmp_path)
    assert main(["export", str(run), "--format", "jsonl", "-o", str(tmp_path / "l.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    by = {(r["sae_id"], r["feature"]): r for r in rows}
    r = by[("12-res-4k", 5)]
    assert r["label"] == 'names of "rivers"' and r["tier"] == 2 and r["kind"] == "cross" and r["model_id"] == "gemma-3-270m"
    assert r["score_detection"] == 0.8 and r["score_embedding"] == 0.7 and r["n_shown_detection"] == 20
    assert by[("12-res-4k", 7)]["label"] is None and by[("12-res-4k", 7)]["error"] == "unparsed answer"
    assert main(["export", str(run), "--format", "csv", "-o", str(tmp_path / "l.csv")]) == 0
    table = list(csv.DictReader((tmp_path / "l.csv").open(encoding="utf-8")))
    assert len(table) == 4 and {t["label"] for t in table} >= {"input: cat / cats", 'names of "rivers"', "legal text"}


def test_export_to_neuronpedia_writes_explanation_batches_that_validate(tmp_path):
    run = _run_dir(tmp_path)
    assert main(["export", str(run), "--format", "neuronpedia", "--author-id", "me", "-o", str(tmp_path / "np")]) == 0
    files = sorted((tmp_path / "np").rglob("batch-*.jsonl.gz"))
    assert sorted(f.relative_to(tmp_path / "np").parts[:3] for f in files) == [
        ("gemma-3-270m", "12-res-4k", "explanations"), ("gemma-3-27b-it", "41-gemmascope-2-res-262k", "explanations")]
    items = [json.loads(line) for f in files for line in gzip.open(f, "rt", encoding="utf-8")]
    for item in items:
        jsonschema.validate(item, NEURONPEDIA_SCHEMA)
    assert sorted(i["index"] for i in items) == ["262143", "3", "5"]  # the failed row has no explanation
    five = next(i for i in items if i["index"] == "5")
    assert five["typeName"] == "baez-ray-eleuther_acts_top5" and five["authorId"] == "me" and five["explanationModelName"] == "m1"
    assert json.loads(five["notes"])["score_detection"] == 0.8


def test_export_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["export", str(tmp_path), "-o", str(tmp_path / "x.jsonl")]) == 2
    assert "no labels/ table" in capsys.readouterr().err
