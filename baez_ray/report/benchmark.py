"""Scoring report pieces (SPEC §3, §5) and the `benchmark` job's report.

* `scores_chart`: grouped bars, methods × benchmarks, of each benchmark's headline metric
  (balanced accuracy for detection, fuzz and intervention, AUROC for the others,
  simulation's correlation; each benchmark's chance level from benchmarks.py, output-side
  ones marked), error bars the 95% bootstrap CI, the random-label control among the methods;
* `gap_chart`: the embedding gap per method with its CI (0 = chance);
* `verdict_section`: the paired comparisons (metrics.comparison_table): which method beats
  which, on which benchmark, by how much, Holm-corrected; the benchmark report opens with it;
* `reliability_section`: split-half reliability per benchmark × method, saying in words
  when a benchmark is too unreliable to compare methods;
* `scoring_section`: the verdict (unless shown elsewhere), the charts, the summary table
  (with failure rates, negative-gap shares and the control beside each method), the
  input and output sides by kind of feature (report/by_kind.py), the reliability table, the per-feature scores (`per_feature_frame`: one row per feature ×
  method that exists, labels shared by several features marked; the first
  PER_FEATURE_ROWS shown);
* `distant_pairs`: the features whose labels from two methods are furthest apart
  (embedding cosine), with their examples, for reading;
* `write_benchmark_report`: report/index.html of a benchmark run (re-rendered from the
  tables by `baez-ray report RUN_DIR`), opening with a banner when rows failed.

The tables are read as the columns a section uses (`read_scores`, routing.read_routes,
the labels' keys and label) and counted with pandas / pyarrow group-bys; only the rows a
page shows become Python dicts. The HTML is in templates/ (sections.html.j2 for the
sections, benchmark.html.j2 for the page); this module computes what they show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from baez_ray import benchmarks
from baez_ray.metrics import ALPHA, CHANCE, CONTROL, EXACT_MAX, HEADLINE, N_PERM, RELIABILITY_MIN, aggregate, chance
from baez_ray.report.by_kind import by_kind_section
from baez_ray.report.html import (
    bar_legend, draw_bars, duplicates, label_shared, method_colors, n_col, pyplot, render_page, save_figure, section,
)

BENCH_ORDER = tuple(benchmarks.names())  # the registry's order
PER_FEATURE_ROWS = 1000  # rows of the per-feature table shown (all are in scores/)


def _methods(summary) -> list[str]:
    ms = [m for m in dict.fromkeys(summary["method"]) if m != "random_label"]
    return ms + (["random_label"] if "random_label" in set(summary["method"]) else [])


def scores_figure(summary):
    """(figure, hollow): grouped bars, methods × benchmarks, of the headline metric with its
    95% CI; a mean over fewer than 3 features hollow with its n (html.draw_bars); `hollow`
    lists those as (method, benchmark, n)."""
    plt = pyplot()
    benches = [b for b in BENCH_ORDER if b in set(summary["benchmark"])]
    methods = _methods(summary)
    colors = method_colors(methods)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(benches))
    hollow = []
    for j, m in enumerate(methods):
        sub = summary[summary["method"] == m].set_index("benchmark")
        col = lambda c: [float(sub[c].get(b, np.nan)) for b in benches]  # noqa: E731
        ns = [int(sub[n_col(sub)].get(b, 0)) for b in benches]
        drawn = draw_bars(ax, x + (j - (len(methods) - 1) / 2) * width, col("mean"), col("ci_low"), col("ci_high"), ns, width,
                          colors[m], hatch="//" if m == CONTROL else None)
        hollow += [(m, benches[i], ns[i]) for i in drawn]
    for i, b in enumerate(benches):  # each benchmark's own chance level (simulation's correlation: 0)
        ax.hlines(chance(b), i - 0.45, i + 0.45, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"{b}\n({HEADLINE[b].replace('_', ' ')}{', output side' if benchmarks.side(b) == 'output' else ''})" for b in benches])
    ax.set_ylim(min(0.0, float(np.nanmin(summary["ci_low"].to_numpy(dtype=float), initial=0.0)) - 0.05), 1.05)  # a correlation can be < 0
    ax.set_ylabel("score (mean, 95% CI)")
    bar_legend(ax, [(m, colors[m], "//" if m == CONTROL else None) for m in methods], chance=CHANCE, fontsize=8,
               loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Label scores by method and benchmark")
    return fig, hollow


def scores_chart(summary, path: Path) -> list[tuple]:
    """scores_figure saved as PNG at `path`; the hollow bars (method, benchmark, n)."""
    fig, hollow = scores_figure(summary)
    save_figure(fig, path)
    return hollow


def gap_chart(scores, path: Path, seed: int = 0) -> list[tuple] | None:
    """The embedding gap per method with its 95% CI (0 = chance), hollow where fewer than 3
    features; None without embedding scores, else the hollow bars (method, 'gap', n)."""
    from baez_ray.metrics import bootstrap_ci

    emb = scores[scores["benchmark"] == "embedding"]
    if not len(emb):
        return None
    plt = pyplot()
    methods = _methods(emb)
    colors = method_colors(methods)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods)), 3.2))
    hollow = []
    for j, m in enumerate(methods):
        gaps = emb[emb["method"] == m]["gap"].astype(float)
        mean, lo, hi = bootstrap_ci(gaps.tolist(), seed=seed)
        n = int(np.isfinite(gaps).sum())
        if draw_bars(ax, [j], [mean], [lo], [hi], [n], 0.8, colors[m] if m == CONTROL else "#4c72b0"):
            hollow.append((m, "gap", n))
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("cos(label, pos) − cos(label, neg)")
    ax.set_title("Embedding gap (mean, 95% CI; hollow: fewer than 3 features)")
    save_figure(fig, path)
    return hollow


def summary_rows(summary) -> list[dict]:
    """The summary's rows in table order: by benchmark, the control last among the methods."""
    return summary.sort_values(["benchmark", "method"], key=lambda s: s.map(lambda v: (v == CONTROL, v)) if s.name == "method" else s).to_dict(orient="records")


