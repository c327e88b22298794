"""Tier routing (SPEC §4): the correlation identity, windows, the route stage on Ray Data
with the real all-MiniLM-L6-v2, the token_freq labeller and the report pieces."""

from __future__ import annotations

import hashlib
import json
import math
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from baez_ray import schema
from baez_ray.models.embedder import correlation, default_model_path, grouped_correlation, pairwise_mean
from baez_ray.methods.token_freq import TokenFreqConfig, normalise, token_freq_labels
from baez_ray.stages.route import RouteConfig, assign_tiers, route, route_batch
from baez_ray.models.windows import TopExamples, bounds, join_tokens, window_text

T = 12  # top_index of the synthetic examples
L = 24  # tokens per synthetic example


# ------------------------------------------------------------------ the identity
@pytest.mark.parametrize("n", [2, 3, 7, 20])
def test_identity_equals_pairwise_mean(n):
    rng = np.random.default_rng(n)
    U = rng.normal(size=(n, 32)) * rng.uniform(0.5, 3, size=(n, 1))  # not unit: normalised inside
    U[:, 0] += 1.5  # some positive correlation
    assert correlation(U) == pytest.approx(pairwise_mean(U), abs=1e-12)
    w = rng.uniform(0.1, 5.0, size=n)
    assert correlation(U, w) == pytest.approx(pairwise_mean(U, w), abs=1e-12)
    # equal weights give the unweighted score; zero weights drop vectors
    assert correlation(U, np.full(n, 2.5)) == pytest.approx(correlation(U), abs=1e-12)
    if n > 3:
        w0 = w.copy()
        w0[:2] = 0
        assert correlation(U, w0) == pytest.approx(correlation(U[2:], w[2:]), abs=1e-12)


def test_edge_cases_n_below_2_and_n_2():
    rng = np.random.default_rng(0)
    assert math.isnan(correlation(np.zeros((0, 8))))
    assert math.isnan(correlation(rng.normal(size=(1, 8))))
    assert math.isnan(correlation(rng.normal(size=(1, 8)), [3.0]))
    u, v = rng.normal(size=8), rng.normal(size=8)
    cos = float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    assert correlation(np.stack([u, v])) == pytest.approx(cos, abs=1e-12)
    assert correlation(np.stack([u, v]), [0.2, 7.0]) == pytest.approx(cos, abs=1e-12)  # one pair: weights cancel
    assert correlation(np.stack([u, u])) == pytest.approx(1.0)
    assert correlation(np.stack([u, -u])) == pytest.approx(-1.0)
    # weights with a single positive entry leave no pair
    assert math.isnan(correlation(np.stack([u, v, u]), [0.0, 1.0, 0.0]))
    with pytest.raises(ValueError):
        correlation(np.stack([u, v]), [1.0, -1.0])


def test_grouped_correlation_matches_per_group():
    rng = np.random.default_rng(1)
    sizes = [0, 1, 2, 5, 0, 20, 3]
    U = rng.normal(size=(sum(sizes), 16))
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    w = rng.uniform(0.5, 2, size=len(U))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for weights in (None, w):
        got = grouped_correlation(U, offsets, weights)
        for g, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            want = correlation(U[a:b], None if weights is None else weights[a:b])
            if math.isnan(want):
                assert math.isnan(got[g])
            else:
                assert got[g] == pytest.approx(want, abs=1e-10)


# ------------------------------------------------------------------ windows
def test_window_clipping():
    toks = [" a", " b", " c", " d", " e"]
    assert bounds(5, 0, (-3, 0)) == (0, 1)  # clipped at the start
    assert bounds(5, 4, (1, 3)) == (5, 5)  # nothing after the last token: empty
    assert bounds(5, 3, (1, 3)) == (4, 5)  # clipped at the end
    assert bounds(5, 2, (-8, 8)) == (0, 5)
    assert window_text(toks, 0, (-3, 0)) == "a"
    assert window_text(toks, 2, (-3, 0)) == "a b c"
    assert window_text(toks, 3, (1, 3)) == "e"
    assert window_text(toks, 4, (1, 3)) == ""
    assert window_text(toks, 2, (-1, 1)) == "b c d"
    # raw vocabulary pieces and special tokens
    assert join_tokens(["<bos>", "▁New", "▁York"]) == "New York"
    assert join_tokens(["ĠHello", "Ġworld", "Ċ", "<|endoftext|>"]) == "Hello world"


# ------------------------------------------------------------------ synthetic features
def rare_words() -> list[str]:
    """Whole words of the MiniLM vocabulary (20k): random text from them has no theme."""
    text = open(default_model_path() + "/vocab.txt", encoding="utf-8").read()
    return [w for w in text.split() if w.isalpha() and w.isascii() and len(w) > 3]


