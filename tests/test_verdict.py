"""The tier protocol put to its own test (SPEC §4, issue 25 item 4): stratified sampling
(n per tier, seeded, train and test disjoint, routed on the train examples only), the
statistics per tier and per kind within tier 1 on a hand-made score table (numbers
pinned), the routing verdict with its 'too few features' and 'too unreliable' rows and the
projection of a routed dictionary's cost, the report opening with the verdict and fitting
1,200 px in chromium, hollow bars for means over fewer than 3 features, and one whole
stratified benchmark job against a deterministic local LLM server."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.config import Price, VerdictConfig
from baez_ray.rundir import write_table

FRONTIER = "eleuther_acts_top5"
METHODS = ("token_freq", FRONTIER, "baez")
BENCHES = ("detection", "fuzz", "embedding")
TOKENS = {"token_freq": (0, 0), FRONTIER: (1000, 50), "baez": (1500, 100)}  # (input, output) per label
PRICE = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}


def tier_kind(f: int) -> tuple[int, str]:
    """Features 0-5 tier 1 input, 6-11 tier 1 output, 12-23 tier 2, 24-25 tier 3."""
    return (1, "input") if f < 6 else (1, "output") if f < 12 else (2, "cross") if f < 24 else (3, "obscure")


N_FEATURES = 26


def frontier_score(f: int) -> float:
    return 0.7 if f >= 24 else 0.6 + 0.01 * f


def score_of(method: str, bench: str, f: int) -> float | None:
    """The hand-made scores: token_freq loses 0.05 / 0.15 (even / odd features) on detection
    and gains 0.02 on fuzz against the frontier method; baez scores tier 3 only, 0.1 below
    it; the control is 0.5 everywhere."""
    e = frontier_score(f)
    if method == "random_label":
        return 0.5
    if method == "baez":
        return e - 0.1 if f >= 24 else None
    if method == "token_freq":
        return e + (0.02 if bench == "fuzz" else -0.05 if f % 2 == 0 and bench == "detection" else -0.15 if bench == "detection" else 0.0)
    return e


def halves(method: str, bench: str, f: int, v: float) -> tuple[float, float]:
    """Halves that agree (v ± 0.01: reliable), except token_freq on embedding, whose
    halves disagree by ±0.3 feature by feature (reliability 0: too unreliable)."""
    if method == "token_freq" and bench == "embedding":
        d = 0.3 if f % 2 else -0.3
        return v + d, v - d
    return v + 0.01, v - 0.01


def scores_rows() -> list[dict]:
    rows = []
    for m in METHODS + ("random_label",):
        for f in range(N_FEATURES):
            for bench in BENCHES:
                v = score_of(m, bench, f)
                if v is None:
                    continue
                a, b = halves(m, bench, f, v)
                metric = "auroc" if bench == "embedding" else "balanced_accuracy"
                rows.append({"sae_id": "s", "layer": 0, "feature": f, "method": m, "benchmark": bench, "label": f"{m} {f}",
                             "n_shown": 20, "n_failed": 0, "balanced_accuracy": v if metric != "auroc" else None,
                             "auroc": v if metric == "auroc" else None, "gap": v - 0.5, "score_half_a": a, "score_half_b": b,
                             "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    return rows


def routes_table() -> pa.Table:
    rows = [{"sae_id": "s", "layer": 0, "feature": f, "n_examples": 5, "c_in": 0.1, "c_out": 0.1, "c_cross": 0.1, "tier": tier_kind(f)[0],
             "kind": tier_kind(f)[1]} for f in range(N_FEATURES)]
    return schema.conform(pa.Table.from_pylist(rows), schema.ROUTES)


def labels_table() -> pa.Table:
    rows = [{"sae_id": "s", "layer": 0, "feature": f, "method": m, "label": f"{m} {f}", "n_examples": 5, "input_tokens": TOKENS[m][0],
             "output_tokens": TOKENS[m][1], "cost_usd": 0.0, "tries": 1} for m in METHODS for f in range(N_FEATURES)]
    return schema.conform(pa.Table.from_pylist(rows), schema.LABELS)


def bench_manifest(verdict: dict | None = None) -> dict:
    return {"job": "benchmark", "name": "verdict-run", "spec": {
        "seed": 0, "route": {"tau_in": 0.5, "tau_out": 0.5, "tau_cross": 0.5},
        "benchmark": {"methods": list(METHODS), "explainer": {"model": "m", "price": PRICE}, "train_examples": 5, "stratify": "tier",
                      "score": {"test_examples": 10}, "compare": ["token_freq", "token_freq"],
                      "verdict": {"dictionary_features": 1000, **(verdict or {})}}},
        "stages": {"stratify": {"eligible": 400, "routed": 26, "sampled": 26, "per_tier": 12, "min_examples": 15, "split": "top",
                                "stratify": "tier", "short": ["s: tier 3 has 2 of 12 (26 of the SAE's eligible features routed)"]},
                   **{f"label:{m}": {"labelled": N_FEATURES, "failed": 0} for m in METHODS},
                   "score": {"prompts": 100, "failed_prompts": 0, "rows": len(scores_rows())}}}


def make_run(d: Path, verdict: dict | None = None) -> Path:
    """A stratified benchmark run's tables, hand-made; summarise's tables and the report."""
    from baez_ray.report.benchmark import write_benchmark_report

    d.mkdir(parents=True, exist_ok=True)
    manifest = bench_manifest(verdict)
    (d / "manifest.json").write_text(json.dumps(manifest))
    write_table(routes_table(), d / "routes")
    write_table(labels_table(), d / "labels")
    write_table(schema.conform(pa.Table.from_pylist(scores_rows()), schema.SCORES), d / "scores")
    write_summaries(d, manifest)
    write_benchmark_report(d)
    return d


def write_summaries(d: Path, manifest: dict) -> None:
    """What the job's summarise writes: the pooled tables, the per-tier ones, the verdict."""
    from baez_ray.metrics import comparison_table, reliability_table
    from baez_ray.verdict import run_tables

    scores = pq.read_table(d / "scores").to_pandas()
    reliability = reliability_table(scores)
    tables = {"reliability": reliability, "comparisons": comparison_table(scores, reliability),
              **run_tables(d, manifest, scores=scores, reliability=reliability)}
    for name, df in tables.items():
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), d / f"{name}.parquet")


