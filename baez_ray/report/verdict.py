"""The benchmark report's routing verdict and its statistics per tier (baez_ray/verdict.py
computes them; summarise writes them beside the scores).

* `routing_verdict_section`: the table the benchmark report opens with: per tier, the
  method the protocol assigns against the frontier method (paired difference, CI, Holm p,
  or why there is no verdict), tokens and dollars per feature of each; then the
  projection of routing a dictionary against the frontier method everywhere;
* `tiers_section`: the statistics per stratum (tier 1, its kinds, tier 2, tier 3): a chart
  of the headline metric per method and stratum (means over fewer than 3 features hollow,
  html.draw_bars), the summary, each method against the frontier method, the split-half
  reliability.

`verdict_tables` reads summarise's tables (verdict.parquet, *_by_tier.parquet) or, for a
run written before them, computes them from the run's tables with the same seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from baez_ray.config import Price, VerdictConfig
from baez_ray.metrics import ALPHA, CHANCE, CONTROL, HEADLINE, RELIABILITY_MIN
from baez_ray.report.html import bar_legend, draw_bars, method_colors, n_col, pyplot, save_figure, section
from baez_ray.verdict import BY_TIER, STRATA, run_tables

TABLES = BY_TIER + ("verdict",)
STRATUM_NAMES = [name for name, tier, _ in STRATA if tier is not None]
CHART_STRATA = ("tier 1 input", "tier 1 output", "tier 2", "tier 3")  # disjoint: the chart's groups


def verdict_tables(run_dir: Path, manifest: dict, scores=None, reliability=None, seed: int = 0) -> dict:
    """{summary_by_tier, reliability_by_tier, comparisons_by_tier, verdict} as pandas
    frames: summarise's Parquet tables, else computed (verdict.run_tables); {} without
    routes or scores."""
    if all((run_dir / f"{name}.parquet").exists() for name in TABLES):
        return {name: pq.read_table(run_dir / f"{name}.parquet").to_pandas() for name in TABLES}
    return run_tables(run_dir, manifest, scores=scores, reliability=reliability, seed=seed)


def _records(df) -> list[dict]:
    """Rows as dicts, pandas' NaN for a missing string read back as None."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) and k in ("note", "verdict", "status") else v) for k, v in r.items()}
            for r in df.to_dict(orient="records")]


def routing_verdict_context(verdict, manifest: dict) -> dict:
    """What the routing verdict table shows: a group per tier (its methods, costs and a row
    per benchmark), the projection, the price and the bounds."""
    b = manifest["spec"]["benchmark"]
    cfg = VerdictConfig.model_validate(b.get("verdict") or {})
    price = cfg.price or Price.model_validate((b.get("explainer") or {}).get("price") or {})
    tiers = []
    for t in (1, 2, 3):
        rows = _records(verdict[verdict["scope"] == f"tier {t}"])
        if rows:
            tiers.append({k: rows[0][k] for k in ("tier", "method", "frontier", "n_tier", "tokens_method", "tokens_frontier",
                                                   "usd_method", "usd_frontier")} | {"rows": rows})
    proj = _records(verdict[verdict["scope"] == "routed dictionary"])
    projection = None
    if proj:
        p = proj[0]
        saved = 1 - p["tokens_method"] / p["tokens_frontier"] if p["tokens_frontier"] else float("nan")
        projection = {**{k: p[k] for k in p if k.startswith(("tokens", "usd", "share_", "n_dictionary", "shares_source"))},
                      "saved": saved, "rows": proj}
    return {"tiers": tiers, "projection": projection, "price": price.model_dump(), "priced_by": "benchmark.verdict.price" if cfg.price
            else "the explainer's price", "min_features": cfg.min_features, "reliability_min": RELIABILITY_MIN, "alpha": ALPHA,
            "stage": manifest.get("stages", {}).get("stratify"), "unpriced": not (price.input_per_mtok or price.output_per_mtok)}


def routing_verdict_section(verdict, manifest: dict):
    """The routing verdict's HTML (sections.html.j2 `routing_verdict`); '' without one."""
    if verdict is None or not len(verdict):
        return ""
    return section("routing_verdict", routing_verdict_context(verdict, manifest))


# ---------------------------------------------------------------- per tier