CONTEXT = ["the", "a", "big", "old", "near", "of", "that", "this", "active", "quiet", "huge", "distant"]


def example(toks: list[str], rank: int, top: int = T, kind: str = "top") -> dict:
    acts = [0.0] * len(toks)
    acts[top] = 5.0 - 0.1 * rank
    return {"kind": kind, "rank": rank, "value": acts[top], "top_index": top, "token_strs": toks, "acts": acts}


def feature_row(feature: int, examples: list[dict], layer: int = 3, **extra) -> dict:
    return {
        "sae_id": "demo/3-res", "model_id": "demo", "layer": layer, "feature": feature, "n_tokens": 1000,
        "n_firing": 50, "max_activation": 5.0, "examples": examples, **extra,
    }


def synthetic_features(words: list[str], seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    rand = lambda n: [" " + rng.choice(words) for _ in range(n)]  # noqa: E731
    feats = []
    # 0: every example's top token is " volcano", after a few plain words: tier 1 / input
    exs = []
    for r in range(20):
        toks = rand(L)
        toks[T - 3 : T] = [" " + rng.choice(CONTEXT) for _ in range(3)]
        toks[T] = " volcano"
        exs.append(example(toks, r))
    exs += [example(rand(L), r, kind="sample") for r in range(5)]  # decile samples: not used
    feats.append(feature_row(0, exs))
    # 1: the three tokens after the top token are " Statue of Liberty": tier 1 / output
    exs = []
    for r in range(20):
        toks = rand(L)
        toks[T + 1 : T + 4] = [" Statue", " of", " Liberty"]
        exs.append(example(toks, r))
    feats.append(feature_row(1, exs, pos_tokens=[" statue", "Statue", " Liberty", " monument"], pos_values=[3.0, 2.5, 2.0, 1.0]))
    # 2: random text: tier 3 / obscure
    feats.append(feature_row(2, [example(rand(L), r) for r in range(20)]))
    # 3: random text, every example ends at its top token (no output window), 30 examples
    # of which only the top 20 count; another layer
    feats.append(feature_row(3, [example(rand(T + 1), r) for r in range(30)], layer=5))
    # 4: one example only: no pair, every score undefined
    feats.append(feature_row(4, [example(rand(L), 0)]))
    return pa.Table.from_pylist(feats, schema=schema.FEATURES)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    table = synthetic_features(rare_words())
    d = tmp_path_factory.mktemp("features")
    pq.write_table(table.slice(0, 3), d / "part-00000.parquet")
    pq.write_table(table.slice(3), d / "part-00001.parquet")
    return table, d


@pytest.fixture(scope="module")
def routed(ray_local, features, tmp_path_factory):
    table, d = features
    out = tmp_path_factory.mktemp("routes")
    info = route(d, out, RouteConfig(batch_size=2, encode_batch_size=64))
    routes = pq.read_table(out)
    return info, routes.sort_by("feature")


def test_route_stage_tiers(routed):
    info, routes = routed
    assert routes.schema.equals(schema.ROUTES, check_metadata=False)
    rows = {r["feature"]: r for r in routes.to_pylist()}
    assert sorted(rows) == [0, 1, 2, 3, 4]
    assert (rows[0]["tier"], rows[0]["kind"]) == (1, "input"), rows[0]
    assert (rows[1]["tier"], rows[1]["kind"]) == (1, "output"), rows[1]
    assert (rows[2]["tier"], rows[2]["kind"]) == (3, "obscure"), rows[2]
    assert rows[0]["c_in"] >= 0.5 and rows[1]["c_out"] >= 0.5
    assert rows[1]["c_out"] == pytest.approx(1.0, abs=1e-5)  # identical output windows
    assert rows[2]["c_in"] < 0.5 and rows[2]["c_out"] < 0.5 and rows[2]["c_cross"] < 0.5
    # cross score only when both tier-1 tests fail
    assert rows[0]["c_cross"] is None and rows[1]["c_cross"] is None
    assert rows[2]["c_cross"] is not None
    # top examples only, at most top_n
    assert [rows[f]["n_examples"] for f in range(5)] == [20, 20, 20, 20, 1]
    # no output window at all → C_out undefined (null), routed on the other scores
    assert rows[3]["c_out"] is None and rows[3]["c_in"] is not None and rows[3]["tier"] == 3
    # a single example: nothing defined, tier 3
    assert rows[4]["c_in"] is None and rows[4]["c_out"] is None and rows[4]["c_cross"] is None
    assert rows[4]["tier"] == 3
    assert info["features"] == 5 and info["tier1"] == 2 and info["tier3"] == 3


def test_token_freq_labels(features, routed):
    table, _ = features
    _, routes = routed
    labels = token_freq_labels(table, routes)
    assert labels.schema.equals(schema.LABELS, check_metadata=False)
    rows = {r["feature"]: r for r in labels.to_pylist()}
    assert sorted(rows) == [0, 1]  # tier 1 only
    assert rows[0]["label"] == "input: volcano"
    assert rows[1]["label"] == "output: statue / of / liberty; logits: statue / liberty / monument"
    for r in rows.values():
        assert (r["method"], r["prompt_version"], r["cost_usd"], r["input_tokens"], r["tier"]) == ("token_freq", "none", 0.0, 0, 1)
        assert r["n_examples"] == 20 and r["error"] is None
    assert rows[0]["evidence"] == ["volcano"] and rows[0]["evidence_scores"] == [20]
    assert json.loads(rows[1]["raw"])["counts"] == {"statue": 20, "of": 20, "liberty": 20}


def test_token_freq_alternatives_and_normalisation():
    toks = lambda top: [" x"] * 3 + [top] + [" y"] * 3  # noqa: E731
    tops = ["▁The"] * 8 + ["Ġa", " A", " a"] * 2 + [" an"] * 4 + ["\n"]  # the 8, a 6, an 4, newline 1
    feats = pa.Table.from_pylist([feature_row(9, [example(toks(t), r, top=3) for r, t in enumerate(tops)])], schema=schema.FEATURES)
    routes = pa.table({"sae_id": ["demo/3-res"], "layer": pa.array([3], pa.int32()), "feature": [9], "tier": pa.array([1], pa.int8()), "kind": ["input"]})
    row = token_freq_labels(feats, routes).to_pylist()[0]
    assert row["label"] == "input: the / a / an"  # stops at 3 tokens, 18/19 covered
    assert row["evidence_scores"][:3] == [8, 6, 4]
    assert normalise("\n") == "\\n" and normalise("  ") == "<space>" and normalise("<bos>") == "" and normalise("ĠHello") == "hello"
    # one dominant token: the label stops once 80% of the examples are covered
    feats = pa.Table.from_pylist([feature_row(9, [example(toks(t), r, top=3) for r, t in enumerate([" the"] * 17 + [" a"] * 3)])], schema=schema.FEATURES)
    assert token_freq_labels(feats, routes).column("label").to_pylist() == ["input: the"]
    assert TokenFreqConfig().max_tokens == 3


# ------------------------------------------------------------------ batch logic without Ray
def test_token_freq_method_counts_over_route_top_n(ray_local, tmp_path):
    """The registered token_freq reads the job's route.top_n (and output window): with the
    top 6 examples it sees only "alpha"; with all 12 it sees "beta" too."""
    from baez_ray import methods
    from baez_ray.config import RouteConfig
    from baez_ray.rundir import write_table

    toks = lambda top: [" x"] * 3 + [top] + [" y"] * 3  # noqa: E731
    tops = [" alpha"] * 6 + [" beta"] * 6
    feats = pa.Table.from_pylist([feature_row(9, [example(toks(w), r, top=3) for r, w in enumerate(tops)])], schema=schema.FEATURES)
    write_table(pa.table({"sae_id": ["demo/3-res"], "layer": pa.array([3], pa.int32()), "feature": [9], "tier": pa.array([1], pa.int8()),
                          "kind": ["input"]}), tmp_path / "routes")
    got = {}
    for n in (6, 12):
        ctx = methods.LabelContext(name="token_freq", route=RouteConfig(top_n=n), routes_dir=tmp_path / "routes")
        row = methods.label("token_freq", ray_local.data.from_arrow(feats), ctx).to_pylist()[0]
        got[n] = (row["label"], row["n_examples"])
    assert got == {6: ("input: alpha", 6), 12: ("input: alpha / beta", 12)}


def fake_encode(calls: list):
    """Deterministic pseudo-embeddings (identical texts → identical vectors), recording calls."""

    def encode(texts):
        calls.append(list(texts))
        out = np.stack([np.random.default_rng(int(hashlib.md5(t.encode()).hexdigest()[:8], 16)).normal(size=16) for t in texts]) if texts else np.zeros((0, 16))
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32) if len(texts) else out

    return encode


