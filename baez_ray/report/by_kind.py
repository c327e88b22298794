"""Results by kind (SPEC §3, §4): per kind of feature (the route stage's input / output /
cross / obscure) and per method, the input-side and the output-side scores side by side,
and which side each kind's labels pass: the seed's classification put to the test (do
output features' labels do better on the output side, input features' on the input side?).

    scores (sae_id, feature, method, benchmark, headline metrics) + routes (sae_id, feature, kind)
      ─▶ cells: per (kind, method, benchmark) the mean headline metric over the kind's
         features (benchmarks.py gives each benchmark's headline, chance and side)
      ─▶ sides: per (kind, method, side) the feature's side score = the mean over that
         side's benchmarks of (headline − chance), paired with the random-label control's
         side score on the same features (metrics.paired_comparison: mean difference, 95%
         bootstrap CI, sign-flip p)
      ─▶ verdict per (kind, method, side): *passes* when the CI of the difference lies above
         0, *below the control* when it lies below 0, *not shown* when it reaches 0, *not
         scored* without a benchmark of that side (or without the control)
      ─▶ by_kind.json, by_kind.png and the section's HTML (sections.html.j2 `by_kind`)

Any benchmark registered with side "output" (logit_embedding, and intervention or
simulation where they are registered) joins the output side; every other one the input
side. Features scored but not routed (no routes table) form the kind "unrouted".
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from baez_ray import benchmarks
from baez_ray.metrics import CONTROL, HEADLINE, method_order, paired_comparison
from baez_ray.report.html import pyplot, save_figure, section

KINDS = ("input", "output", "cross", "obscure", "unrouted")
SIDES = ("input", "output")
VERDICT_WORDS = {"passes": "passes", "below": "below the control", "unclear": "not shown", "none": "not scored"}


def with_kinds(scores, routes):
    """The scores (a pandas frame) with each feature's kind from `routes` (a frame with
    sae_id, feature, kind; None: every feature unrouted)."""
    if routes is None or not len(routes):
        return scores.assign(kind="unrouted")
    kinds = routes[["sae_id", "feature", "kind"]].drop_duplicates(["sae_id", "feature"])
    out = scores.merge(kinds, on=["sae_id", "feature"], how="left")
    return out.assign(kind=out["kind"].fillna("unrouted"))


def headline_values(scores):
    """Each row's headline metric (its benchmark's), and its excess over chance."""
    value = np.full(len(scores), np.nan)
    chance = np.full(len(scores), np.nan)
    for b in set(scores["benchmark"]):
        at = (scores["benchmark"] == b).to_numpy()
        col = HEADLINE.get(b)
        if col in scores.columns:
            value[at] = scores.loc[at, col].astype(float).to_numpy()
            chance[at] = benchmarks.get(b).chance
    return value, value - chance


def cells(df) -> dict:
    """{(kind, method, benchmark): (mean headline, features with one)}."""
    out = {}
    for (kind, method, bench), g in df.groupby(["kind", "method", "benchmark"], sort=False):
        v = g["value"].dropna()
        out[(kind, method, bench)] = (float(v.mean()) if len(v) else math.nan, int(len(v)))
    return out


def side_verdict(cmp: dict) -> str:
    if not cmp["n"] or not math.isfinite(cmp["ci_low"]):
        return "none"
    return "passes" if cmp["ci_low"] > 0 else "below" if cmp["ci_high"] < 0 else "unclear"


def side_rows(df, seed: int = 0) -> list[dict]:
    """Per (kind, method other than the control, side): the paired comparison of the side
    scores with the control's on the same features, and its verdict."""
    per = df.assign(side=[benchmarks.side(b) if b in benchmarks.names() else "input" for b in df["benchmark"]])
    per = per.groupby(["kind", "sae_id", "feature", "method", "side"], sort=False)["excess"].mean().reset_index()
    rows = []
    for (kind, side_), g in per.groupby(["kind", "side"], sort=False):
        wide = g.pivot_table(index=["sae_id", "feature"], columns="method", values="excess", aggfunc="first")
        for method in [m for m in wide.columns if m != CONTROL]:
            control = wide[CONTROL] if CONTROL in wide.columns else wide[method] * np.nan
            cmp = paired_comparison(wide[method].tolist(), control.tolist(), seed=seed)
            rows.append({"kind": kind, "method": method, "side": side_, **cmp, "verdict": side_verdict(cmp)})
    return rows