def per_feature_frame(scores, failed=None):
    """One row per (sae_id, feature, method) that has scores (a groupby on the rows that
    exist, never a product of all features and methods) and one per label that `failed` (a
    frame of sae_id, feature, method; label None), sorted by feature: the label, the
    headline metric of each benchmark (a column each) and the number of features carrying
    the same label (`shared`, html.label_shared; the control is left out: it reuses other
    features' labels by design). Vectorised: no Python object per row."""
    import pandas as pd

    keys = ["sae_id", "feature", "method"]
    benches = [b for b in BENCH_ORDER if b in set(scores["benchmark"])]
    headline = np.select([scores["benchmark"] == b for b in benches], [scores[HEADLINE[b]].astype(float) for b in benches], np.nan)
    wide = scores.assign(value=headline).groupby(keys + ["benchmark"], sort=False)["value"].first().unstack("benchmark")
    wide = wide.reindex(columns=benches).join(scores.groupby(keys, sort=False)["label"].first()).reset_index()
    own = (wide["method"] != CONTROL).to_numpy()
    shared = np.ones(len(wide), dtype=np.int64)
    if own.any():
        mine = wide[own]
        shared[own] = label_shared(pa.array(mine["sae_id"], pa.string()), pa.array(mine["feature"], pa.int64()),
                                   pa.array(mine["label"], pa.string(), from_pandas=True))
    wide = wide.assign(shared=shared)
    if failed is not None and len(failed):
        wide = pd.concat([wide, pd.DataFrame(failed)[keys].assign(label=None, shared=1)], ignore_index=True)
    return wide.sort_values(keys, kind="stable", ignore_index=True)


def per_feature_rows(scores, failed=None, limit: int | None = None, frame=None) -> list[dict]:
    """The first `limit` rows (all: None) of `per_feature_frame` (`frame` when the caller
    has it) as dicts, the benchmarks' values in `values` (BENCH_ORDER), a missing label None."""
    frame = per_feature_frame(scores, failed) if frame is None else frame
    benches = [b for b in BENCH_ORDER if b in frame.columns]
    rows = []
    for r in (frame if limit is None else frame.head(limit)).to_dict(orient="records"):
        label = r["label"] if isinstance(r["label"], str) else None  # pandas gives a missing string as NaN
        rows.append({**r, "label": label, "values": [r[b] for b in benches], "shared": int(r["shared"]) if label else 1})
    return rows


SCORE_COLUMNS = ["sae_id", "feature", "method", "benchmark", "label", "n_shown", "n_failed", "balanced_accuracy", "accuracy",
                 "precision", "recall", "f1", "gap", "auroc", "correlation", "score_half_a", "score_half_b"]