def test_route_batch_one_encode_per_phase_dedup_and_slices(features):
    table, _ = features
    calls: list = []
    cfg = RouteConfig()
    full = route_batch(table, cfg, fake_encode(calls))
    # phase 1 (input + output windows of all features) and phase 2 (cross windows of the
    # features that failed both tests): two calls, each with distinct texts only
    assert len(calls) == 2
    assert all(len(c) == len(set(c)) for c in calls)
    assert "Statue of Liberty" in calls[0]
    # a sliced batch (Ray hands out zero-copy slices) routes the same
    parts = [route_batch(table.slice(i, 2), cfg, fake_encode([])) for i in range(0, table.num_rows, 2)]
    assert pa.concat_tables(parts).equals(full)
    # weighted: still the same tiers on these clear cases; scores defined where unweighted are
    w = route_batch(table, RouteConfig(weighted=True), fake_encode([]))
    assert w.column("tier").to_pylist() == full.column("tier").to_pylist()


def test_top_examples_selection(features):
    table, _ = features
    ex = TopExamples(table, top_n=20)
    assert list(ex.n_examples) == [20, 20, 20, 20, 1]
    rows = ex.rows_of(3)
    assert [int(ex.value[e] * 10 + 0.5) for e in rows][:3] == [50, 49, 48]  # rank order