@pytest.fixture(scope="module")
def verdict_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("verdict") / "run")


# ------------------------------------------------------------------ stratified sampling: the bound and the seed


def test_rounds_double_up_to_the_bound():
    """A 262,144-feature SAE, n = 40 per tier, the default bound 4,096: rounds of 480, 480,
    960, 1,920 and 256 features while a tier is short; none once every tier is full."""
    from baez_ray.stages.stratify import next_round

    order = {"big": list(range(262_144))}
    routed, sizes = {}, []
    while todo := next_round(order, routed, {"big": {1: [], 2: [], 3: []}}, 40, 4096):
        sizes.append(len(todo["big"]))
        assert todo["big"][0] == routed.get("big", 0)  # the next slice of the order
        routed["big"] = routed.get("big", 0) + len(todo["big"])
    assert sizes == [480, 480, 960, 1920, 256] and routed["big"] == 4096
    full = {"big": {t: list(range(40)) for t in (1, 2, 3)}}
    assert next_round(order, {"big": 480}, full, 40, 4096) == {}
    # an SAE with fewer eligible features than the first round routes them all, once
    assert next_round({"small": [5, 3, 9]}, {}, {}, 40, 4096) == {"small": [5, 3, 9]}
    assert next_round({"small": [5, 3, 9]}, {"small": 3}, {"small": {1: [5], 2: [], 3: []}}, 40, 4096) == {}