def read_scores(run_dir: Path):
    """The scores table as a pandas frame of the columns the report reads (SCORE_COLUMNS
    that the table has: prompt versions, tokens and costs are left on disk)."""
    import pyarrow.dataset as pads

    names = set(pads.dataset(run_dir / "scores", format="parquet").schema.names)
    wanted = list(dict.fromkeys(SCORE_COLUMNS + list(HEADLINE.values())))  # a benchmark's own headline column too
    return pq.read_table(run_dir / "scores", columns=[c for c in wanted if c in names]).to_pandas()


def statistics(run_dir: Path, scores, seed: int = 0):
    """(reliability, comparisons) of a run: the tables `summarise` wrote beside the scores
    (benchmark runs), else computed from the scores with the same seed (label runs)."""
    from baez_ray.metrics import comparison_table, reliability_table

    if (run_dir / "reliability.parquet").exists() and (run_dir / "comparisons.parquet").exists():
        return pq.read_table(run_dir / "reliability.parquet").to_pandas(), pq.read_table(run_dir / "comparisons.parquet").to_pandas()
    reliability = reliability_table(scores, seed=seed)
    return reliability, comparison_table(scores, reliability, seed=seed)


STATUS_WORDS = {
    "reliable": "reliable",
    "too unreliable": "too unreliable to compare methods",
    "no spread": "undefined: a half scored every feature the same, no spread across features",
    "too few features": "undefined: fewer than 3 features with both halves",
}


def unreliable_notes(reliability, comparisons) -> dict:
    """What the verdict must warn about: the benchmarks whose method scores are too
    unreliable to compare (`too_unreliable`: benchmark → its rows), those whose reliability
    is undefined (`unknown`), and (`holm_floor`) the most features any comparison had when
    too few to ever pass Holm, else None."""
    rel = reliability[reliability["method"] != CONTROL]
    groups = {status: {bench: g.to_dict(orient="records") for bench, g in part.groupby("benchmark", sort=False)}
              for status, part in (("too_unreliable", rel[rel["status"] == "too unreliable"]),
                                   ("unknown", rel[~rel["status"].isin(["reliable", "too unreliable"])]))}
    n = int(comparisons["n"].max()) if len(comparisons) else 0
    floor = n if 0 < n <= EXACT_MAX and len(comparisons) * 2 / 2**n >= ALPHA else None
    return {**groups, "holm_floor": floor}


def verdict_rows(comparisons) -> list[dict]:
    """The comparisons' rows with the winner, the loser and the reliability note read back
    as strings or None (pandas gives a missing string as NaN, a float)."""
    rows = []
    for r in comparisons.to_dict(orient="records"):
        winner = r["winner"] if isinstance(r["winner"], str) else None
        note = r.get("reliability_note") if isinstance(r.get("reliability_note"), str) else ""
        loser = (r["method_b"] if winner == r["method_a"] else r["method_a"]) if winner else None
        rows.append({**r, "winner": winner, "loser": loser, "too_unreliable": "too unreliable" in note})
    return rows


def verdict_section(comparisons, reliability):
    """The verdict table: which method beats which, on which benchmark, by how much."""
    return section("verdict", verdict_rows(comparisons), unreliable_notes(reliability, comparisons), _constants())


def reliability_section(reliability):
    """Split-half reliability per benchmark × method, in words where it is too low."""
    return section("reliability", reliability.to_dict(orient="records"), _constants())


def _constants() -> dict:
    return {"alpha": ALPHA, "exact_max": EXACT_MAX, "n_perm": N_PERM, "reliability_min": RELIABILITY_MIN,
            "control": CONTROL, "status_words": STATUS_WORDS}


