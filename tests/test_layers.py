"""Several SAEs in one table: the per-SAE limits of label, score and benchmark sampling, and
the report's layers section (shares with bootstrap CIs, score distributions, the verdict
on the layer hypothesis). Tables are written as real Parquet (rundir.write_table) and
read back, as the jobs do."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.rundir import write_table

TIER = {"input": 1, "output": 1, "cross": 2, "obscure": 3}


def routes_table(tmp_path, counts: dict[int, dict[str, int]], dead: dict[int, int] | None = None, seed: int = 0) -> pa.Table:
    """A routes table with exactly `counts[layer][kind]` live features per layer (one SAE
    per layer, rows shuffled) and `dead[layer]` features without examples, through Parquet."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer, by_kind in counts.items():
        kinds = [k for k, n in by_kind.items() for _ in range(n)] + ["obscure"] * (dead or {}).get(layer, 0)
        n_live = sum(by_kind.values())
        for f, kind in enumerate(kinds):
            live = f < n_live
            rows.append({"sae_id": f"L{layer}", "layer": layer, "feature": f, "n_examples": 10 if live else 0,
                         "c_in": float(rng.uniform(0.6, 0.9)) if kind == "input" else float(rng.uniform(0, 0.4)) if live else None,
                         "c_out": float(rng.uniform(0.6, 0.9)) if kind == "output" else float(rng.uniform(0, 0.4)) if live else None,
                         "c_cross": None if TIER[kind] == 1 or not live else float(rng.uniform(0.3, 0.5) if kind == "cross" else rng.uniform(0, 0.2)),
                         "tier": TIER[kind], "kind": kind})
    rows = [rows[i] for i in rng.permutation(len(rows))]
    write_table(schema.conform(pa.Table.from_pylist(rows), schema.ROUTES), tmp_path / "routes", rows_per_file=500)
    return pq.read_table(tmp_path / "routes")


HOLDS = {3: {"input": 300, "output": 40, "cross": 60, "obscure": 200},
         9: {"input": 80, "output": 60, "cross": 160, "obscure": 300},
         15: {"input": 50, "output": 280, "cross": 70, "obscure": 200}}
# reversed: the earliest layer has the most output features, the latest the most input
# features, and the middle layer the fewest cross/obscure ones
FAILS = {3: {"input": 50, "output": 280, "cross": 70, "obscure": 200},
         9: {"input": 250, "output": 250, "cross": 40, "obscure": 60},
         15: {"input": 300, "output": 40, "cross": 60, "obscure": 200}}


# ------------------------------------------------------------------ the layers section
def test_verdicts_hypothesis_holds(tmp_path):
    from baez_ray.report.layers import verdicts

    claims = {c["claim"]: c for c in verdicts(routes_table(tmp_path, HOLDS).to_pandas())}
    assert {k: c["verdict"] for k, c in claims.items()} == {"early": "supported", "middle": "supported", "late": "supported"}
    assert claims["early"]["point"] == pytest.approx(300 / 600)
    assert claims["middle"]["point"] == pytest.approx(460 / 600)
    assert claims["late"]["point"] == pytest.approx(280 / 600)
    assert claims["early"]["text"].startswith("input share at layer 3 (earliest): 0.50 (")
    assert claims["early"]["text"].endswith(": supported")
    assert set(claims["middle"]["compared"]) == {"layer 3", "layer 15"}


def test_verdicts_hypothesis_fails(tmp_path):
    from baez_ray.report.layers import verdicts

    got = {c["claim"]: c["verdict"] for c in verdicts(routes_table(tmp_path, FAILS).to_pandas())}
    assert got == {"early": "contradicted", "middle": "contradicted", "late": "contradicted"}


def test_overlapping_cis_are_inconclusive(tmp_path):
    from baez_ray.report.layers import verdicts

    # the same kind counts at every layer, but for a few input features more at the earliest
    same = {"input": 100, "output": 100, "cross": 100, "obscure": 100}
    got = {c["claim"]: c["verdict"] for c in verdicts(routes_table(tmp_path, {0: {**same, "input": 105}, 5: same, 10: same}).to_pandas())}
    assert got == {"early": "inconclusive", "middle": "inconclusive", "late": "inconclusive"}


