"""Scoring report pieces (SPEC §3, §5) and the `benchmark` job's report.

* `scores_chart`: grouped bars, methods × benchmarks, of each benchmark's headline metric
  (balanced accuracy for detection and fuzz, AUROC for embedding; chance 0.5 for all),
  error bars the 95% bootstrap CI, the random-label control among the methods;
* `gap_chart`: the embedding gap per method with its CI (0 = chance);
* `verdict_section`: the paired comparisons (metrics.comparison_table): which method beats
  which, on which benchmark, by how much, Holm-corrected; the benchmark report opens with it;
* `reliability_section`: split-half reliability per benchmark × method, saying in words
  when a benchmark is too unreliable to compare methods;
* `scoring_section`: the verdict (unless shown elsewhere), the charts, the summary table
  (with failure rates, negative-gap shares and the control beside each method), the
  reliability table, the per-feature scores;
* `distant_pairs`: the features whose labels from two methods are furthest apart
  (embedding cosine), with their examples, for reading;
* `write_benchmark_report`: report/index.html of a benchmark run (re-rendered from the
  tables by `baez-ray report RUN_DIR`).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from baez_ray.metrics import ALPHA, CHANCE, CONTROL, EXACT_MAX, HEADLINE, N_PERM, RELIABILITY_MIN, aggregate
from baez_ray.report.html import STYLE, highlight, pyplot, save_figure

BENCH_ORDER = ("detection", "fuzz", "embedding", "detection_logprob", "fuzz_logprob")


def _methods(summary) -> list[str]:
    ms = [m for m in dict.fromkeys(summary["method"]) if m != "random_label"]
    return ms + (["random_label"] if "random_label" in set(summary["method"]) else [])


def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def scores_chart(summary, path: Path) -> Path:
    plt = pyplot()
    benches = [b for b in BENCH_ORDER if b in set(summary["benchmark"])]
    methods = _methods(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(benches) * max(1, len(methods)) / 2), 4))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(benches))
    colors = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        sub = summary[summary["method"] == m].set_index("benchmark")
        mean = [sub["mean"].get(b, np.nan) for b in benches]
        lo = [sub["ci_low"].get(b, np.nan) for b in benches]
        hi = [sub["ci_high"].get(b, np.nan) for b in benches]
        err = np.array([[mu - l if np.isfinite(mu) else 0 for mu, l in zip(mean, lo)], [h - mu if np.isfinite(mu) else 0 for mu, h in zip(mean, hi)]])
        ax.bar(x + (j - (len(methods) - 1) / 2) * width, mean, width, yerr=err, capsize=3, label=m,
               color="#999999" if m == "random_label" else colors(j), hatch="//" if m == "random_label" else None)
    ax.axhline(CHANCE, color="black", linestyle="--", linewidth=1, label="chance")
    ax.set_xticks(x, [f"{b}\n({HEADLINE[b].replace('_', ' ')})" for b in benches])
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (mean, 95% CI)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Label scores by method and benchmark")
    return save_figure(fig, path)


def gap_chart(scores, path: Path, seed: int = 0) -> Path | None:
    from baez_ray.metrics import bootstrap_ci

    emb = scores[scores["benchmark"] == "embedding"]
    if not len(emb):
        return None
    plt = pyplot()
    methods = _methods(emb)
    stats = [bootstrap_ci(emb[emb["method"] == m]["gap"].tolist(), seed=seed) for m in methods]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods)), 3.2))
    mean = [s[0] for s in stats]
    err = np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]])
    ax.bar(range(len(methods)), mean, yerr=np.nan_to_num(err), capsize=3,
           color=["#999999" if m == "random_label" else "#4c72b0" for m in methods])
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xticks(range(len(methods)), methods, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("cos(label, pos) − cos(label, neg)")
    ax.set_title("Embedding gap (mean, 95% CI)")
    return save_figure(fig, path)


def summary_table(summary) -> str:
    head = ("<table class=summary><tr><th>method</th><th>benchmark</th><th>metric</th><th class=num>mean</th><th class=num>95% CI</th>"
            "<th class=num>random label</th><th class=num>features</th><th class=num>accuracy</th><th class=num>precision</th>"
            "<th class=num>recall</th><th class=num>F1</th><th class=num>gap</th><th class=num>negative gaps</th><th class=num>failed</th></tr>")
    rows = []
    for r in summary.sort_values(["benchmark", "method"], key=lambda s: s.map(lambda v: (v == "random_label", v)) if s.name == "method" else s).to_dict(orient="records"):
        rows.append(
            f"<tr><td>{html.escape(r['method'])}</td><td>{r['benchmark']}</td><td>{r['metric'].replace('_', ' ')}</td>"
            f"<td class=num>{_fmt(r['mean'])}</td><td class=num>{_fmt(r['ci_low'])} – {_fmt(r['ci_high'])}</td>"
            f"<td class=num>{_fmt(r.get('random_label_mean'))}</td><td class=num>{r['n_features']}</td>"
            f"<td class=num>{_fmt(r['accuracy'])}</td><td class=num>{_fmt(r['precision'])}</td><td class=num>{_fmt(r['recall'])}</td>"
            f"<td class=num>{_fmt(r['f1'])}</td><td class=num>{_fmt(r['gap'])}</td><td class=num>{_fmt(r['negative_gap_share'], 2)}</td>"
            f"<td class=num>{_fmt(100 * r['failure_rate'], 1)}%</td></tr>"
        )
    return head + "".join(rows) + "</table>"


def per_feature_table(scores, limit: int = 300) -> str:
    piv = scores.pivot_table(index=["sae_id", "feature", "method", "label"], columns="benchmark",
                             values=["balanced_accuracy", "auroc", "gap"], aggfunc="first", dropna=False)
    benches = [b for b in BENCH_ORDER if b in set(scores["benchmark"])]
    cols = [(HEADLINE[b], b) for b in benches]
    head = "<table class=perfeature><tr><th>SAE</th><th>feature</th><th>method</th><th>label</th>" + "".join(
        f"<th class=num>{b}</th>" for b in benches) + "</tr>"
    rows = []
    for (sae, feat, method, label), r in list(piv.iterrows())[:limit]:
        vals = "".join(f"<td class=num>{_fmt(r.get(c, np.nan), 2)}</td>" for c in cols)
        rows.append(f"<tr><td>{html.escape(sae)}</td><td>{feat}</td><td>{html.escape(method)}</td>"
                    f"<td>{html.escape(str(label))}</td>{vals}</tr>")
    more = f"<p>First {limit} of {len(piv):,} rows; all are in scores/.</p>" if len(piv) > limit else ""
    return head + "".join(rows) + "</table>" + more


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


def _unreliable_words(reliability, comparisons) -> str:
    """A sentence per benchmark whose method scores are too unreliable to compare (or whose
    reliability is undefined), and one when too few features could ever pass Holm."""
    rel = reliability[reliability["method"] != CONTROL]
    out = []
    for bench, g in rel[rel["status"] == "too unreliable"].groupby("benchmark", sort=False):
        which = ", ".join(f"{html.escape(r['method'])} (reliability {_fmt(r['reliability'], 2)}, 95% CI {_fmt(r['ci_low'], 2)} – "
                          f"{_fmt(r['ci_high'], 2)}, {r['n']} features)" for r in g.to_dict(orient="records"))
        out.append(f"<li><b>{html.escape(bench)}</b> is too unreliable to compare methods for {which}: its split-half reliability "
                   f"is below {RELIABILITY_MIN} or its CI reaches 0, so differences on it do not mean much.</li>")
    for bench, g in rel[~rel["status"].isin(["reliable", "too unreliable"])].groupby("benchmark", sort=False):
        which = ", ".join(f"{html.escape(r['method'])} ({STATUS_WORDS[r['status']]})" for r in g.to_dict(orient="records"))
        out.append(f"<li>On <b>{html.escape(bench)}</b> the reliability is unknown for {which}: the paired tests below still "
                   "hold, but whether the benchmark ranks features consistently is not known.</li>")
    n = int(comparisons["n"].max()) if len(comparisons) else 0
    if 0 < n <= EXACT_MAX and len(comparisons) * 2 / 2**n >= ALPHA:
        out.append(f"<li>With at most {n} features the smallest two-sided p is 2/2<sup>{n}</sup> = {2 / 2**n:.4f}; Holm across "
                   f"{len(comparisons)} comparisons multiplies it by {len(comparisons)}, so no difference can reach {ALPHA}: "
                   "score more features.</li>")
    return f"<ul class=unreliable>{''.join(out)}</ul>" if out else ""


def verdict_section(comparisons, reliability) -> str:
    """The verdict table: which method beats which, on which benchmark, by how much."""
    if not len(comparisons):
        return ""
    head = ("<h2>Verdict</h2><p>Every method against the random-label control and against each other, on the features both "
            "scored (same excerpts): mean paired difference of the headline metric with its 95% bootstrap CI, a two-sided "
            f"sign-flip permutation p-value (exact over all 2<sup>n</sup> sign flips up to {EXACT_MAX} features, else "
            f"{N_PERM:,} seeded random flips), Holm-corrected across the {len(comparisons)} comparisons shown; a method "
            f"<i>beats</i> another when the corrected p is below {ALPHA}.</p>" + _unreliable_words(reliability, comparisons) +
            "<table class=verdict><tr><th>benchmark</th><th>A vs B</th><th class=num>features</th><th class=num>A</th><th class=num>B</th>"
            "<th class=num>A − B (95% CI)</th><th class=num>p</th><th class=num>p (Holm)</th><th>verdict</th></tr>")
    rows = []
    for r in comparisons.to_dict(orient="records"):
        a, b = html.escape(r["method_a"]), html.escape(r["method_b"])
        # pandas gives a missing string as NaN (a float): only a str names a winner or a note
        winner = r["winner"] if isinstance(r["winner"], str) else None
        note = r.get("reliability_note") if isinstance(r.get("reliability_note"), str) else ""
        if winner:
            loser = b if winner == r["method_a"] else a
            verdict = f"<b>{html.escape(winner)}</b> beats {loser} by {_fmt(abs(r['mean_diff']))}"
        else:
            verdict = "no significant difference" if r["n"] else "no common features"
        if "too unreliable" in note:
            verdict += " <i>(too unreliable to compare methods)</i>"
        elif not r["interpretable"]:
            verdict += " <i>(reliability unknown)</i>"
        rows.append(f"<tr><td>{html.escape(r['benchmark'])}</td><td>{a} vs {b}</td><td class=num>{r['n']}</td>"
                    f"<td class=num>{_fmt(r['mean_a'])}</td><td class=num>{_fmt(r['mean_b'])}</td>"
                    f"<td class=num>{_fmt(r['mean_diff'])} ({_fmt(r['ci_low'])} – {_fmt(r['ci_high'])})</td>"
                    f"<td class=num>{_fmt(r['p_value'], 4)} ({r['p_method']})</td><td class=num>{_fmt(r['p_holm'], 4)}</td><td>{verdict}</td></tr>")
    return head + "".join(rows) + "</table>"


def reliability_section(reliability) -> str:
    """Split-half reliability per benchmark × method, in words where it is too low."""
    if not len(reliability):
        return ""
    head = ("<h3>Reliability</h3><p>Each feature's excerpts are dealt into two halves (alternate positives, alternate "
            "negatives) and scored on each from the same answers; the reliability is the Pearson correlation of half A "
            "with half B across features, Spearman–Brown corrected (2r / (1 + r)), with a 95% bootstrap CI over features. "
            f"Below {RELIABILITY_MIN}, or with a CI reaching 0, a benchmark is too unreliable to compare methods on. The "
            "control has no signal to be reliable about.</p><table class=reliability><tr><th>benchmark</th><th>method</th>"
            "<th>metric</th><th class=num>features</th><th class=num>r (halves)</th><th class=num>reliability</th>"
            "<th class=num>95% CI</th><th>verdict</th></tr>")
    rows = []
    for r in reliability.to_dict(orient="records"):
        words = "control" if r["method"] == CONTROL else STATUS_WORDS.get(r.get("status"), "too unreliable to compare methods")
        rows.append(f"<tr><td>{html.escape(r['benchmark'])}</td><td>{html.escape(r['method'])}</td><td>{r['metric'].replace('_', ' ')}</td>"
                    f"<td class=num>{r['n']}</td><td class=num>{_fmt(r['r'])}</td><td class=num>{_fmt(r['reliability'])}</td>"
                    f"<td class=num>{_fmt(r['ci_low'])} – {_fmt(r['ci_high'])}</td><td>{words}</td></tr>")
    return head + "".join(rows) + "</table>"


def scoring_section(run_dir: Path, out: Path, seed: int = 0, verdict: bool = True) -> str:
    """The scoring part of a report (charts written into `out`): the verdict table (unless
    the caller shows it elsewhere), charts, summary, reliability, per-feature scores; ''
    when no scores."""
    if not (run_dir / "scores").exists():
        return ""
    scores = pq.read_table(run_dir / "scores").to_pandas()
    if not len(scores):
        return "<h2>Scores</h2><p>No label was scored.</p>"
    reliability, comparisons = statistics(run_dir, scores, seed)
    summary = aggregate(scores, seed=seed)
    scores_chart(summary, out / "scores_by_method.png")
    gap = gap_chart(scores, out / "embedding_gap.png", seed=seed)
    failed = int(scores["n_failed"].sum())
    shown = int(scores["n_shown"].sum())
    parts = [
        verdict_section(comparisons, reliability) if verdict else "",
        "<h2>Scores</h2>",
        "<p>Headline metric per benchmark: balanced accuracy (detection, fuzz) and AUROC (embedding); chance is 0.5 "
        "(dashed line). Error bars: 95% bootstrap CI over features. <code>random_label</code> scores each feature with "
        "another feature's label (the control).</p>",
        "<img id=chart src='scores_by_method.png' alt='scores by method and benchmark'>",
        "<img src='embedding_gap.png' alt='embedding gap by method'>" if gap else "",
        f"<p>Scorer answers: {shown - failed:,} of {shown:,} excerpts answered; {failed:,} in failed batches "
        f"({100 * failed / max(shown, 1):.1f}%), counted, not dropped.</p>",
        summary_table(summary),
        reliability_section(reliability),
        "<h3>Per feature</h3>",
        per_feature_table(scores),
    ]
    return "".join(parts)


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


def write_benchmark_report(run_dir: str | Path) -> Path:
    from baez_ray.report.routing import write_routing_report

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = manifest["spec"]
    b = spec["benchmark"]
    seed = spec.get("seed", 0)
    labels = pq.read_table(run_dir / "labels").to_pylist()
    split = manifest["stages"].get("split", {})
    st = manifest["stages"]
    head = [f"<h1>Benchmark: {html.escape(manifest['name'])}</h1><table>",
            f"<tr><th>features</th><td>{split.get('sampled', '?')} sampled of {split.get('eligible', '?')} with ≥ {split.get('min_examples', '?')} activating examples</td></tr>",
            f"<tr><th>split</th><td>{html.escape(str(split.get('split')))} (train {spec['score']['train_examples'] if spec.get('score') else 5}, "
            f"test {spec['score']['test_examples'] if spec.get('score') else 10} examples; disjoint)</td></tr>",
            f"<tr><th>scorer</th><td>{html.escape(str(((spec.get('score') or {}).get('scorer') or b['explainer'])['model']))}</td></tr>"]
    for m in b["methods"]:
        s = st.get(f"label:{m}", {})
        head.append(f"<tr><th>{html.escape(m)}</th><td>{s.get('labelled', 0)} labelled, {s.get('failed', 0)} failed; "
                    f"{s.get('input_tokens', 0):,} / {s.get('output_tokens', 0):,} tokens in / out, ${s.get('cost_usd', 0.0):.4f}</td></tr>")
    sc = st.get("score", {})
    head.append(f"<tr><th>scoring</th><td>{sc.get('prompts', 0):,} prompts, {sc.get('failed_prompts', 0)} failed after retries, "
                f"{sc.get('retried_prompts', 0)} retried; {sc.get('scorer_input_tokens', 0):,} / {sc.get('scorer_output_tokens', 0):,} tokens, "
                f"${sc.get('scorer_cost_usd', 0.0):.4f}</td></tr></table>")
    verdict = ""
    if (run_dir / "scores").exists():
        scores = pq.read_table(run_dir / "scores").to_pandas()
        if len(scores):
            reliability, comparisons = statistics(run_dir, scores, seed)
            verdict = verdict_section(comparisons, reliability)
    # the page opens with the verdict, then the run's facts, then the scores behind it
    body = [head[0].replace("<table>", verdict + "<table>", 1), "".join(head[1:]), scoring_section(run_dir, out, seed, verdict=False)]

    compare = b.get("compare") or b["methods"][:2]
    if len(compare) == 2 and compare[0] != compare[1]:
        pairs = distant_pairs(labels, compare[0], compare[1], b.get("n_distant", 10), (spec.get("score") or {}).get("embedder"))
        if pairs:
            train = {(r["sae_id"], r["feature"]): r["examples"] for r in pq.read_table(run_dir / "train", columns=["sae_id", "feature", "examples"]).to_pylist()}
            body.append(f"<h2>Most distant labels: {html.escape(compare[0])} vs {html.escape(compare[1])}</h2>"
                        "<table class=pairs><tr><th>feature</th><th>cosine</th>"
                        f"<th>{html.escape(compare[0])}</th><th>{html.escape(compare[1])}</th><th>train examples</th></tr>")
            for p in pairs:
                ex = "<br>".join(f"<span class=ex>{highlight(e['token_strs'], e['acts'])}</span>" for e in train.get((p["sae_id"], p["feature"]), [])[:3])
                body.append(f"<tr><td>{p['feature']}</td><td class=num>{p['cosine']:.2f}</td><td>{html.escape(p['label_a'])}</td>"
                            f"<td>{html.escape(p['label_b'])}</td><td>{ex}</td></tr>")
            body.append("</table>")
    if (run_dir / "routes").exists():
        routes = pq.read_table(run_dir / "routes")
        taus = {k: spec["route"][k] for k in ("tau_in", "tau_out", "tau_cross")}
        body.append(write_routing_report(routes, out, taus=taus)["html"])
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>baez_ray benchmark</title><style>{STYLE}</style></head><body>"
            f"{''.join(body)}</body></html>")
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
