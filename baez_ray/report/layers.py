"""The layers section of the routing report (SPEC §4, §5): tier and kind shares per layer
with bootstrap 95% CIs, the distributions of C_in, C_out and C_cross per layer, and a
verdict on the layer hypothesis — early layers mostly input features, middle layers mostly
cross/obscure features, late layers mostly output features.

    routes (schema.ROUTES, every SAE of the run) ─▶ live features, by layer
      ─▶ kind and tier shares per layer, bootstrap 95% CIs   (layer_shares)
      ─▶ quantiles of C_in, C_out, C_cross per layer          (score_quantiles)
      ─▶ the three claims: supported | inconclusive | contradicted   (verdicts)
      ─▶ layers.png, layers.json and the section's HTML       (write_layers_section)

Live features: a feature without any example (it never fired over the corpus) has no
window to score, so route puts it in tier 3; counted, dead features would make "obscure"
mean "dead". They are left out of every share and distribution here and counted per layer.
Several SAEs at one layer are pooled. Every function takes the routes table (schema.ROUTES;
`feature` is not read) as a pyarrow Table, or a pandas DataFrame (converted), and counts
with pyarrow group-bys: no Python object per feature.

Bootstrap over features: resampling a layer's n live features with replacement and counting
their kinds is one draw from Multinomial(n, the observed kind shares), so each of N_BOOT
replicates is one multinomial draw (the same bootstrap, at any n). Tier shares are sums of
kind shares (tier 1 = input + output, tier 2 = cross, tier 3 = obscure). CI: the 2.5th and
97.5th percentiles of the replicates; numpy's generator, seeded.

Decision rule. "Mostly" is read as a comparison of layers routed with the same thresholds
(absolute shares move with τ, which is calibrated per embedder; the order of the layers
does not):
* early  — the input share at the earliest layer is above the input share at every other layer;
* middle — the cross + obscure share of the middle layers (those strictly between the
  earliest and the latest, pooled) is above that share at the earliest and at the latest layer;
* late   — the output share at the latest layer is above the output share at every other layer.
A claim is *supported* when its 95% CI lies wholly above the CI of every layer it is
compared with (disjoint CIs), *contradicted* when the CI of some compared layer lies wholly
above its own, and *inconclusive* otherwise. The early and late claims need ≥ 2 layers with
live features, the middle claim ≥ 3; with fewer a claim says so and is not judged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from baez_ray.report.html import pyplot, save_figure, section

KINDS = ("input", "output", "cross", "obscure")
# every share is a sum of kind shares (kind indices into KINDS)
SHARES = {"tier1": (0, 1), "tier2": (2,), "tier3": (3,), "input": (0,), "output": (1,), "cross": (2,), "obscure": (3,),
          "cross_obscure": (2, 3)}
SCORE_COLUMNS = (("c_in", "C_in"), ("c_out", "C_out"), ("c_cross", "C_cross"))
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
N_BOOT = 2000
LEVEL = 0.95


def as_table(routes) -> pa.Table:
    """The routes as a pyarrow Table (a pandas DataFrame is converted)."""
    return routes if isinstance(routes, pa.Table) else pa.Table.from_pandas(routes, preserve_index=False)


def live_routes(routes: pa.Table) -> pa.Table:
    """The rows of features that fired (n_examples > 0)."""
    return routes.filter(pc.greater(routes.column("n_examples"), 0))


def kind_counts(routes: pa.Table) -> dict[int, np.ndarray]:
    """Per layer (ascending) with live features: the live features of each kind (in KINDS order)."""
    agg = live_routes(routes).group_by(["layer", "kind"]).aggregate([([], "count_all")])
    out: dict[int, np.ndarray] = {}
    for layer, kind, n in zip(agg.column("layer").to_pylist(), agg.column("kind").to_pylist(), agg.column("count_all").to_pylist()):
        counts = out.setdefault(int(layer), np.zeros(len(KINDS), dtype=np.int64))
        if kind in KINDS:
            counts[KINDS.index(kind)] += n
    return dict(sorted(out.items()))


def shares_with_ci(counts: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """{share: (point, low, high)} for every share of SHARES from the kind counts of one
    group of features (the multinomial bootstrap of the module docstring)."""
    n = int(counts.sum())
    if n == 0:
        return {s: (np.nan, np.nan, np.nan) for s in SHARES}
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=n_boot) / n
    lo_q, hi_q = (1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2
    out = {}
    for s, idx in SHARES.items():
        reps = draws[:, idx].sum(axis=1)
        lo, hi = np.quantile(reps, [lo_q, hi_q])
        out[s] = (float(counts[list(idx)].sum() / n), float(lo), float(hi))
    return out


def layer_shares(routes, n_boot: int = N_BOOT, seed: int = 0):
    """One row per layer (ascending): layer, saes (the SAE ids there), n (live features),
    n_dead, and for every share of SHARES its point estimate `<share>` and 95% CI
    `<share>_lo`, `<share>_hi` over the live features."""
    import pandas as pd

    routes = as_table(routes)
    per_layer = routes.group_by("layer").aggregate([("sae_id", "distinct"), ([], "count_all")]).sort_by("layer")
    live = kind_counts(routes)
    rows = []
    for layer, saes, n_all in zip(per_layer.column("layer").to_pylist(), per_layer.column("sae_id_distinct").to_pylist(),
                                  per_layer.column("count_all").to_pylist()):
        counts = live.get(int(layer), np.zeros(len(KINDS), dtype=np.int64))
        n = int(counts.sum())
        row: dict[str, Any] = {"layer": int(layer), "saes": ", ".join(sorted(saes)), "n": n, "n_dead": n_all - n}
        for s, (p, lo, hi) in shares_with_ci(counts, n_boot, seed).items():
            row.update({s: p, f"{s}_lo": lo, f"{s}_hi": hi})
        rows.append(row)
    cols = ["layer", "saes", "n", "n_dead"] + [f"{s}{x}" for s in SHARES for x in ("", "_lo", "_hi")]
    return pd.DataFrame(rows, columns=cols)


def score_values(routes: pa.Table, col: str, mask=None) -> np.ndarray:
    """The non-missing values of score `col` (of the rows of `mask`), float."""
    v = routes.column(col) if mask is None else routes.column(col).filter(mask)
    v = v.drop_null().to_numpy().astype(float) if len(v) else np.zeros(0)
    return v[~np.isnan(v)]


def score_quantiles(routes):
    """One row per (layer, score): n (live features with that score; C_cross exists only
    for the features that failed both tier-1 tests) and the QUANTILES as q5 … q95."""
    import pandas as pd

    live = live_routes(as_table(routes))
    names = [f"q{round(q * 100)}" for q in QUANTILES]
    rows = []
    for layer in sorted(set(pc.unique(live.column("layer")).to_pylist())):
        at = pc.equal(live.column("layer"), layer)
        for col, title in SCORE_COLUMNS:
            v = score_values(live, col, at)
            qs = np.quantile(v, QUANTILES) if len(v) else [np.nan] * len(QUANTILES)
            rows.append({"layer": int(layer), "score": title, "n": len(v), **dict(zip(names, map(float, qs)))})
    return pd.DataFrame(rows, columns=["layer", "score", "n", *names])


# ------------------------------------------------------------------ the verdict
def _fmt(p: tuple[float, float, float]) -> str:
    return f"{p[0]:.2f} ({p[1]:.2f}–{p[2]:.2f})"


def judge(claim: tuple[float, float, float], others: dict[str, tuple[float, float, float]]) -> str:
    """supported | contradicted | inconclusive: the claim's CI against each compared CI."""
    if all(claim[1] > o[2] for o in others.values()):
        return "supported"
    if any(o[1] > claim[2] for o in others.values()):
        return "contradicted"
    return "inconclusive"