def test_tier_sample_is_seeded_and_takes_the_first_of_each_tier():
    import pyarrow as pa

    from baez_ray.stages.stratify import choose, seeded_order

    eligible = pa.table({"sae_id": ["a"] * 30 + ["b"] * 10, "feature": pa.array(list(range(30)) + list(range(10)), pa.int64())})
    one, again, other = seeded_order(eligible, 7), seeded_order(eligible, 7), seeded_order(eligible, 8)
    assert one == again and one != other and sorted(one["a"]) == list(range(30)) and sorted(one["b"]) == list(range(10))
    tiers = {(s, f): 1 + f % 3 for s in ("a", "b") for f in range(30)}
    chosen = choose(one, tiers, 4)
    for s in ("a", "b"):
        for t in (1, 2, 3):
            want = [f for f in one[s] if 1 + f % 3 == t][:4]
            assert chosen[s][t] == want
    assert [len(chosen["b"][t]) for t in (1, 2, 3)] == [4, 3, 3]  # b has 10 features: tier 1 gets 4, the others 3


# ------------------------------------------------------------------ statistics per tier (hand-made scores)


def tables_of(run_dir: Path) -> dict:
    return {name: pq.read_table(run_dir / f"{name}.parquet").to_pandas()
            for name in ("summary_by_tier", "reliability_by_tier", "comparisons_by_tier", "verdict")}


def test_statistics_per_tier_and_kind_pinned(verdict_run):
    t = tables_of(verdict_run)
    s = t["summary_by_tier"].set_index(["stratum", "method", "benchmark"])
    assert list(dict.fromkeys(t["summary_by_tier"]["stratum"])) == ["all", "tier 1", "tier 1 input", "tier 1 output", "tier 2", "tier 3"]
    # token_freq on detection: the frontier's e_f = 0.6 + 0.01 f less 0.05 / 0.15 (even / odd f)
    for stratum, mean, n in (("tier 1 input", 0.525, 6), ("tier 1 output", 0.585, 6), ("tier 1", 0.555, 12), ("tier 2", 0.675, 12)):
        row = s.loc[(stratum, "token_freq", "detection")]
        assert row["mean"] == pytest.approx(mean) and row["n_scored"] == n
    assert s.loc[("tier 1", FRONTIER, "fuzz"), "mean"] == pytest.approx(0.655)
    assert s.loc[("tier 3", "baez", "detection"), "mean"] == pytest.approx(0.6) and s.loc[("tier 3", "baez", "detection"), "n_scored"] == 2
    assert ("tier 1", "baez", "detection") not in s.index  # baez scored tier 3 only
    # the pooled rows are summary.parquet's
    pooled = s.loc["all"].reset_index()
    assert pooled["n_features"].sum() == len(scores_rows())
    r = t["reliability_by_tier"].set_index(["stratum", "method", "benchmark"])
    assert r.loc[("tier 1 input", FRONTIER, "detection"), "reliability"] == pytest.approx(1.0)
    assert r.loc[("tier 1 input", FRONTIER, "detection"), "status"] == "reliable"
    assert r.loc[("tier 1 input", "token_freq", "embedding"), "reliability"] == 0.0  # halves disagree: r < 0, floored
    assert r.loc[("tier 1 input", "token_freq", "embedding"), "status"] == "too unreliable"
    assert r.loc[("tier 3", "baez", "detection"), "status"] == "too few features"
    c = t["comparisons_by_tier"].set_index(["stratum", "benchmark", "method_a", "method_b"])
    row = c.loc[("tier 1 input", "detection", FRONTIER, "token_freq")]
    # six features, every difference +0.05 or +0.15: only the all-minus flip reaches |Σd|: p = 2 / 2^6
    assert row["n"] == 6 and row["mean_diff"] == pytest.approx(0.1) and row["p_value"] == pytest.approx(2 / 64)
    assert c.loc[("tier 2", "fuzz", FRONTIER, "token_freq"), "mean_diff"] == pytest.approx(-0.02)
    # Holm within each stratum: the tier-1-input rows are corrected among themselves
    inside = t["comparisons_by_tier"][t["comparisons_by_tier"]["stratum"] == "tier 1 input"]
    from baez_ray.metrics import holm

    assert inside["p_holm"].tolist() == pytest.approx(holm(inside["p_value"].tolist()))


# ------------------------------------------------------------------ the routing verdict