def test_shares_cis_contain_the_estimate_and_match_a_resampling_bootstrap(tmp_path):
    from baez_ray.report.layers import KINDS, SHARES, layer_shares

    routes = routes_table(tmp_path, HOLDS).to_pandas()
    shares = layer_shares(routes, seed=3)
    assert shares["layer"].tolist() == [3, 9, 15]
    for _, r in shares.iterrows():
        for s in SHARES:
            assert r[f"{s}_lo"] <= r[s] <= r[f"{s}_hi"]
            assert r[f"{s}_hi"] - r[f"{s}_lo"] > 0.01
    assert shares.loc[0, "tier1"] == pytest.approx(340 / 600) and shares.loc[1, "tier2"] == pytest.approx(160 / 600)
    # the multinomial draw is the bootstrap over features: resampling layer 9's features
    # with replacement gives the same percentile interval (to Monte Carlo error)
    kinds = routes[routes["layer"] == 9]["kind"].to_numpy()
    rng = np.random.default_rng(0)
    reps = np.array([(kinds[rng.integers(0, len(kinds), len(kinds))] == "cross").mean() for _ in range(4000)])
    lo, hi = np.quantile(reps, [0.025, 0.975])
    assert shares.loc[1, "cross_lo"] == pytest.approx(lo, abs=0.01) and shares.loc[1, "cross_hi"] == pytest.approx(hi, abs=0.01)
    assert KINDS == ("input", "output", "cross", "obscure")
    # seeded: the same call gives the same intervals
    assert layer_shares(routes, seed=3).equals(shares)


def test_dead_features_are_left_out(tmp_path):
    from baez_ray.report.layers import layer_shares, score_quantiles, verdicts

    live = routes_table(tmp_path / "a", HOLDS).to_pandas()
    # 2,000 never-fired features (tier 3, obscure) at the earliest and the latest layer would
    # make the middle claim fail if they were counted
    with_dead = routes_table(tmp_path / "b", HOLDS, dead={3: 2000, 15: 2000}).to_pandas()
    a, b = layer_shares(live), layer_shares(with_dead)
    assert b["n_dead"].tolist() == [2000, 0, 2000] and b["n"].tolist() == [600, 600, 600]
    assert a.drop(columns="n_dead").equals(b.drop(columns="n_dead"))
    assert score_quantiles(live).equals(score_quantiles(with_dead))
    assert [c["verdict"] for c in verdicts(with_dead)] == ["supported"] * 3


def test_score_quantiles_per_layer(tmp_path):
    from baez_ray.report.layers import score_quantiles

    q = score_quantiles(routes_table(tmp_path, HOLDS).to_pandas())
    assert list(zip(q["layer"], q["score"]))[:3] == [(3, "C_in"), (3, "C_out"), (3, "C_cross")]
    row = q[(q["layer"] == 3) & (q["score"] == "C_cross")].iloc[0]
    assert row["n"] == 260  # cross + obscure: C_cross exists only where both tier-1 tests failed
    assert 0 <= row["q5"] <= row["q25"] <= row["q50"] <= row["q75"] <= row["q95"] <= 0.5


def test_one_layer_cannot_judge_two_layers_judge_early_and_late(tmp_path):
    from baez_ray.report.layers import verdicts, write_layers_section

    one = routes_table(tmp_path / "one", {12: HOLDS[3]}).to_pandas()
    section = write_layers_section(one, tmp_path / "report")
    assert [c["verdict"] for c in section["verdicts"]] == ["not judged"] * 3
    assert "needs ≥ 2 layers with live features (3 for the middle claim)" in section["html"]
    two = routes_table(tmp_path / "two", {3: HOLDS[3], 15: HOLDS[15]}).to_pandas()
    got = {c["claim"]: c for c in verdicts(two)}
    assert (got["early"]["verdict"], got["middle"]["verdict"], got["late"]["verdict"]) == ("supported", "not judged", "supported")
    assert "needs ≥ 3 layers" in got["middle"]["text"]


