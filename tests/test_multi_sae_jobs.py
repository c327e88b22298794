"""route, label and score (the label job) on a features table of two SAEs whose feature
numbers coincide (0..9 in each, each feature on its own word): every join must go by
(sae_id, feature), or a label would be made from, or scored on, the other SAE's examples."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.config import validate
from baez_ray.jobs import execute
from baez_ray.rundir import write_table
from helpers import WORDS, scorer_cfg, synthetic_features

pytestmark = pytest.mark.slow  # whole jobs (execute / the CLI with Ray): not in make test-fast

N = 10  # features per SAE (WORDS[10:] are the fake scorer's failing words)
SAES = {"syn-a": 3, "syn-b": 9}  # sae_id → layer
B_WORDS = ["mango", "nickel", "oyster", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "violet"]


def word(sae_id: str, f: int) -> str:
    return WORDS[f] if sae_id == "syn-a" else B_WORDS[f]


def two_sae_features() -> pa.Table:
    rows = []
    for sae_id, layer in SAES.items():
        for r in synthetic_features().to_pylist()[:N]:
            swap = {" " + WORDS[r["feature"]]: " " + word(sae_id, r["feature"])}
            examples = [{**e, "token_strs": [swap.get(t, t) for t in e["token_strs"]]} for e in r["examples"]]
            rows.append({**r, "sae_id": sae_id, "layer": layer, "examples": examples})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_saes")
    write_table(two_sae_features(), root / "features")
    return root / "features"


def test_label_job_on_two_saes(ray_local, scorer_server, features_dir, tmp_path):  # noqa: F811
    spec = validate({
        "job": "label", "name": "two-saes-label", "features": str(features_dir),
        "route": {"top_n": 5, "tau_in": -1.0},  # every feature to tier 1 (token_freq, no LLM)
        "label": {"explainer": scorer_cfg(scorer_server), "max_per_tier": {1: 2 * N}},
    })
    run = execute(spec, tmp_path / "run")
    labels = pq.read_table(run.dir / "labels").to_pylist()
    assert sorted((r["sae_id"], r["feature"]) for r in labels) == sorted((s, f) for s in SAES for f in range(N))
    for r in labels:
        assert r["method"] == "token_freq" and r["tier"] == 1 and r["label"] == f"input: {word(r['sae_id'], r['feature'])}", r
    # the report shows each label with its own SAE's examples
    page = (run.dir / "report" / "index.html").read_text()
    for sae_id in SAES:
        row = next(t for t in page.split("<tr>") if t.startswith(f"<td>{sae_id}</td><td>0</td>"))
        assert f"'> {word(sae_id, 0)}</mark>" in row, row