def test_routing_verdict_rows_pinned(verdict_run):
    v = tables_of(verdict_run)["verdict"]
    manifest_rows = json.loads((verdict_run / "manifest.json").read_text()).get("verdict")  # (make_run writes tables, not the manifest)
    assert manifest_rows is None
    tier = v[v["scope"] != "routed dictionary"].set_index(["tier", "benchmark"])
    det, fuzz, emb = tier.loc[(1, "detection")], tier.loc[(1, "fuzz")], tier.loc[(1, "embedding")]
    # two rows get a verdict (tier 1 detection and fuzz): Holm over two equal p = 2 / 2^12
    assert det["status"] == fuzz["status"] == "verdict" and det["n"] == fuzz["n"] == 12
    assert det["mean_diff"] == pytest.approx(-0.1) and det["p_value"] == pytest.approx(2 / 4096) and det["p_holm"] == pytest.approx(4 / 4096)
    assert fuzz["mean_diff"] == pytest.approx(0.02) and fuzz["p_holm"] == pytest.approx(4 / 4096)
    assert det["verdict"] == f"routing loses 0.100: {FRONTIER} is better"
    assert fuzz["verdict"] == "routing gains 0.020: token_freq is better"
    # token_freq's halves disagree on embedding: no verdict, and no Holm p
    assert emb["status"] == "too unreliable" and emb["verdict"] == "benchmark too unreliable for a verdict"
    assert "token_freq: too unreliable" in emb["note"] and math.isnan(emb["p_holm"])
    # tier 2: the frontier method itself; tier 3: baez scored 2 features, a verdict needs 10
    assert tier.loc[(2, "detection"), "status"] == "same method" and tier.loc[(2, "detection"), "mean_method"] == pytest.approx(0.775)
    t3 = tier.loc[(3, "detection")]
    assert t3["status"] == "too few features" and t3["n"] == 2 and t3["note"] == "2 features scored by both; a verdict needs 10"
    # tokens and dollars per feature (input, output) × $3 / $15 per million
    assert (det["tokens_method"], det["tokens_frontier"], det["usd_method"]) == (0, 1050, 0)
    assert det["usd_frontier"] == pytest.approx(0.00375) and t3["tokens_method"] == 1600 and t3["usd_method"] == pytest.approx(0.006)
    # the projection: shares 12 / 12 / 2 of 26 routed, onto 1,000 live features; tier 3 too few: costs, no score difference
    proj = v[v["scope"] == "routed dictionary"].set_index("benchmark").loc["detection"]
    assert proj["tokens_method"] == pytest.approx(15800 / 26) and proj["tokens_frontier"] == pytest.approx(1050)
    assert proj["usd_total_method"] == pytest.approx(1000 * (12 * 0.00375 + 2 * 0.006) / 26) and proj["usd_total_frontier"] == pytest.approx(3.75)
    assert proj["status"] == "too few features" and math.isnan(proj["mean_diff"]) and "tier 3: too few features" in proj["note"]


def test_projection_from_a_label_runs_shares_and_the_bounds(verdict_run, tmp_path):
    """Shares from a label run's manifest (300 / 100 / 0): tier 3 needs no verdict, so the
    score difference is 0.75 × tier 1's; a higher min_features and a method that was not
    benchmarked leave rows without a verdict."""
    from baez_ray.metrics import reliability_table
    from baez_ray.verdict import label_costs, routing_verdict, shares_of_label_run, with_tiers

    label_run = tmp_path / "label-run"
    label_run.mkdir()
    (label_run / "manifest.json").write_text(json.dumps({"job": "label", "stages": {"route": {"tier1": 300, "tier2": 100, "tier3": 0}}}))
    shares = shares_of_label_run(label_run)
    assert shares.total == 400 and shares.share(1) == 0.75 and "label run" in shares.source
    scores = pq.read_table(verdict_run / "scores").to_pandas()
    rel = reliability_table(scores)
    routes = routes_table()
    costs = with_tiers(label_costs(labels_table(), Price(**PRICE)), routes)
    v = routing_verdict(with_tiers(scores, routes), rel, costs, VerdictConfig(), shares)
    proj = v[v["scope"] == "routed dictionary"].set_index("benchmark")
    assert proj.loc["detection", "status"] == "verdict" and proj.loc["detection", "mean_diff"] == pytest.approx(-0.075)
    lo, hi = proj.loc["detection", "ci_low"], proj.loc["detection", "ci_high"]
    assert 0.75 * -0.15 <= lo <= -0.075 <= hi <= 0.75 * -0.05
    assert proj.loc["fuzz", "mean_diff"] == pytest.approx(0.015) and proj.loc["embedding", "status"] == "too unreliable"
    assert proj.loc["detection", "tokens_method"] == pytest.approx(262.5) and proj.loc["detection", "n_dictionary"] == 400
    assert "262 LLM tokens per feature against 1,050 (75% saved), for a score loss: -0.075" in proj.loc["detection", "verdict"]
    few = routing_verdict(with_tiers(scores, routes), rel, costs, VerdictConfig(min_features=13, tier3="baez_last"), shares)
    rows = few[few["scope"] != "routed dictionary"].set_index(["tier", "benchmark"])
    assert rows.loc[(1, "detection"), "status"] == "too few features" and rows["p_holm"].isna().all()
    assert rows.loc[(3, "detection"), "status"] == "not benchmarked" and rows.loc[(3, "detection"), "note"] == "baez_last not among benchmark.methods"


