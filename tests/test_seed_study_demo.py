"""The seed's study at demo scale from its committed export (jobs/seed_study_demo.yaml): one
benchmark run ingests assets/np-export-demo, samples per tier, computes the residuals its AV methods read
(Gemma 3 270M on each train example's window), verbalizes them with the self-verbalizer of
each layer and scores every method. The explainer and scorer stand in as the deterministic
local scorer (an OpenAI-compatible server), so the test costs the local models' start and
the AV; the shipped job uses SmolLM2 (docs/residuals.md has its figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from baez_ray.jobs import execute, load_job
from helpers import scorer_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_seed_study_demo_runs_from_its_export(ray_local, scorer_server, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the job's paths (export, sidecars) are relative to the repository
    spec = load_job(ROOT / "jobs" / "seed_study_demo.yaml", [
        "benchmark.n_features=2", f"benchmark.explainer={json.dumps(scorer_cfg(scorer_server))}", "benchmark.av.num_cpus=1",
        "model.num_cpus=1"])
    run = execute(spec, tmp_path / "run")
    st = run.manifest["stages"]
    assert st["ingest"]["rejected"] == 0 and st["ingest"]["features_written"] > 0
    train = pq.read_table(tmp_path / "run" / "train", columns=["sae_id", "feature"])
    n = train.num_rows  # stratify: tier, 2 per tier and SAE where the tier has them
    res = st["residuals"]
    assert res["features"] == n and res["refused"] == 0 and res["from_window"] == res["mapped"] == res["rows"] == 5 * n
    labels = pq.read_table(tmp_path / "run" / "labels" / "baez.parquet").to_pylist()
    assert len(labels) == n and {r["layer"] for r in labels} == {3, 12, 16}
    # every example has its vector (0 refused, 0 without one) and every feature its AV
    # explanations: the self-verbalizer never stops on its first token (its stop is "\n",
    # which greedy decoding wrote first for a feature firing on blank lines)
    assert not [r for r in labels if (r["error"] or "").startswith("no AV explanation")]
    assert all(r["n_examples"] == len(r["evidence"]) >= 1 and r["label"] for r in labels)
    scores = pq.read_table(tmp_path / "run" / "scores", columns=["method", "benchmark"]).to_pylist()
    assert {(s["method"], s["benchmark"]) for s in scores} >= {(m, b) for m in ("baez", "baez_last", "eleuther_acts_top5", "token_freq",
                                                                               "random_label") for b in ("detection", "fuzz", "embedding")}
    tiers = pq.read_table(tmp_path / "run" / "routes", columns=["tier"]).column("tier").to_pylist()
    assert set(tiers) == {1, 2, 3}, tiers
    page = (tmp_path / "run" / "report" / "index.html").read_text()
    assert page.index("<table") == page.index("<table class=routingverdict>")  # the report opens with the routing verdict
    verdict = pq.read_table(tmp_path / "run" / "verdict.parquet").to_pylist()
    assert {r["tier"] for r in verdict} >= {1, 2, 3}, verdict
