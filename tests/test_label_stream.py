"""A label job without routing (`label.route: false`, one method for every feature) whose
score sample streams with its labels through the real openai backend, against the
deterministic scorer of tests/helpers.py (an HTTP server on 127.0.0.1)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.config import ConfigError, validate
from helpers import WORDS, scorer_cfg, synthetic_features


def held_out_features() -> pa.Table:
    """synthetic_features with decile samples of their own: 6 held-out examples each."""
    feats = synthetic_features().to_pylist()
    for r in feats:
        r["examples"] = [{**e, "context_id": e["context_id"] + 10**6} if e["kind"] == "sample" else e for e in r["examples"]]
    return schema.conform(pa.Table.from_pylist(feats), schema.FEATURES)


def unrouted_job(features: str, scorer: dict, **score) -> dict:
    return {"job": "label", "name": "unrouted", "seed": 1, "features": features,
            "label": {"route": False, "method": "eleuther_acts_top5", "explainer": scorer, "max_retries": 1,
                      "score": {"benchmarks": ["detection", "fuzz"], "test_examples": 5, "min_test_examples": 2, "max_retries": 2, **score}}}


def test_method_without_routing_is_a_documented_key(tmp_path):
    from baez_ray.jobs import load_job

    base = unrouted_job("f", {"backend": "openai", "model": "m"})
    assert validate(base).label.single_method == "eleuther_acts_top5"
    with pytest.raises(ConfigError, match="label.route: false"):
        validate({**base, "label": {**base["label"], "route": True}})
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({**base, "label": {**base["label"], "method": "baez"}}))
    with pytest.raises(ConfigError, match="label.method.*baez needs label.av_sidecar"):
        load_job(path)
    path.write_text(json.dumps({**base, "label": {**base["label"], "method": "no_such_method"}}))
    with pytest.raises(ConfigError, match="unknown method 'no_such_method'"):
        load_job(path)


@pytest.mark.slow
def test_unrouted_label_job_scores_its_labels_as_they_come(ray_local, scorer_server, tmp_path):
    from baez_ray.jobs import execute
    from baez_ray.rundir import write_table

    write_table(held_out_features(), tmp_path / "features", rows_per_file=4)
    run = execute(validate(unrouted_job(str(tmp_path / "features"), scorer_cfg(scorer_server))), tmp_path / "run")
    d = tmp_path / "run"
    # no routing: every feature counted, none scored by an embedder, tier 0 / not_routed
    routes = pq.read_table(d / "routes").to_pylist()
    assert len(routes) == 12 and all(r["tier"] == 0 and r["kind"] == "not_routed" and r["c_in"] is None and r["c_cross"] is None
                                      and r["n_examples"] == 16 for r in routes)
    st = run.manifest["stages"]
    assert st["route"]["not_routed"] == 12 and "tier1" not in st["route"]
    labels = sorted(pq.read_table(d / "labels").to_pylist(), key=lambda r: r["feature"])
    assert [r["label"] for r in labels] == WORDS and all(r["tier"] == 0 and r["kind"] == "not_routed" for r in labels)
    assert st["label"]["by_tier"] == {"0": 12, "1": 0, "2": 0, "3": 0}
    # the labels' own scores came from the label stage's shards; the control from the score stage
    scores = pq.read_table(d / "scores").to_pandas()
    own = scores[scores["method"] == "eleuther_acts_top5"].set_index(["feature", "benchmark"])
    assert len(own) == 12 * 2 and st["score"]["streamed_rows"] == 12 * 2
    assert len(scores[scores["method"] == "random_label"]) == 12 * 2
    assert (own["n_shown"] == 15).all()
    # kappa's prompts parsed on their second try (asked again in the actor), lambda's never
    assert (own.drop(index=11, level=0)["n_failed"] == 0).all() and (own.loc[11, "n_failed"] == 15).all()
    assert (own.drop(index=[10, 11], level=0)["balanced_accuracy"] == 1.0).all() and (own.loc[10, "balanced_accuracy"] == 1.0).all()
    # 12 x 2 benchmarks x 3 prompts, own and control; kappa's 6 once more, lambda's 6 twice more (own and control)
    assert st["score"]["prompts"] == 2 * 12 * 2 * 3 and st["score"]["failed_prompts"] == 2 * 6
    sample = pq.read_table(d / "score_sample").to_pylist()
    assert sorted(r["feature"] for r in sample) == list(range(12))
    page = (d / "report" / "index.html").read_text()
    assert "Not routed" in page and "eleuther_acts_top5" in page