def test_assign_tiers_per_score_thresholds():
    cfg = RouteConfig(tau_in=0.6, tau_out=0.4, tau_cross=0.3)
    nan = float("nan")
    c_in = np.array([0.65, 0.5, 0.7, 0.1, 0.1, nan])
    c_out = np.array([0.1, 0.45, 0.55, 0.1, 0.1, nan])
    c_cross = np.array([nan, nan, nan, 0.35, 0.2, nan])
    tier, kind = assign_tiers(c_in, c_out, c_cross, cfg)
    assert tier.tolist() == [1, 1, 1, 2, 3, 3]
    # row 2 passes both: the larger margin (0.15 output vs 0.10 input) names the kind
    assert kind == ["input", "output", "output", "cross", "obscure", "obscure"]


def test_route_config():
    cfg = RouteConfig.model_validate({"windows": {"input": [-2, 0]}, "tau_cross": 0.4})
    assert cfg.windows.input == (-2, 0) and cfg.windows.output == (1, 3) and cfg.windows.cross == (-8, 8)
    assert (cfg.tau_in, cfg.tau_out, cfg.top_n, cfg.weighted) == (0.5, 0.5, 20, False)
    with pytest.raises(ValidationError, match="extra"):
        RouteConfig.model_validate({"tau": 0.5})
    with pytest.raises(ValidationError, match="start must not be after end"):
        RouteConfig.model_validate({"windows": {"output": [3, 1]}})


# ------------------------------------------------------------------ report pieces
def test_routing_report(routed, tmp_path):
    from baez_ray.report.routing import eleuther_tokens_per_feature, tier_shares, tokens_saved, write_routing_report

    _, routes = routed
    shares = tier_shares(routes)
    assert list(shares["layer"]) == [3, 5] and list(shares["n"]) == [4, 1]
    row3 = shares[shares.layer == 3].iloc[0]
    assert (row3["tier1"], row3["input"], row3["output"], row3["obscure"]) == (0.5, 0.25, 0.25, 0.5)
    overall = tier_shares(routes, None).iloc[0]
    assert overall["n"] == 5 and overall["tier1"] == pytest.approx(0.4)
    est = eleuther_tokens_per_feature(k=20, example_chars=150, answer_tokens=60, fixed_chars=2000)
    assert est["input_tokens"] == pytest.approx((2000 + 20 * (len("Example 10: ") + 150)) / 4)
    saved = tokens_saved(routes, 1000.0)
    assert (saved["baseline_tokens"], saved["routed_tokens"], saved["saved_tokens"]) == (5000.0, 0.0, 5000.0)  # no tier 2 here
    saved = tokens_saved(routes, {"input_tokens": 900, "output_tokens": 100}, tier3_tokens_per_feature=50, price={"input_per_mtok": 3, "output_per_mtok": 15})
    assert saved["routed_tokens"] == 150 and saved["saved_share"] == pytest.approx(4850 / 5000)
    assert saved["baseline_usd"] == pytest.approx(5 * (900 * 3 + 100 * 15) / 1e6)
    summary = write_routing_report(routes, tmp_path / "report", taus={"tau_in": 0.5, "tau_out": 0.5, "tau_cross": 0.5})
    for name in ("scores.png", "tiers.png", "routing.json"):
        assert (tmp_path / "report" / name).stat().st_size > 1000 or name == "routing.json"
    assert (tmp_path / "report" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["tokens"]["features"] == 5 and "<img" in summary["html"]