def test_a_dearer_route_and_an_unpriced_run_are_said_so(verdict_run):
    """Shares all in tier 3 (baez: 1,600 tokens per feature against the frontier's 1,050):
    the projection says routing spends 52% more, not '-52% saved'; with no price set the
    table says why every dollar is $0."""
    from baez_ray.metrics import reliability_table
    from baez_ray.report.verdict import routing_verdict_section
    from baez_ray.verdict import Shares, label_costs, routing_verdict, with_tiers

    scores = pq.read_table(verdict_run / "scores").to_pandas()
    routes = with_tiers(scores, routes_table())
    costs = with_tiers(label_costs(labels_table(), Price()), routes_table())
    v = routing_verdict(routes, reliability_table(scores), costs, VerdictConfig(), Shares((0, 0, 5), "hand-made"))
    proj = v[v["scope"] == "routed dictionary"].set_index("benchmark")
    assert "1,600 LLM tokens per feature against 1,050 (52% more)" in proj.loc["detection", "verdict"]
    manifest = bench_manifest()
    manifest["spec"]["benchmark"]["explainer"]["price"] = {}
    page = " ".join(str(routing_verdict_section(v, manifest)).split())
    assert "routing spends 52% more tokens than the frontier method everywhere" in page
    assert "no price is set, so every dollar figure is $0" in page


# ------------------------------------------------------------------ the report


TABLES_THAT_MATTER = ("routingverdict", "projection", "verdict", "summary", "reliability", "tiersummary", "tiercomparisons",
                      "tierreliability")