def _claim(name: str, share: str, at: str, group: np.ndarray, others: dict[str, np.ndarray], n_boot: int, seed: int) -> dict:
    mine = shares_with_ci(group, n_boot, seed)[share]
    theirs = {k: shares_with_ci(c, n_boot, seed)[share] for k, c in others.items()}
    verdict = judge(mine, theirs)
    label = "cross + obscure" if share == "cross_obscure" else share
    figure = f"{label} share at {at}: {_fmt(mine)}; " + ", ".join(f"{k}: {_fmt(v)}" for k, v in theirs.items())
    return {"claim": name, "share": share, "at": at, "point": mine[0], "lo": mine[1], "hi": mine[2],
            "compared": {k: list(v) for k, v in theirs.items()}, "verdict": verdict, "figure": figure,
            "text": f"{figure}: {verdict}"}


def _not_judged(name: str, need: int, have: int) -> dict:
    figure = f"needs ≥ {need} layers with live features; this run has {have}"
    return {"claim": name, "verdict": "not judged", "figure": figure, "text": f"{figure}: not judged"}


def overall(claims: list[dict]) -> str:
    """One sentence: the hypothesis as a whole."""
    judged = [c for c in claims if c["verdict"] != "not judged"]
    if not judged:
        return "The layer hypothesis needs ≥ 2 layers with live features (3 for the middle claim): not judged."
    said = "; ".join(f"{c['claim']} {c['verdict']}" for c in claims)
    if all(c["verdict"] == "supported" for c in judged):
        return f"The data support the layer hypothesis ({said})." if len(judged) == 3 else f"The data support the claims that could be judged ({said})."
    return f"The data do not support the whole layer hypothesis ({said})."


