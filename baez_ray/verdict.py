"""The tier protocol put to its own test (SPEC §4): the benchmark's statistics per tier and
the routing verdict.

    scores (schema.SCORES) ─┐
    routes (tier, kind) ────┴▶ with_tiers ─▶ stratified_tables: summary, reliability and
                                             comparisons per stratum (metrics.py's statistics)
    labels (tokens) ─▶ label_costs (the job's price) ─┐
    shares (routes, or a label run's manifest) ───────┴▶ routing_verdict ─▶ verdict rows

Strata: "all" (pooled: the same numbers as summary.parquet etc.), "tier 1", "tier 1 input",
"tier 1 output" (the kinds within tier 1), "tier 2", "tier 3". A feature's tier and kind are
those its route gave it (routed on its train examples). Each stratum's comparisons are
Holm-corrected within the stratum, as the pooled table is within itself.

The routing verdict has one row per tier × benchmark: the method the protocol assigns to
the tier (`benchmark.verdict.tier1/2/3`, by default the label job's token_freq,
eleuther_acts_top5, baez) against the frontier method (`verdict.frontier`, by default the
tier-2 method) on the tier's features that both scored, the same excerpts (the paired
difference assigned − frontier of the headline metric, its bootstrap 95% CI, the sign-flip
p-value, Holm-corrected across the rows that get a verdict), and the LLM tokens and dollars
per feature of each method on the tier's features (the labels' token counts, retries
included, priced with `verdict.price` or the explainer's). A row gets a verdict only when

* both methods were benchmarked (else 'not benchmarked'), and they differ (tier 2 by
  default: 'same method', its costs only);
* at least `verdict.min_features` (10) features of the tier were scored by both (else
  'too few features'): below about 8 no sign-flip p can pass Holm over the verdict's rows,
  and a mean over a handful of features says little about a tier;
* both methods are reliable on the benchmark (metrics.py: pooled split-half reliability
  ≥ RELIABILITY_MIN = 0.5 with a CI above 0; else 'too unreliable'). The pooled figure is
  the benchmark's: a tier's own reliability, over a narrower range of features and fewer
  of them, is shown in the per-tier tables, and the paired CI already carries the tier's
  noise.

A verdict reads: 'routing loses d' (the frontier method is better, Holm p < ALPHA),
'routing gains d' (the assigned method is better), or 'no significant difference' (with
the CI's low end: the most the assigned method may lose).

The projection ("routed dictionary", one row per benchmark) applies tier shares s₁, s₂,
s₃ of the live features (the benchmark's own routing, or a label run's route stage) to a
dictionary of N live features: tokens and dollars per feature of routing Σ sₜ·Cₜ(assigned)
against Σ sₜ·Cₜ(frontier), and the score difference routing buys, Σ sₜ·dₜ (dₜ the tier's mean
paired difference; 0 where the tier's method is the frontier one), with a bootstrap CI
that resamples each tier's paired differences. Its costs are shown whenever every tier
with a share has them; its score difference only when every such tier has a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from baez_ray.config import Price, VerdictConfig
from baez_ray.metrics import (
    ALPHA, HEADLINE, aggregate, boot_rows, comparison_table, holm, paired_comparison, reliability_table,
)

NAN = float("nan")
TIERS = (1, 2, 3)
STRATA = (("all", None, None), ("tier 1", 1, None), ("tier 1 input", 1, "input"), ("tier 1 output", 1, "output"),
          ("tier 2", 2, None), ("tier 3", 3, None))
N_BOOT = 2000


# ---------------------------------------------------------------- strata

def with_tiers(frame, routes):
    """A frame with (sae_id, feature) columns + the `tier` and `kind` of each feature from
    `routes` (pyarrow or pandas; a feature without a route gets tier 0 and kind None)."""
    r = routes if not hasattr(routes, "to_pandas") else routes.select(["sae_id", "feature", "tier", "kind"]).to_pandas()
    r = r[["sae_id", "feature", "tier", "kind"]].drop_duplicates(["sae_id", "feature"])
    out = frame.drop(columns=[c for c in ("tier", "kind") if c in frame.columns]).merge(r, on=["sae_id", "feature"], how="left")
    return out.assign(tier=out["tier"].fillna(0).astype(int))


def strata(frame):
    """(name, tier, kind, rows) of each stratum of `frame` (with_tiers) that has rows."""
    for name, tier, kind in STRATA:
        keep = np.ones(len(frame), bool) if tier is None else (frame["tier"] == tier).to_numpy()
        if kind is not None:
            keep = keep & (frame["kind"] == kind).to_numpy()
        if keep.any():
            yield name, tier, kind, frame[keep]


def stratified_tables(scores, seed: int = 0):
    """Scores with tiers (with_tiers) → (summary, reliability, comparisons) per stratum:
    metrics.aggregate, reliability_table and comparison_table of each stratum's rows,
    with the columns stratum, tier, kind first."""
    import pandas as pd

    out: dict[str, list] = {"summary": [], "reliability": [], "comparisons": []}
    for name, tier, kind, rows in strata(scores):
        rel = reliability_table(rows, seed=seed)
        tables = {"summary": aggregate(rows, seed=seed), "reliability": rel, "comparisons": comparison_table(rows, rel, seed=seed)}
        for key, df in tables.items():
            out[key].append(df.assign(stratum=name, tier=tier, kind=kind))
    result = []
    for key in ("summary", "reliability", "comparisons"):
        df = pd.concat(out[key], ignore_index=True) if out[key] else pd.DataFrame(columns=["stratum", "tier", "kind"])
        result.append(df[["stratum", "tier", "kind"] + [c for c in df.columns if c not in ("stratum", "tier", "kind")]])
    return tuple(result)


# ---------------------------------------------------------------- costs and shares

def label_costs(labels, price: Price, batches: bool = False):
    """Labels (schema.LABELS, pyarrow or pandas) → one row per (sae_id, feature, method):
    input and output tokens (the labels' counts, retries included), tokens (their sum) and
    usd at `price` (× its batch discount when `batches`)."""
    df = labels.to_pandas() if hasattr(labels, "to_pandas") else labels
    df = df[["sae_id", "feature", "method", "input_tokens", "output_tokens"]].copy()
    df["tokens"] = df["input_tokens"] + df["output_tokens"]
    usd = (df["input_tokens"] * price.input_per_mtok + df["output_tokens"] * price.output_per_mtok) / 1e6
    return df.assign(usd=usd * (price.batch_discount if batches else 1.0))


@dataclass(frozen=True)
class Shares:
    """Live features per tier of the dictionary the verdict projects onto, where they come
    from, and the dictionary's size (live features; default their sum)."""

    counts: tuple[int, int, int]
    source: str
    n: int | None = None

    @property
    def total(self) -> int:
        return self.n if self.n is not None else sum(self.counts)

    def share(self, tier: int) -> float:
        s = sum(self.counts)
        return self.counts[tier - 1] / s if s else NAN


def shares_of_routes(routes, source: str, n: int | None = None) -> Shares:
    """Shares of the routed features that fired (routes with tier and n_examples)."""
    tier = np.asarray(routes.column("tier").to_numpy()) if hasattr(routes, "column") else routes["tier"].to_numpy()
    fired = (np.asarray(routes.column("n_examples").to_numpy()) if hasattr(routes, "column") else routes["n_examples"].to_numpy()) > 0
    return Shares(tuple(int((tier[fired] == t).sum()) for t in TIERS), source, n)


def shares_of_label_run(path: str | Path, n: int | None = None) -> Shares:
    """Shares from a label run's manifest (`path`: the run directory or its manifest.json):
    its route stage's tier counts (features that fired)."""
    import json

    p = Path(path)
    p = p / "manifest.json" if p.is_dir() else p
    route = json.loads(p.read_text()).get("stages", {}).get("route")
    if not route or "tier1" not in route:
        raise ValueError(f"{p}: no route stage with tier counts (benchmark.verdict.shares_from wants a label run)")
    return Shares((int(route["tier1"]), int(route["tier2"]), int(route["tier3"])), f"label run {p.parent}", n)


# ---------------------------------------------------------------- the verdict

@dataclass
class Pair:
    """What one tier × benchmark comparison needs: the methods and the tier's rows."""

    tier: int
    benchmark: str
    method: str
    frontier: str


def _tier_costs(costs, tier: int, method: str) -> tuple[float, float]:
    """Mean tokens and usd per feature of `method` on the tier's features (NaN: none)."""
    rows = costs[(costs["tier"] == tier) & (costs["method"] == method)]
    return (float(rows["tokens"].mean()), float(rows["usd"].mean())) if len(rows) else (NAN, NAN)


def _pooled_status(reliability, benchmark: str, method: str) -> tuple[str, float]:
    rows = reliability[(reliability["benchmark"] == benchmark) & (reliability["method"] == method)]
    return (str(rows["status"].iloc[0]), float(rows["reliability"].iloc[0])) if len(rows) else ("no halves", NAN)


def compare_pair(p: Pair, scores, reliability, cfg: VerdictConfig, seed: int) -> tuple[dict, np.ndarray]:
    """One verdict row (before Holm) and the paired differences it rests on."""
    rows = scores[(scores["tier"] == p.tier) & (scores["benchmark"] == p.benchmark)]
    metric = HEADLINE[p.benchmark]
    wide = rows.pivot_table(index=["sae_id", "feature"], columns="method", values=metric, aggfunc="first", dropna=False)
    wide = wide.reindex(columns=list(dict.fromkeys([*wide.columns, p.method, p.frontier])))
    have = set(scores.loc[scores["benchmark"] == p.benchmark, "method"])
    out = {"scope": f"tier {p.tier}", "tier": p.tier, "benchmark": p.benchmark, "metric": metric, "method": p.method,
           "frontier": p.frontier, "n_tier": int(len(rows[["sae_id", "feature"]].drop_duplicates()))}
    rel_m, rel_f = _pooled_status(reliability, p.benchmark, p.method), _pooled_status(reliability, p.benchmark, p.frontier)
    out.update(reliability_method=rel_m[1], reliability_frontier=rel_f[1])
    empty = {"n": 0, "mean_method": NAN, "mean_frontier": NAN, "mean_diff": NAN, "ci_low": NAN, "ci_high": NAN, "p_value": NAN}
    missing = [m for m in dict.fromkeys((p.method, p.frontier)) if m not in have]
    if missing:
        return {**out, **empty, "status": "not benchmarked", "note": f"{', '.join(missing)} not among benchmark.methods"}, np.zeros(0)
    if not len(rows):
        return {**out, **empty, "status": "too few features", "note": f"no feature of tier {p.tier} was scored"}, np.zeros(0)
    if p.method == p.frontier:
        vals = wide[p.method].to_numpy(dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        return {**out, **empty, "n": int(vals.size), "mean_method": float(vals.mean()) if vals.size else NAN,
                "status": "same method", "note": ""}, np.zeros(0)
    a, b = wide[p.method].to_numpy(dtype=np.float64), wide[p.frontier].to_numpy(dtype=np.float64)
    cmp = paired_comparison(a, b, seed=seed)
    keep = np.isfinite(a) & np.isfinite(b)
    out.update(n=cmp["n"], mean_method=cmp["mean_a"], mean_frontier=cmp["mean_b"], mean_diff=cmp["mean_diff"],
               ci_low=cmp["ci_low"], ci_high=cmp["ci_high"], p_value=cmp["p_value"])
    if cmp["n"] < cfg.min_features:
        out.update(status="too few features", note=f"{cmp['n']} features scored by both; a verdict needs {cfg.min_features}")
    elif "too unreliable" in (rel_m[0], rel_f[0]):
        bad = [f"{m}: {s}" for m, (s, _) in ((p.method, rel_m), (p.frontier, rel_f)) if s != "reliable"]
        out.update(status="too unreliable", note="; ".join(bad))
    else:
        unknown = [f"{m}: reliability {s}" for m, (s, _) in ((p.method, rel_m), (p.frontier, rel_f)) if s != "reliable"]
        out.update(status="verdict", note="; ".join(unknown))
    return out, a[keep] - b[keep]


def verdict_words(row: dict, alpha: float = ALPHA) -> str:
    """The verdict of a row in words (its status's words when it has none)."""
    if row["status"] != "verdict":
        return {"not benchmarked": "not benchmarked", "same method": "the frontier method itself",
                "too few features": "too few features for a verdict", "too unreliable": "benchmark too unreliable for a verdict"
                }[row["status"]]
    d, lo = row["mean_diff"], row["ci_low"]
    if row["p_holm"] < alpha and d < 0:
        return f"routing loses {abs(d):.3f}: {row['frontier']} is better"
    if row["p_holm"] < alpha and d > 0:
        return f"routing gains {d:.3f}: {row['method']} is better"
    return f"no significant difference (routing loses at most {max(0.0, -lo):.3f})"


def tier_rows(scores, reliability, costs, cfg: VerdictConfig, seed: int = 0) -> tuple[list[dict], dict]:
    """The verdict's tier rows, Holm-corrected across the rows that get a verdict, with
    each method's tokens and usd per feature; and the paired differences per (tier,
    benchmark)."""
    frontier = cfg.frontier or cfg.tier2
    benches = [b for b in HEADLINE if b in set(scores["benchmark"])]
    rows, diffs = [], {}
    for t in TIERS:
        method = getattr(cfg, f"tier{t}")
        tok_m, usd_m = _tier_costs(costs, t, method)
        tok_f, usd_f = _tier_costs(costs, t, frontier)
        for bench in benches:
            row, d = compare_pair(Pair(t, bench, method, frontier), scores, reliability, cfg, seed)
            rows.append({**row, "tokens_method": tok_m, "tokens_frontier": tok_f, "usd_method": usd_m, "usd_frontier": usd_f})
            diffs[(t, bench)] = d
    judged = [i for i, r in enumerate(rows) if r["status"] == "verdict"]
    adjusted = holm([rows[i]["p_value"] for i in judged])
    for r in rows:
        r["p_holm"] = NAN
    for i, p in zip(judged, adjusted):
        rows[i]["p_holm"] = p
    for r in rows:
        r["verdict"] = verdict_words(r)
    return rows, diffs


def _weighted_ci(parts: list[tuple[float, np.ndarray]], seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of Σ wₜ·mean(dₜ): each tier's differences resampled on
    their own (blocks of metrics.boot_rows replicates)."""
    rng = np.random.default_rng(seed)
    total = np.zeros(N_BOOT)
    for w, d in parts:
        if w == 0 or d.size == 0:
            continue
        step = boot_rows(N_BOOT, d.size)
        total += w * np.concatenate([d[rng.integers(0, d.size, size=(min(step, N_BOOT - i), d.size))].mean(axis=1)
                                     for i in range(0, N_BOOT, step)])
    lo, hi = np.quantile(total, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def projection_rows(rows: list[dict], diffs: dict, shares: Shares, seed: int = 0) -> list[dict]:
    """One "routed dictionary" row per benchmark (the module docstring): routing's tokens
    and usd per feature and for the dictionary against the frontier method's, and the score
    difference it buys with its CI, or why there is none."""
    out = []
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        mine = {r["tier"]: r for r in rows if r["benchmark"] == bench}
        live = [t for t in TIERS if shares.share(t) > 0]
        row = {"scope": "routed dictionary", "tier": 0, "benchmark": bench, "metric": mine[1]["metric"], "method": "routing",
               "frontier": mine[1]["frontier"], "n": int(sum(mine[t]["n"] for t in TIERS)), "shares_source": shares.source,
               "n_dictionary": shares.total, **{f"share_tier{t}": shares.share(t) for t in TIERS}}
        for key in ("tokens", "usd"):
            row[f"{key}_method"] = sum(shares.share(t) * mine[t][f"{key}_method"] for t in live) if live else NAN
            row[f"{key}_frontier"] = sum(shares.share(t) * mine[t][f"{key}_frontier"] for t in live) if live else NAN
            row[f"{key}_total_method"] = row[f"{key}_method"] * shares.total
            row[f"{key}_total_frontier"] = row[f"{key}_frontier"] * shares.total
        compared = [t for t in live if mine[t]["status"] != "same method"]
        blocked = [f"tier {t}: {mine[t]['status']}" for t in compared if mine[t]["status"] != "verdict"]
        if blocked:
            row.update(mean_diff=NAN, ci_low=NAN, ci_high=NAN, status=blocked[0].split(": ", 1)[1], note="; ".join(blocked))
        else:
            d = sum(shares.share(t) * mine[t]["mean_diff"] for t in compared)
            lo, hi = _weighted_ci([(shares.share(t), diffs[(t, bench)]) for t in compared], seed) if compared else (0.0, 0.0)
            row.update(mean_diff=float(d), ci_low=lo, ci_high=hi, status="verdict", note="")
        row["verdict"] = projection_words(row)
        out.append(row)
    return out


def projection_words(row: dict) -> str:
    """The projection in words: what routing saves and the score difference it buys."""
    cost = row["tokens_method"], row["tokens_frontier"]
    if not all(math.isfinite(c) for c in cost):
        return "no projection: a tier with a share has no label costs"
    saved = 1 - cost[0] / cost[1] if cost[1] else NAN
    words = f"routing spends {cost[0]:,.0f} LLM tokens per feature against {cost[1]:,.0f}"
    if math.isfinite(saved):
        words += f" ({saved:.0%} saved)" if saved >= 0 else f" ({-saved:.0%} more)"
    if row["status"] != "verdict":
        return f"{words}; score difference: {row['status']} ({row['note']})"
    lo, hi = row["ci_low"], row["ci_high"]
    change = "no significant score difference" if lo <= 0 <= hi else ("a score loss" if hi < 0 else "a score gain")
    return f"{words}, for {change}: {row['mean_diff']:+.3f} (95% CI {lo:+.3f} – {hi:+.3f})"


VERDICT_COLUMNS = ["scope", "tier", "benchmark", "metric", "method", "frontier", "n_tier", "n", "mean_method", "mean_frontier",
                   "mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "status", "verdict", "note", "reliability_method",
                   "reliability_frontier", "tokens_method", "tokens_frontier", "usd_method", "usd_frontier", "shares_source",
                   "n_dictionary", "share_tier1", "share_tier2", "share_tier3", "tokens_total_method", "tokens_total_frontier",
                   "usd_total_method", "usd_total_frontier"]


def routing_verdict(scores, reliability, costs, cfg: VerdictConfig, shares: Shares, seed: int = 0):
    """The routing verdict table (VERDICT_COLUMNS): the tier rows (tier × benchmark) then
    the projection rows (one per benchmark). `scores` and `costs` carry tiers
    (with_tiers); `reliability` is the pooled metrics.reliability_table."""
    import pandas as pd

    rows, diffs = tier_rows(scores, reliability, costs, cfg, seed)
    return pd.DataFrame(rows + projection_rows(rows, diffs, shares, seed), columns=VERDICT_COLUMNS)


# ---------------------------------------------------------------- a run's tables

BY_TIER = ("summary_by_tier", "reliability_by_tier", "comparisons_by_tier")


def run_shares(run_dir: Path, manifest: dict, cfg: VerdictConfig, routes) -> Shares:
    """The shares the projection applies: a label run's (`cfg.shares_from`), else this
    run's routes (its routed pool with stratify: tier, else its sample), onto
    `cfg.dictionary_features` or the run's eligible features."""
    if cfg.shares_from:
        return shares_of_label_run(cfg.shares_from, cfg.dictionary_features)
    stages = manifest.get("stages", {})
    info = stages.get("stratify") or stages.get("split") or {}
    what = "routed pool" if "stratify" in stages else "sample"
    return shares_of_routes(routes, f"this benchmark's {what} ({routes.num_rows:,} routed features)",
                            cfg.dictionary_features or info.get("eligible"))


def run_tables(run_dir: Path, manifest: dict, scores=None, reliability=None, seed: int = 0) -> dict:
    """{summary_by_tier, reliability_by_tier, comparisons_by_tier, verdict} of a benchmark
    run directory (its scores/, routes/, labels/ and spec); {} without routes or scores.
    `scores` (pandas) and `reliability` (pooled): read or computed when not given."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    if not (run_dir / "routes").exists() or not (run_dir / "scores").exists():
        return {}
    b = manifest["spec"]["benchmark"]
    cfg = VerdictConfig.model_validate(b.get("verdict") or {})
    explainer = b.get("explainer") or {}
    price = cfg.price or Price.model_validate(explainer.get("price") or {})
    routes = pq.read_table(run_dir / "routes", columns=["sae_id", "feature", "tier", "kind", "n_examples"])
    scores = pq.read_table(run_dir / "scores").to_pandas() if scores is None else scores
    if not len(scores):
        return {}
    reliability = reliability_table(scores, seed=seed) if reliability is None else reliability
    scores = with_tiers(scores, routes)
    labels = pq.read_table(run_dir / "labels", columns=["sae_id", "feature", "method", "input_tokens", "output_tokens"])
    costs = with_tiers(label_costs(labels, price, explainer.get("mode") == "batches"), routes)
    out = dict(zip(BY_TIER, stratified_tables(scores, seed=seed)))
    out["verdict"] = routing_verdict(scores, reliability, costs, cfg, run_shares(run_dir, manifest, cfg, routes), seed=seed)
    return out