def scoring_section(run_dir: Path, out: Path, seed: int = 0, verdict: bool = True, failed=None, scores=None):
    """The scoring part of a report (charts written into `out`): the verdict table (unless
    the caller shows it elsewhere), charts, summary, reliability, per-feature scores (the
    first PER_FEATURE_ROWS; and the labels that `failed`, a frame of sae_id, feature,
    method); '' when no scores. `scores`: read_scores(run_dir) when the caller has it."""
    if not (run_dir / "scores").exists():
        return ""
    scores = read_scores(run_dir) if scores is None else scores
    if not len(scores):
        return section("no_scores")
    reliability, comparisons = statistics(run_dir, scores, seed)
    summary = aggregate(scores, seed=seed)
    hollow = scores_chart(summary, out / "scores_by_method.png")
    gap = gap_chart(scores, out / "embedding_gap.png", seed=seed)
    table = per_feature_frame(scores, failed)
    ctx = {"verdict": verdict_section(comparisons, reliability) if verdict else "", "gap": gap is not None,
           "by_kind": by_kind_section(run_dir, scores, out, seed),
           "hollow": hollow + (gap or []),
           "failed": int(scores["n_failed"].sum()), "shown": int(scores["n_shown"].sum()), "summary": summary_rows(summary),
           "reliability": reliability_section(reliability), "benches": [b for b in BENCH_ORDER if b in set(scores["benchmark"])],
           "features": per_feature_rows(scores, failed, PER_FEATURE_ROWS, frame=table), "n_features": len(table),
           "duplicates": duplicates(pa.array(table["label"], pa.string(), from_pandas=True), table["shared"].to_numpy())}
    return section("scoring", ctx, _constants())


def distant_pairs(labels, a: str, b: str, n: int, embedder: str | None = None) -> list[dict]:
    """Features labelled by both `a` and `b`, ordered by the cosine of their two labels
    (least similar first): [{feature, sae_id, label_a, label_b, cosine}]."""
    from baez_ray.models.embedder import Embedder

    la = {(r["sae_id"], r["feature"]): r["label"] for r in labels if r["method"] == a and r["label"]}
    lb = {(r["sae_id"], r["feature"]): r["label"] for r in labels if r["method"] == b and r["label"]}
    keys = sorted(set(la) & set(lb))
    if not keys:
        return []
    emb = Embedder(embedder, device="cpu")
    U = emb.encode([la[k] for k in keys] + [lb[k] for k in keys])
    cos = (U[: len(keys)] * U[len(keys) :]).sum(1)
    order = np.argsort(cos, kind="stable")[:n]
    return [{"sae_id": keys[i][0], "feature": keys[i][1], "label_a": la[keys[i]], "label_b": lb[keys[i]], "cosine": float(cos[i])} for i in order]


def failure_lines(labels: pa.Table, manifest: dict) -> list[str]:
    """A line per part of a benchmark run that failed: each method's features without a
    label after their tries (counted from labels/ with a pyarrow group-by), then
    `score_failures`."""
    out = []
    counts = labels.group_by("method", use_threads=False).aggregate([([], "count_all"), ("label", "count", pc.CountOptions(mode="only_null"))])
    for method, n, n_failed in zip(*(counts.column(c).to_pylist() for c in ("method", "count_all", "label_count"))):
        if n_failed:
            out.append(f"{method}: {n_failed:,} of {n:,} features got no label; they are not scored")
    return out + score_failures(manifest)


def score_failures(manifest: dict) -> list[str]:
    """A line each when the run's scoring stage had scorer prompts that failed after their
    retries, or scored nothing."""
    if "score" not in manifest["stages"]:
        return []
    sc, out = manifest["stages"]["score"], []
    if sc.get("failed_prompts"):
        out.append(f"scoring: {sc['failed_prompts']:,} of {sc.get('prompts', 0):,} scorer prompts failed after their retries; "
                   "their excerpts count as failed in the summary, not dropped")
    if not sc.get("rows"):
        out.append("scoring: no label was scored")
    return out


def run_facts(manifest: dict) -> list[tuple[str, str]]:
    """The benchmark run's facts: features, split, scorer, each method's labels, scoring."""
    spec, st = manifest["spec"], manifest["stages"]
    b = spec["benchmark"]
    score = b.get("score") or {}
    split = st.get("split", {})
    if "stratify" in st:
        split = st["stratify"]
        per_tier = ", ".join(f"tier {t} {split.get(f'sampled_tier{t}', '?')}" for t in (1, 2, 3))
        sampled = (f"{split.get('sampled', '?')} sampled, up to {split.get('per_tier', '?')} per tier and SAE ({per_tier}), from "
                   f"{split.get('routed', 0):,} routed on their train examples of the {split.get('eligible', 0):,} with "
                   f"≥ {split.get('min_examples', '?')} activating examples")
        sampled += "".join(f"; {line}" for line in split.get("short", []))
    else:
        sampled = f"{split.get('sampled', '?')} sampled of {split.get('eligible', '?')} with ≥ {split.get('min_examples', '?')} activating examples"
    facts = [("features", sampled),
             ("split", f"{split.get('split')} (train {b.get('train_examples')}, test {score.get('test_examples')} examples; disjoint)"),
             ("scorer", str((score.get("scorer") or b["explainer"])["model"]))]
    for m in b["methods"]:
        s = st.get(f"label:{m}", {})
        facts.append((m, f"{s.get('labelled', 0)} labelled, {s.get('failed', 0)} failed; "
                         f"{s.get('input_tokens', 0):,} / {s.get('output_tokens', 0):,} tokens in / out, ${s.get('cost_usd', 0.0):.4f}"))
    sc = st.get("score", {})
    facts.append(("scoring", f"{sc.get('prompts', 0):,} prompts, {sc.get('failed_prompts', 0)} failed after retries, "
                             f"{sc.get('retried_prompts', 0)} retried; {sc.get('scorer_input_tokens', 0):,} / {sc.get('scorer_output_tokens', 0):,} tokens, "
                             f"${sc.get('scorer_cost_usd', 0.0):.4f}"))
    return facts


