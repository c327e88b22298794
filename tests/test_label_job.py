"""The `label` job end to end on a tiny model: collect → route → label → report."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

import pytest

from baez_ray import schema
from baez_ray.config import validate
from baez_ray.jobs import execute
from conftest import make_text

pytestmark = pytest.mark.slow  # whole jobs (execute / the CLI with Ray): not in make test-fast


def test_label_job_routes_labels_and_reports(ray_local, tiny_gemma, random_sae, tmp_path):
    (tmp_path / "c.txt").write_text(make_text(300, 11))
    spec = validate({
        "job": "label", "name": "lj",
        "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "s", "path": str(random_sae)},
        "corpus": {"paths": [str(tmp_path / "c.txt")], "context_len": 24},
        "collect": {"top_k": 6, "window": 10, "window_left": 5, "features": 4, "reservoir": 0},
        # no feature can reach tier 1 (τ = 1), every one reaches tier 2 (τ_cross = -1)
        "route": {"tau_in": 1.0, "tau_out": 1.0, "tau_cross": -1.0, "num_cpus": 0.5},
        # short answers (SmolLM2 on CPU): nothing below depends on the labels' length
        "label": {"explainer": {"backend": "transformers", "model": "pypi:smollm2-135m", "batch_size": 4, "max_tokens": 16},
                  "tier2": "np_max_act", "max_retries": 0},
    })
    run = execute(spec, tmp_path / "run")
    routes = pq.read_table(tmp_path / "run" / "routes").to_pylist()
    labels = pq.read_table(tmp_path / "run" / "labels")
    assert labels.schema.equals(schema.LABELS, check_metadata=False)
    assert len(routes) == 4 and all(r["tier"] == 2 and r["kind"] == "cross" for r in routes)
    rows = sorted(labels.to_pylist(), key=lambda r: r["feature"])
    assert [r["feature"] for r in rows] == [0, 1, 2, 3]
    assert all(r["tier"] == 2 and r["kind"] == "cross" and r["method"] == "np_max_act" for r in rows)
    assert all((r["label"] is None) == (r["error"] is not None) for r in rows)
    assert all(r["output_tokens"] <= 16 for r in rows)  # the job's max_tokens (one try each)
    st = run.manifest["stages"]["label"]
    assert st["features"] == 4 and st["by_tier"] == {"1": 0, "2": 4, "3": 0} and st["input_tokens"] > 0
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert "Routing" in page and "tiers.png" in page and "np_max_act" in page
    assert (tmp_path / "run" / "report" / "features.html").exists()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "done"
    # the labels leave the tool: one JSONL line per label, Neuronpedia explanation files that validate
    import gzip

    import jsonschema

    from baez_ray.tools.export import NEURONPEDIA_SCHEMA, export

    assert export(tmp_path / "run", "jsonl", tmp_path / "labels.jsonl")["rows"] == 4
    lines = [json.loads(x) for x in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert sorted(x["feature"] for x in lines) == [0, 1, 2, 3] and {x["model_id"] for x in lines} == {"tiny"}
    info = export(tmp_path / "run", "neuronpedia", tmp_path / "np")
    items = [json.loads(x) for f in (tmp_path / "np").rglob("batch-*.jsonl.gz") for x in gzip.open(f, "rt")]
    assert len(items) == info["explanations"] == sum(r["label"] is not None for r in rows)
    for item in items:
        jsonschema.validate(item, NEURONPEDIA_SCHEMA)
        assert item["modelId"] == "tiny" and item["layer"] == "0-s"