def tiers_figure(summary):
    """(figure, hollow): a panel per benchmark, the headline metric per stratum (tier 1
    input, tier 1 output, tier 2, tier 3) and method with its 95% CI, hollow where fewer
    than 3 features; `hollow` lists those as (method, 'stratum benchmark', n)."""
    plt = pyplot()
    benches = [b for b in HEADLINE if b in set(summary["benchmark"])]
    groups = [g for g in CHART_STRATA if g in set(summary["stratum"])]
    methods = [m for m in dict.fromkeys(summary["method"]) if m != CONTROL] + ([CONTROL] if CONTROL in set(summary["method"]) else [])
    colors = method_colors(methods)
    fig, axes = plt.subplots(1, len(benches), figsize=(3.4 * len(benches) + 1.6, 3.4), sharey=True, squeeze=False)
    width, hollow = 0.8 / max(1, len(methods)), []
    for ax, bench in zip(axes[0], benches):
        for j, m in enumerate(methods):
            sub = summary[(summary["method"] == m) & (summary["benchmark"] == bench)].set_index("stratum")
            col = lambda c: [float(sub[c].get(g, np.nan)) for g in groups]  # noqa: E731
            ns = [int(sub[n_col(sub)].get(g, 0)) for g in groups]
            x = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
            drawn = draw_bars(ax, x, col("mean"), col("ci_low"), col("ci_high"), ns, width, colors[m], "//" if m == CONTROL else None)
            hollow += [(m, f"{groups[i]} {bench}", ns[i]) for i in drawn]
        ax.axhline(CHANCE, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(groups)), [g.replace("tier 1 ", "tier 1\n") for g in groups], fontsize=8)
        ax.set_title(f"{bench} ({HEADLINE[bench].replace('_', ' ')})", fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("score (mean, 95% CI)")
    bar_legend(axes[0][-1], [(m, colors[m], "//" if m == CONTROL else None) for m in methods], chance=CHANCE, fontsize=7,
               loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig, hollow


def against_frontier(comparisons, frontier: str) -> list[dict]:
    """The per-stratum comparisons of each method with the frontier method (the control
    left out), as 'method − frontier' (a row stored frontier-first is flipped)."""
    rows = []
    for r in _records(comparisons[comparisons["stratum"] != "all"]):
        if frontier not in (r["method_a"], r["method_b"]) or CONTROL in (r["method_a"], r["method_b"]):
            continue
        flip = r["method_a"] == frontier
        other = r["method_b"] if flip else r["method_a"]
        d, lo, hi = (-r["mean_diff"], -r["ci_high"], -r["ci_low"]) if flip else (r["mean_diff"], r["ci_low"], r["ci_high"])
        winner = r["winner"] if isinstance(r["winner"], str) else None
        rows.append({**r, "method": other, "mean_diff": d, "ci_low": lo, "ci_high": hi, "winner": winner})
    order = {name: i for i, name in enumerate(STRATUM_NAMES)}
    return sorted(rows, key=lambda r: (order.get(r["stratum"], 99), r["benchmark"], r["method"]))


def by_method(df, value_cols: tuple[str, ...]) -> tuple[list[str], list[dict]]:
    """(benchmarks, rows): one row per (stratum, method) of a per-stratum table (pooled
    left out), each benchmark's `value_cols` in `cells`."""
    benches = [b for b in HEADLINE if b in set(df["benchmark"])]
    order = {name: i for i, name in enumerate(STRATUM_NAMES)}
    rows: dict[tuple, dict] = {}
    for r in _records(df[df["stratum"] != "all"]):
        key = (r["stratum"], r["method"])
        rows.setdefault(key, {"stratum": r["stratum"], "method": r["method"], "cells": {}})["cells"][r["benchmark"]] = \
            {c: r.get(c) for c in value_cols}
    ordered = sorted(rows.values(), key=lambda r: (order.get(r["stratum"], 99), r["method"] == CONTROL, r["method"]))
    return benches, ordered


def hollow_groups(hollow: list[tuple]) -> list[tuple[str, str]]:
    """The hollow bars (method, group, n) as (group, 'method (n = k), ...'), one per group."""
    groups: dict[str, list[str]] = {}
    for m, g, n in hollow:
        groups.setdefault(g, []).append(f"{m} (n = {n})")
    return [(g, ", ".join(ms)) for g, ms in groups.items()]


def tiers_section(tables: dict, out: Path, frontier: str):
    """The statistics per stratum (chart written into `out`); '' without them."""
    summary = tables.get("summary_by_tier")
    if summary is None or not len(summary) or not (summary["stratum"] != "all").any():
        return ""
    fig, hollow = tiers_figure(summary[summary["stratum"] != "all"])
    save_figure(fig, out / "scores_by_tier.png")
    benches, srows = by_method(summary.assign(n=summary[n_col(summary)]), ("mean", "ci_low", "ci_high", "n"))
    _, rrows = by_method(tables["reliability_by_tier"], ("reliability", "ci_low", "ci_high", "status", "n"))
    ctx = {"benches": benches, "summary": srows, "reliability": rrows, "hollow": hollow_groups(hollow), "frontier": frontier,
           "comparisons": against_frontier(tables["comparisons_by_tier"], frontier)}
    return section("tiers", ctx)