def distant_section(run_dir: Path, spec: dict, labels: pa.Table) -> dict | None:
    """The most distant labels of the two compared methods (of the labels table's sae_id,
    feature, method, label), with their train examples."""
    b = spec["benchmark"]
    compare = b.get("compare") or b["methods"][:2]
    if len(compare) != 2 or compare[0] == compare[1]:
        return None
    compared = labels.filter(pc.and_(pc.is_in(labels.column("method"), pa.array(compare)), pc.is_valid(labels.column("label"))))
    pairs = distant_pairs(compared.to_pylist(), compare[0], compare[1], b.get("n_distant", 10), (b.get("score") or {}).get("embedder"))
    if not pairs:
        return None
    keys = {(p["sae_id"], p["feature"]) for p in pairs}
    train = {(r["sae_id"], r["feature"]): r["examples"][:3] for r in pq.read_table(
        run_dir / "train", columns=["sae_id", "feature", "examples"], filters=[("feature", "in", sorted({f for _, f in keys}))]).to_pylist()}
    return {"a": compare[0], "b": compare[1], "pairs": [{**p, "examples": train.get((p["sae_id"], p["feature"]), [])} for p in pairs]}


def tier_sections(run_dir: Path, manifest: dict, out: Path, scores, reliability, seed: int) -> tuple:
    """(routing verdict, statistics per tier) of a benchmark run (report/verdict.py); ''
    for a run without routes."""
    from baez_ray.config import VerdictConfig
    from baez_ray.report.verdict import routing_verdict_section, tiers_section, verdict_tables

    tables = verdict_tables(run_dir, manifest, scores=scores, reliability=reliability, seed=seed)
    if not tables:
        return "", ""
    cfg = VerdictConfig.model_validate(manifest["spec"]["benchmark"].get("verdict") or {})
    return routing_verdict_section(tables["verdict"], manifest), tiers_section(tables, out, cfg.frontier or cfg.tier2)


def write_benchmark_report(run_dir: str | Path) -> Path:
    from baez_ray.report.routing import read_routes, write_routing_report

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = manifest["spec"]
    seed = spec.get("seed", 0)
    labels = pq.read_table(run_dir / "labels", columns=["sae_id", "feature", "method", "label"])
    verdict, scores, routing_verdict, tiers = "", None, "", ""
    if (run_dir / "scores").exists():
        scores = read_scores(run_dir)
        if len(scores):
            reliability, comparisons = statistics(run_dir, scores, seed)
            verdict = verdict_section(comparisons, reliability)
            routing_verdict, tiers = tier_sections(run_dir, manifest, out, scores, reliability, seed)
    routing = None
    if (run_dir / "routes").exists():
        taus = {k: spec["route"][k] for k in ("tau_in", "tau_out", "tau_cross")}
        routing = write_routing_report(read_routes(run_dir / "routes"), out, taus=taus)["html"]
    failed = labels.filter(pc.is_null(labels.column("label"))).select(["sae_id", "feature", "method"]).to_pandas()
    # the page opens with the failures and the routing verdict, then the methods' verdict, the run's
    # facts, the scores behind them, the statistics per tier
    return render_page("benchmark.html.j2", out / "index.html", name=manifest["name"], failures=failure_lines(labels, manifest),
                       routing_verdict=routing_verdict, verdict=verdict, facts=run_facts(manifest), routing=routing, tiers=tiers,
                       scoring=scoring_section(run_dir, out, seed, verdict=False, failed=failed, scores=scores),
                       distant=distant_section(run_dir, spec, labels))