def test_routing_report_carries_the_layers_section(tmp_path):
    from baez_ray.report.routing import write_routing_report

    routes = routes_table(tmp_path, HOLDS)
    out = write_routing_report(routes, tmp_path / "report", taus={"tau_in": 0.5, "tau_out": 0.5, "tau_cross": 0.25})
    assert "<h2>Layers</h2>" in out["html"] and "The data support the layer hypothesis" in out["html"]
    assert (tmp_path / "report" / "layers.png").read_bytes()[:4] == b"\x89PNG"
    import json

    saved = json.loads((tmp_path / "report" / "layers.json").read_text())
    assert [c["verdict"] for c in saved["verdicts"]] == ["supported"] * 3 and len(saved["shares"]) == 3


# ------------------------------------------------------------------ per-SAE limits
def test_select_limits_apply_per_sae(tmp_path):
    from baez_ray.config import LabelConfig
    from baez_ray.stages.label import select

    counts = {3: {"input": 30, "output": 5, "cross": 10, "obscure": 20}, 9: {"input": 4, "output": 1, "cross": 40, "obscure": 30}}
    routes = routes_table(tmp_path, counts, dead={3: 5})
    cfg = LabelConfig.model_validate({"explainer": {"backend": "transformers", "model": "x"}, "max_per_tier": {2: 6, 3: 3}})
    chosen, keys, info = select(routes, cfg)
    per = chosen.group_by(["sae_id", "tier"]).aggregate([("feature", "count")]).to_pylist()
    got = {(r["sae_id"], r["tier"]): r["feature_count"] for r in per}
    assert got == {("L3", 1): 35, ("L3", 2): 6, ("L3", 3): 3, ("L9", 1): 5, ("L9", 2): 6, ("L9", 3): 3}
    assert info == {"skipped_few_examples": 5, "not_labelled_max_per_tier": (10 - 6) + (20 - 3) + (40 - 6) + (30 - 3)}
    # the first by feature index, whatever the order of the rows
    rows = routes.to_pandas()
    for (sae, tier), n in got.items():
        first = sorted(rows[(rows.sae_id == sae) & (rows.tier == tier) & (rows.n_examples > 0)].feature)[:n]
        assert sorted(f for s, f in keys[tier] if s == sae) == first
    assert chosen.column("sae_id").to_pylist() == sorted(chosen.column("sae_id").to_pylist())
    again = select(routes.take(np.random.default_rng(1).permutation(routes.num_rows)), cfg)
    assert again[1] == keys and again[0].equals(chosen)
    # max_features: the first N of each SAE, then the tier caps
    cfg = cfg.model_copy(update={"max_features": 20, "max_per_tier": None})
    chosen, _, _ = select(routes, cfg)
    assert chosen.group_by("sae_id").aggregate([("feature", "count")]).sort_by("sae_id").column("feature_count").to_pylist() == [20, 20]


def test_sample_per_sae():
    from baez_ray.stages.split import sample_per_sae

    ids = ["b"] * 50 + ["a"] * 30 + ["c"] * 2
    ids = [ids[i] for i in np.random.default_rng(0).permutation(len(ids))]
    got = sample_per_sae(ids, 5, seed=7)
    assert got == sorted(got) and len(set(got)) == len(got)
    assert sorted(ids[i] for i in got) == ["a"] * 5 + ["b"] * 5 + ["c"] * 2
    assert sample_per_sae(ids, 5, seed=7) == got and sample_per_sae(ids, 5, seed=8) != got
    assert sample_per_sae(ids, None, seed=7) == list(range(len(ids)))
    # one SAE: the sample drawn before limits were per SAE
    old = sorted(np.random.default_rng(7).choice(40, size=6, replace=False).tolist())
    assert sample_per_sae(["x"] * 40, 6, seed=7) == old