def test_report_opens_with_the_routing_verdict_and_fits_1200_px(verdict_run):
    """In chromium at 1,200 px: the first table is the routing verdict, the page is no wider
    than the window, and no table that matters scrolls sideways in its box; baez's mean
    over 2 features is a hollow bar with its n."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert shutil.which(chromium), "Debian chromium is missing: `make chromium` installs it"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto((verdict_run / "report" / "index.html").as_uri())
        page.wait_for_load_state("load")
        first = page.eval_on_selector("table", "e => e.className")
        width = page.evaluate("document.documentElement.scrollWidth")
        boxes = page.eval_on_selector_all("div.scroll > table", "els => els.map(t => [t.className, t.parentElement.scrollWidth, "
                                                               "t.parentElement.clientWidth])")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])")
        hollow = page.locator("p.hollow").all_inner_texts()
        browser.close()
    assert first == "routingverdict" and width <= 1200
    shown = {c for c, _, _ in boxes}
    assert set(TABLES_THAT_MATTER) <= shown, set(TABLES_THAT_MATTER) - shown
    wide = [(c, sw, cw) for c, sw, cw in boxes if c in TABLES_THAT_MATTER and sw > cw]
    assert not wide, wide
    assert all(ok for _, ok in images) and ("scores_by_tier.png", True) in [tuple(i) for i in images]
    assert any("baez on detection (n = 2)" in h for h in hollow), hollow
    page_text = " ".join((verdict_run / "report" / "index.html").read_text().split())
    assert "<i>too few features for a verdict</i>: 2 features scored by both; a verdict needs 10" in page_text
    assert "<i>benchmark too unreliable for a verdict</i>: token_freq: too unreliable" in page_text
    assert "<b>routing loses 0.100: eleuther_acts_top5 is better</b>" in page_text


def test_a_mean_over_fewer_than_3_features_is_a_hollow_bar(verdict_run):
    """The chart's bars: baez (2 features per benchmark) hollow with 'n=2' written, the others
    filled; in the PNG the hollow bar's inside is the background."""
    import matplotlib.colors as mcolors

    from baez_ray.metrics import aggregate
    from baez_ray.report.benchmark import scores_figure
    from baez_ray.report.html import DPI

    summary = aggregate(pq.read_table(verdict_run / "scores").to_pandas())
    fig, hollow = scores_figure(summary)
    assert sorted(hollow) == [("baez", b, 2) for b in sorted(BENCHES)]
    ax = fig.axes[0]
    bars = [p for p in ax.patches if p.get_height() > 0]
    empty = [p for p in bars if mcolors.to_rgba(p.get_facecolor())[3] == 0]
    assert len(empty) == 3 and len(bars) == 3 + 3 * 3  # baez hollow on 3 benchmarks; 3 methods filled on 3
    assert sum(t.get_text() == "n=2" for t in ax.texts) == 3
    fig.set_dpi(DPI)
    fig.canvas.draw()
    w, h = fig.canvas.get_width_height()
    pixels = np.asarray(fig.canvas.buffer_rgba())[:, :, :3]
    assert pixels.shape[:2] == (h, w)
    for patch, want_empty in ((empty[0], True), (next(p for p in bars if p not in empty), False)):
        box = patch.get_window_extent()
        x, y = int((box.x0 + box.x1) / 2), int(h - (box.y0 + box.y1) / 2)
        inside = pixels[y, x]
        assert (inside.min() > 245) == want_empty, (patch, inside)


# ------------------------------------------------------------------ a whole stratified benchmark job

NOUNS = ("river stone glass winter paper candle silver orange garden bridge thunder pencil velvet marble harbor lantern copper "
         "meadow saddle violin basket canyon feather jungle ladder magnet nectar oyster pillow quartz rocket tunnel walnut").split()
MARKS = ("alpha", "bravo", "cobalt", "delta", "ember", "falcon", "garnet", "hazel")
PHRASE = (" once", " upon", " a", " time", " there")


def tiered_features(n: int = 24, n_top: int = 16, seed: int = 0) -> pa.Table:
    """Features 0-7 fire on 'the word is <mark>' (input windows alike: tier 1); 8-15 have a
    phrase at 4-8 tokens on both sides of their top token (cross windows alike: often tier
    2); 16-23 random nouns (often tier 3). Only the first 5 examples (the train split) carry
    the pattern; the test examples are random nouns, so routing on them would put every
    feature elsewhere."""
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n):
        examples = []
        for r in range(n_top):
            toks = [" " + NOUNS[i] for i in rng.integers(0, len(NOUNS), 24)]
            t = 12
            if r < 5 and f < 8:
                toks[t - 3: t + 1] = [" the", " word", " is", " " + MARKS[f]]
            elif r < 5 and f < 16:
                toks[t - 8: t - 3] = list(PHRASE)
                toks[t + 4: t + 9] = list(PHRASE)
            acts = [0.0] * 24
            acts[t] = float(10 - 0.3 * r)
            examples.append({"kind": "top", "rank": r, "decile": None, "context_id": 1000 * f + r, "position": t, "value": acts[t],
                             "top_index": t, "tokens": None, "token_strs": toks, "acts": acts, "residual": None})
        rows.append({"sae_id": "tiers", "model_id": "m", "layer": 3, "feature": f, "n_tokens": 100_000, "n_firing": 200,
                     "max_activation": 10.0, "examples": examples})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