def kind_sentence(kind: str, rows: list[dict]) -> str:
    """One sentence per kind: which side its labels pass, method by method, e.g. "output
    features: token_freq passes the output side (input +0.08, not shown; output +0.23,
    passes)"."""
    parts = []
    for method in method_order(r["method"] for r in rows):
        mine = {r["side"]: r for r in rows if r["method"] == method}
        passed = [s for s in SIDES if mine.get(s, {}).get("verdict") == "passes"]
        head = f"passes the {' and '.join(passed)} side{'s' if len(passed) > 1 else ''}" if passed else "passes neither side"
        shown = "; ".join(f"{s} {mine[s]['mean_diff']:+.2f}, {VERDICT_WORDS[mine[s]['verdict']]}" if s in mine and mine[s]["verdict"] != "none"
                          else f"{s} not scored" for s in SIDES)
        parts.append(f"{method} {head} ({shown})")
    return f"{kind} features: " + "; ".join(parts) + "." if parts else f"{kind} features: no labels scored."


def by_kind(scores, routes, seed: int = 0) -> dict:
    """The section's data: the benchmarks of each side, one row per (kind, method) with
    its cells and side comparisons, a sentence per kind."""
    value, excess = headline_values(scores)
    df = with_kinds(scores, routes).assign(value=value, excess=excess)
    order = [b for b in benchmarks.names() if b in set(df["benchmark"])]
    benches = {s: [b for b in order if benchmarks.side(b) == s] for s in SIDES}
    cell = cells(df)
    sides = side_rows(df, seed)
    kinds = [k for k in KINDS if k in set(df["kind"])]
    table, sentences = [], []
    for kind in kinds:
        mine = [r for r in sides if r["kind"] == kind]
        sentences.append(kind_sentence(kind, mine))
        for method in method_order(df.loc[df["kind"] == kind, "method"]):
            sd = {r["side"]: r for r in mine if r["method"] == method}
            table.append({"kind": kind, "method": method,
                          "n": int(df[(df["kind"] == kind) & (df["method"] == method)][["sae_id", "feature"]].drop_duplicates().shape[0]),
                          "cells": {b: cell.get((kind, method, b), (math.nan, 0))[0] for b in order},
                          "sides": {s: sd.get(s) for s in SIDES}})
    return {"benches": benches, "rows": table, "sentences": sentences, "sides": sides}


def by_kind_figure(sides: list[dict], path: Path) -> Path | None:
    """Per kind, per method: the input-side and output-side differences from the control
    (bars, 95% CI); None when nothing was compared."""
    rows = [r for r in sides if r["n"]]
    if not rows:
        return None
    plt = pyplot()
    groups = [(k, m) for k in KINDS for m in method_order(r["method"] for r in rows if r["kind"] == k)]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups)), 3.4))
    for j, (s, color) in enumerate((("input", "#4c72b0"), ("output", "#dd8452"))):
        got = [next((r for r in rows if (r["kind"], r["method"], r["side"]) == (k, m, s)), None) for k, m in groups]
        mean = [r["mean_diff"] if r else np.nan for r in got]
        err = np.array([[r["mean_diff"] - r["ci_low"] if r else 0 for r in got], [r["ci_high"] - r["mean_diff"] if r else 0 for r in got]])
        ax.bar(np.arange(len(groups)) + (j - 0.5) * 0.4, mean, 0.4, yerr=np.nan_to_num(err), capsize=3, color=color, label=f"{s} side")
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xticks(range(len(groups)), [f"{k}\n{m}" for k, m in groups], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("score − control (95% CI)")
    ax.legend(fontsize=8)
    ax.set_title("Input and output side, by kind of feature")
    return save_figure(fig, path)


def read_kinds(run_dir: Path):
    """routes/ as a frame (sae_id, feature, kind), or None without a routes table."""
    if not (run_dir / "routes").exists():
        return None
    return pq.read_table(run_dir / "routes", columns=["sae_id", "feature", "kind"]).to_pandas()


def by_kind_section(run_dir: Path, scores, out: Path, seed: int = 0):
    """Write by_kind.json and by_kind.png into `out`; the section's HTML ('' without scores)."""
    if scores is None or not len(scores):
        return ""
    data = by_kind(scores, read_kinds(run_dir), seed)
    (out / "by_kind.json").write_text(json.dumps(_finite({k: data[k] for k in ("benches", "sentences", "sides")}), indent=1))
    figure = by_kind_figure(data["sides"], out / "by_kind.png")
    return section("by_kind", {**data, "figure": figure.name if figure else None, "words": VERDICT_WORDS,
                               "chance": {b: benchmarks.get(b).chance for s in SIDES for b in data["benches"][s]}})


def _finite(x):
    """`x` with NaN and infinities as None, numpy scalars as Python ones (strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if hasattr(x, "item"):
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x