def test_benchmark_sampling_per_sae(ray_local, tmp_path):
    from baez_ray.stages.split import sample_and_split

    rows = []
    for sae, layer, n in (("L3", 3, 12), ("L9", 9, 20)):
        for f in range(n):
            ex = [{"kind": "top", "rank": r, "context_id": 1000 * f + r, "position": 3, "value": float(10 - r), "top_index": 1,
                   "token_strs": ["a", "b", "c"], "acts": [0.0, 1.0, 0.0]} for r in range(6 if f % 4 else 1)]
            rows.append({"sae_id": sae, "model_id": "m", "layer": layer, "feature": f, "n_tokens": 100, "n_firing": 6,
                         "max_activation": 10.0, "examples": ex})
    write_table(schema.conform(pa.Table.from_pylist(rows, schema=schema.FEATURES), schema.FEATURES), tmp_path / "features", rows_per_file=7)
    train, _, info = sample_and_split(tmp_path / "features", 4, 5, "top", 3, 3, seed=0)
    assert sorted(train.group_by("sae_id").aggregate([("feature", "count")]).to_pylist(), key=str) == \
        [{"sae_id": "L3", "feature_count": 4}, {"sae_id": "L9", "feature_count": 4}]
    assert info["eligible"] == 9 + 15 and info["sampled"] == 8
    assert all(f % 4 for f in train.column("feature").to_pylist())  # one example: not eligible
    again, _, _ = sample_and_split(tmp_path / "features", 4, 5, "top", 3, 3, seed=0)
    assert again.select(["sae_id", "feature"]).equals(train.select(["sae_id", "feature"]))


def test_label_score_sample_per_sae(ray_local, tmp_path):
    from baez_ray.config import LabelScoreConfig
    from baez_ray.stages.split import _held_out, held_out_sample

    def example(kind, rank, ctx, decile=None):
        return {"kind": kind, "rank": rank, "decile": decile, "context_id": ctx, "position": 2, "value": 1.0 + rank,
                "top_index": 1, "token_strs": ["a", "b", "c"], "acts": [0.0, 1.0, 0.0]}

    feats, labels = [], []
    for sae, layer, n in (("L3", 3, 10), ("L9", 9, 7)):
        for f in range(n):
            n_samples = 2 if f == 0 else 6  # feature 0: too few held-out examples
            ex = [example("top", r, 100 * f + r) for r in range(5)] + [example("sample", r, 100 * f + 50 + r, 10 - r) for r in range(n_samples)]
            feats.append({"sae_id": sae, "model_id": "m", "layer": layer, "feature": f, "n_tokens": 100, "n_firing": 11,
                          "max_activation": 6.0, "examples": ex})
            labels.append({"sae_id": sae, "layer": layer, "feature": f, "method": "token_freq", "label": None if f == 1 else f"w{f}",
                           "n_examples": 5, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 1})
    write_table(schema.conform(pa.Table.from_pylist(feats, schema=schema.FEATURES), schema.FEATURES), tmp_path / "features", rows_per_file=5)
    labels = schema.conform(pa.Table.from_pylist(labels), schema.LABELS)
    cfg = LabelScoreConfig(sample=3, test_examples=5, min_test_examples=5)
    keys, counts = held_out_sample(labels, tmp_path / "features", cfg.test_examples, cfg.min_test_examples, cfg.sample, seed=0)
    picked = list(zip(keys.column("sae_id").to_pylist(), keys.column("feature").to_pylist()))
    assert counts == {"labelled_features_too_few_test_examples": 2, "eligible": 8 + 5}
    assert [s for s, _ in picked] == ["L3"] * 3 + ["L9"] * 3 and picked == sorted(picked)
    assert all(f not in (0, 1) for _, f in picked)
    assert held_out_sample(labels, tmp_path / "features", cfg.test_examples, cfg.min_test_examples, cfg.sample, seed=0)[0].equals(keys)
    # the test examples, split out in the workers: 5 held-out decile samples each
    import ray

    tests = ray.data.read_parquet(str(tmp_path / "features")).map_batches(
        _held_out, batch_format="pyarrow", fn_kwargs={"keys": keys, "test_n": cfg.test_examples, "counts_only": False}).take_all()
    assert sorted((r["sae_id"], r["feature"]) for r in tests) == picked
    assert all(len(r["examples"]) == 5 and all(e["kind"] == "sample" for e in r["examples"]) for r in tests)
    everything, _ = held_out_sample(labels, tmp_path / "features", cfg.test_examples, cfg.min_test_examples, 6, seed=0)
    everything = everything.column("sae_id").to_pylist()
    assert sorted(everything) == ["L3"] * 6 + ["L9"] * 5