def verdicts(routes, n_boot: int = N_BOOT, seed: int = 0) -> list[dict]:
    """The three claims of the layer hypothesis (early, middle, late), each with its figure,
    CI, the layers compared and the verdict (decision rule in the module docstring)."""
    counts = kind_counts(as_table(routes))
    layers = sorted(counts)
    if len(layers) < 2:
        return [_not_judged(c, 3 if c == "middle" else 2, len(layers)) for c in ("early", "middle", "late")]
    first, last = layers[0], layers[-1]
    early = _claim("early", "input", f"layer {first} (earliest)", counts[first],
                   {f"layer {k}": counts[k] for k in layers[1:]}, n_boot, seed)
    late = _claim("late", "output", f"layer {last} (latest)", counts[last],
                  {f"layer {k}": counts[k] for k in layers[:-1]}, n_boot, seed)
    if len(layers) < 3:
        return [early, _not_judged("middle", 3, len(layers)), late]
    middle = layers[1:-1]
    at = f"layer {middle[0]}" if len(middle) == 1 else f"layers {', '.join(map(str, middle))} (pooled)"
    mid = _claim("middle", "cross_obscure", at, sum(counts[k] for k in middle),
                 {f"layer {first}": counts[first], f"layer {last}": counts[last]}, n_boot, seed)
    return [early, mid, late]


# ------------------------------------------------------------------ figure and HTML
CLAIMS = {"early": "early layers: mostly input features", "middle": "middle layers: mostly cross/obscure features",
          "late": "late layers: mostly output features"}
RULE = ("Dead features (no example over the corpus) are left out. Shares with bootstrap 95% CIs over the live "
        "features of a layer (several SAEs at one layer pooled). A claim is supported when its CI lies wholly "
        "above the CI of every layer it is compared with, contradicted when some compared layer's CI lies wholly "
        "above its own, inconclusive otherwise. Early: input share at the earliest layer against every other "
        "layer; late: output share at the latest layer against every other layer; middle: cross + obscure share of "
        "the layers strictly between (pooled) against the earliest and the latest. Needs ≥ 2 layers (3 for the middle claim).")


def layers_figure(shares, quantiles, path: str | Path) -> Path:
    """PNG (about 1,150 px wide): input, cross + obscure and output shares per layer with
    their CIs, and per score a box per layer (box: quartiles, whiskers: 5th–95th percentiles)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(10.5, 2.9))
    x = shares["layer"].to_numpy()
    for s, color in (("input", "#4c72b0"), ("cross_obscure", "#dd8452"), ("output", "#55a868")):
        p = shares[s].to_numpy(dtype=float)
        err = np.vstack([p - shares[f"{s}_lo"].to_numpy(dtype=float), shares[f"{s}_hi"].to_numpy(dtype=float) - p])
        axes[0].errorbar(x, p, yerr=err, marker="o", capsize=3, color=color, label=s.replace("_", " + "))
    axes[0].set(xlabel="layer", ylabel="share of live features", ylim=(0, 1), xticks=x)
    axes[0].legend(fontsize=7, loc="best")
    for ax, (_, title) in zip(axes[1:], SCORE_COLUMNS):
        q = quantiles[(quantiles["score"] == title) & (quantiles["n"] > 0)]
        stats = [{"med": r.q50, "q1": r.q25, "q3": r.q75, "whislo": r.q5, "whishi": r.q95, "label": str(r.layer)} for r in q.itertuples()]
        if stats:
            ax.bxp(stats, showfliers=False)
        ax.set(title=title, xlabel="layer")
    return save_figure(fig, path)


def write_layers_section(routes, out_dir: str | Path, seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Write layers.png and layers.json into out_dir; return {shares, quantiles, verdicts,
    html} (shares and quantiles as records)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    routes = as_table(routes)
    shares, quantiles = layer_shares(routes, n_boot, seed), score_quantiles(routes)
    claims = verdicts(routes, n_boot, seed)
    figure = None
    if (shares["n"] > 0).any():
        layers_figure(shares[shares["n"] > 0], quantiles, out_dir / "layers.png")
        figure = "layers.png"
    summary = {"shares": json.loads(shares.to_json(orient="records")), "quantiles": json.loads(quantiles.to_json(orient="records")),
               "verdicts": claims}
    (out_dir / "layers.json").write_text(json.dumps(summary, indent=2))
    page = {"overall": overall(claims), "verdicts": claims, "claims": CLAIMS, "rule": RULE, "figure": figure,
            "columns": ("tier1", "tier2", "tier3", "input", "output", "cross", "obscure"),
            "shares": summary["shares"], "quantiles": summary["quantiles"],
            "quantile_names": [n for n in quantiles.columns if n.startswith("q")]}
    return {**summary, "html": section("layers", page)}