@pytest.fixture(scope="module")
def stratified_run(ray_local, scorer_server, tmp_path_factory):
    """A stratified benchmark job (3 per tier) on tiered_features, eleuther_acts_top5 and
    token_freq labelled and scored by the deterministic local server (helpers.Scorer)."""
    from helpers import scorer_cfg

    from baez_ray.config import validate
    from baez_ray.jobs import execute

    root = tmp_path_factory.mktemp("strat")
    write_table(tiered_features(), root / "features")
    spec = validate({
        "job": "benchmark", "name": "strat-bench", "seed": 5, "features": str(root / "features"),
        "benchmark": {"n_features": 3, "stratify": "tier", "min_examples": 15, "methods": [FRONTIER, "token_freq"],
                      "explainer": scorer_cfg(scorer_server), "score": {"max_retries": 1, "benchmarks": ["detection", "embedding"]},
                      "verdict": {"min_features": 3}},
        "route": {"top_n": 20},
    })
    return execute(spec, root / "run").dir


@pytest.mark.slow
def test_stratified_job_samples_n_per_tier_from_routes_read_on_train_examples(stratified_run):
    from baez_ray.stages.split import identity
    from baez_ray.stages.stratify import choose, seeded_order

    d = stratified_run
    routes = pq.read_table(d / "routes")
    # every eligible feature routed (round 1 routes up to 36), each on its 5 train examples only
    # (route.top_n is 20: a route that saw the test examples would count 16)
    assert routes.num_rows == 24 and set(routes.column("n_examples").to_pylist()) == {5}
    tiers = dict(zip(routes.column("feature").to_pylist(), routes.column("tier").to_pylist()))
    assert all(tiers[f] == 1 for f in range(8))  # 'the word is <mark>' in every train example: C_in = 1
    train, test = pq.read_table(d / "train").to_pylist(), pq.read_table(d / "test").to_pylist()
    order = seeded_order(pa.table({"sae_id": ["tiers"] * 24, "feature": pa.array(range(24), pa.int64())}), 5)
    chosen = choose(order, {("tiers", f): t for f, t in tiers.items()}, 3)["tiers"]
    assert sorted(r["feature"] for r in train) == sorted(f for t in (1, 2, 3) for f in chosen[t])
    per_tier = {t: sum(tiers[r["feature"]] == t for r in train) for t in (1, 2, 3)}
    assert per_tier == {t: min(3, list(tiers.values()).count(t)) for t in (1, 2, 3)}
    for tr, te in zip(sorted(train, key=lambda r: r["feature"]), sorted(test, key=lambda r: r["feature"])):
        assert len(tr["examples"]) == 5 and len(te["examples"]) == 10
        assert not {identity(e) for e in tr["examples"]} & {identity(e) for e in te["examples"]}
    manifest = json.loads((d / "manifest.json").read_text())
    st = manifest["stages"]["stratify"]
    assert st["routed"] == 24 and st["rounds"] == 1 and st["sampled"] == len(train)
    assert [st[f"sampled_tier{t}"] for t in (1, 2, 3)] == [per_tier[t] for t in (1, 2, 3)]


@pytest.mark.slow
def test_stratified_job_writes_the_verdict_and_its_report_opens_with_it(stratified_run):
    d = stratified_run
    manifest = json.loads((d / "manifest.json").read_text())
    verdict = pq.read_table(d / "verdict.parquet").to_pandas()
    assert len(manifest["verdict"]) == len(verdict) == 3 * 2 + 2  # tiers × benchmarks + the projection per benchmark
    t1 = verdict[(verdict["tier"] == 1) & (verdict["benchmark"] == "detection")].iloc[0]
    assert t1["method"] == "token_freq" and t1["frontier"] == FRONTIER and t1["tokens_method"] == 0
    assert t1["tokens_frontier"] == 110  # the local server counts 100 + 10 tokens per label
    assert verdict[verdict["tier"] == 3]["status"].eq("not benchmarked").all()  # baez is not among the methods
    for name in ("summary_by_tier", "reliability_by_tier", "comparisons_by_tier"):
        assert "tier 1" in set(pq.read_table(d / f"{name}.parquet").column("stratum").to_pylist())
    page = (d / "report" / "index.html").read_text()
    assert page.index("<table class=routingverdict>") < page.index("<table class=verdict>") < page.index("<table class=tiersummary>")
