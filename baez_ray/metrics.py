"""Scoring metrics (SPEC §3): binary metrics for detection, fuzz and intervention, gap and
AUROC for embedding, the correlation of simulated and true activations (simulation), the
aggregation per method × benchmark with bootstrap confidence intervals, the
split-half reliability of every benchmark and the paired comparison of methods.

Conventions for degenerate inputs (documented, tested):
* balanced accuracy needs at least one positive and one negative; otherwise NaN.
* precision is NaN when nothing was predicted positive; recall NaN without positives;
  F1 is NaN when precision or recall is NaN, 0 when both are 0.
* a truth or prediction that is missing (None, NaN) or not 0/1 is an error (ValueError),
  never read as 0 or 1: a failed excerpt must be left out by the caller, and counted.
* the simulation correlation (`simulation_correlation`) is Pearson's r of predicted and
  true activations over all tokens of a feature's answered excerpts; NaN when the true
  activations are constant (nothing to predict), 0 when the predictions are constant and
  the truth is not (a scorer that predicts one value everywhere explains nothing: left
  out as NaN, it would raise a method's mean by dropping its worst features).
* AUROC is the Mann–Whitney probability that a random positive outranks a random negative
  (ties count one half); NaN without positives or negatives. A NaN score cannot be ranked:
  its row is dropped (`drop_nan` says how many; `embedding_metrics` reports `n_dropped`).

Split-half reliability (`split_halves`, `half_scores`, `split_half_reliability`): a
feature's excerpts, in the order shown (shuffled once per feature), are dealt into two
halves: the 1st, 3rd, 5th… positive and the 1st, 3rd, 5th… negative to half A, the others to
half B, so each half has its own positives and negatives (one negatives pool, disjoint
draws). Each (feature, method, benchmark) gets its headline metric on each half from the
answers already at hand (no extra scorer call). Per benchmark × method, the reliability is
the Pearson correlation r of half A against half B across features, corrected to the full
test set by Spearman–Brown, 2r / (1 + r), with a percentile bootstrap CI over features
(resampled features whose halves are constant are skipped). A benchmark × method is
*reliable* when at least 3 features have both halves, the corrected reliability is at least
RELIABILITY_MIN (0.5) and its CI's low end is above 0 (status 'reliable'); otherwise
('too unreliable') its differences between methods are too noisy to mean anything. The
reliability is undefined when a half scored every feature the same ('no spread', e.g. every
label perfect: no spread across features to correlate) or under 3 features ('too few
features'). The corrected reliability is floored at 0: halves that disagree (r ≤ 0) measure
nothing, and 2r / (1 + r) would diverge towards −∞ as r → −1 (the raw r is kept).

Paired comparisons (`paired_comparison`, `sign_flip_p`, `holm`, `comparison_table`): two
methods on the same benchmark are compared on the features both have a headline metric for
(same features, same excerpts): the mean paired difference A − B, its percentile bootstrap
95% CI, and a two-sided sign-flip permutation p-value: the share of the 2^n sign vectors s
with |Σ s·d| ≥ |Σ d|, enumerated exactly for n ≤ EXACT_MAX (16) features, otherwise
estimated from N_PERM (10,000) random sign vectors drawn with a fixed seed as
(1 + hits) / (1 + N_PERM). The p-values of all comparisons in a table are Holm-corrected
together. Every method is compared with the random-label control and with every other
method; a comparison between methods counts as interpretable when each non-control
method's reliability on that benchmark is reliable (the control has no signal to be
reliable about).

Bootstraps and random sign vectors are drawn in blocks of at most BOOT_ELEMENTS values
(`boot_rows`): all replicates at once for small tables (the same draws as one call), fewer
per block at hundreds of thousands of features, so that memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from baez_ray import benchmarks

NAN = float("nan")


def as_binary(values: Sequence, what: str = "value") -> np.ndarray:
    """0/1 values (ints, floats, bools) → a bool array; ValueError naming the first value
    that is missing (None, NaN) or not 0/1, instead of reading it as 0 or 1."""
    vals = list(values)
    for i, v in enumerate(vals):
        if v is None or v != v:  # v != v: NaN
            raise ValueError(f"{what} {i} is missing ({v!r}): leave a failed excerpt out, and count it")
        if isinstance(v, (str, bytes)) or v not in (0, 1):
            raise ValueError(f"{what} {i} is {v!r}, not 0 or 1")
    return np.asarray([bool(v) for v in vals], dtype=bool)


def binary_metrics(truth: Sequence[int], pred: Sequence[int]) -> dict[str, float]:
    """balanced_accuracy = (TP/P + TN/N)/2, accuracy, precision, recall, f1. Every truth
    and prediction must be 0 or 1 (or a bool): a missing one (None, NaN) raises ValueError."""
    t = as_binary(truth, "truth")
    p = as_binary(pred, "prediction")
    if t.shape != p.shape:
        raise ValueError(f"{t.size} truths for {p.size} predictions")
    tp = int((t & p).sum())
    tn = int((~t & ~p).sum())
    fp = int((~t & p).sum())
    fn = int((t & ~p).sum())
    n_pos, n_neg = tp + fn, tn + fp
    recall = tp / n_pos if n_pos else NAN
    specificity = tn / n_neg if n_neg else NAN
    precision = tp / (tp + fp) if (tp + fp) else NAN
    if math.isnan(precision) or math.isnan(recall):
        f1 = NAN
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {
        "balanced_accuracy": (recall + specificity) / 2 if n_pos and n_neg else NAN,
        "accuracy": (tp + tn) / t.size if t.size else NAN,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def drop_nan(scores: Sequence[float], truth: Sequence[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, truth, n_dropped): the rows whose score is a number (None or NaN dropped,
    and counted); a missing truth raises ValueError."""
    s = np.asarray([NAN if x is None else x for x in scores], dtype=np.float64)
    t = as_binary(truth, "truth")
    if s.shape != t.shape:
        raise ValueError(f"{t.size} truths for {s.size} scores")
    keep = ~np.isnan(s)
    return s[keep], t[keep], int((~keep).sum())


def auroc(scores: Sequence[float], truth: Sequence[int]) -> float:
    """Area under the ROC curve of `scores` as a classifier of `truth` (ties count 1/2).
    Rows with a NaN score are dropped (`drop_nan` counts them): NaN has no rank."""
    s, t, _ = drop_nan(scores, truth)
    pos, neg = s[t], s[~t]
    if pos.size == 0 or neg.size == 0:
        return NAN
    # rank-based (Mann–Whitney U) with average ranks for ties
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    allv = np.concatenate([pos, neg])[order]
    ranks = np.empty(allv.size)
    i = 0
    while i < allv.size:
        j = i
        while j + 1 < allv.size and allv[j + 1] == allv[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty(allv.size)
    r[order] = ranks
    u = r[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def embedding_metrics(sim: Sequence[float], truth: Sequence[int]) -> dict[str, float]:
    """gap = mean similarity of positives − mean similarity of negatives, and AUROC, over
    the rows with a number; n_dropped: the rows with a NaN similarity, left out."""
    s, t, dropped = drop_nan(sim, truth)
    gap = float(s[t].mean() - s[~t].mean()) if t.any() and (~t).any() else NAN
    return {"gap": gap, "auroc": auroc(s, t), "n_dropped": dropped}


BOOT_ELEMENTS = 4_000_000  # resampled values a bootstrap or permutation holds at once (32 MB of float64)


def boot_rows(n_rows: int, n: int) -> int:
    """Replicates drawn at once over n values: all `n_rows` while n_rows × n ≤ BOOT_ELEMENTS,
    else fewer per draw, so that memory stays bounded at any number of features (the
    replicates of a draw come from the same seeded generator, in order)."""
    return max(1, min(n_rows, BOOT_ELEMENTS // max(1, n)))


def bootstrap_ci(values: Iterable[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the finite values and the percentile bootstrap
    interval of that mean. NaN values (features whose metric is undefined) are left out;
    (nan, nan, nan) when none is left, (m, m, m) for a single value."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return NAN, NAN, NAN
    m = float(v.mean())
    if v.size == 1:
        return m, m, m
    rng = np.random.default_rng(seed)
    step = boot_rows(n_boot, v.size)
    means = np.concatenate([v[rng.integers(0, v.size, size=(min(step, n_boot - i), v.size))].mean(axis=1) for i in range(0, n_boot, step)])
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return m, float(lo), float(hi)


def simulation_correlation(truth: Sequence[float], pred: Sequence[float]) -> float:
    """Pearson r of predicted against true activations (see the module docstring for the
    constant cases); ValueError when the lengths differ."""
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    if t.shape != p.shape:
        raise ValueError(f"{t.size} true activations for {p.size} predictions")
    if t.size < 2 or np.ptp(t) == 0:
        return NAN
    if np.ptp(p) == 0:
        return 0.0
    dt, dp = t - t.mean(), p - p.mean()
    return float(np.clip((dt * dp).sum() / math.sqrt((dt * dt).sum() * (dp * dp).sum()), -1.0, 1.0))


# the headline metric of each benchmark (the bar chart's y axis), its side (input: what
# makes the feature fire; output: what it does), from the registry (benchmarks.py)
HEADLINE = {b: benchmarks.get(b).headline for b in benchmarks.names()}
SIDE = {b: benchmarks.side(b) for b in benchmarks.names()}
CHANCE = 0.5  # the chance level of most headline metrics; each benchmark's own: chance(b)


def chance(benchmark: str) -> float:
    """The chance level of a benchmark's headline metric (the registry's)."""
    return benchmarks.get(benchmark).chance


def aggregate(scores, seed: int = 0):
    """Scores table (schema.SCORES, pyarrow or pandas) → one row per (method, benchmark):
    n features (`n_features`: rows; `n_scored`: those whose headline metric is defined,
    the n of the mean), headline metric with mean and 95% bootstrap CI, every metric's mean, the
    failure rate (examples in failed batches / examples shown), the share of negative gaps
    (embedding), and the random-label control's mean beside each method."""
    import pandas as pd

    df = scores if isinstance(scores, pd.DataFrame) else scores.to_pandas()
    rows = []
    for (method, bench), g in df.groupby(["method", "benchmark"], sort=True):
        metric = HEADLINE[bench]
        mean, lo, hi = bootstrap_ci(g[metric].tolist(), seed=seed)
        shown = int(g["n_shown"].sum())
        row = {
            "method": method, "benchmark": bench, "n_features": int(len(g)), "metric": metric,
            "n_scored": int(np.isfinite(g[metric].to_numpy(dtype=np.float64, na_value=np.nan)).sum()),
            "mean": mean, "ci_low": lo, "ci_high": hi,
            "failure_rate": float(g["n_failed"].sum() / shown) if shown else NAN,
        }
        for m in ("balanced_accuracy", "accuracy", "precision", "recall", "f1", "gap", "auroc", "correlation"):
            vals = g[m].dropna() if m in g.columns else ()  # (a scores table written before the column)
            row[m] = float(vals.mean()) if len(vals) else NAN
        gaps = g["gap"].dropna()
        row["negative_gap_share"] = float((gaps < 0).mean()) if len(gaps) else NAN
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        control = out[out["method"] == "random_label"].set_index("benchmark")["mean"]
        out["random_label_mean"] = [control.get(b, NAN) for b in out["benchmark"]]
    return out


# ---------------------------------------------------------------- split-half reliability

RELIABILITY_MIN = 0.5  # below it (or with a CI reaching 0) a benchmark × method is too unreliable
MIN_FEATURES = 3  # features with both halves needed for a correlation
ALPHA = 0.05  # family-wise error rate of the Holm-corrected comparisons
EXACT_MAX = 16  # sign-flip p-values are exact (2^n sign vectors) up to this many features
N_PERM = 10_000  # random sign vectors above it
CONTROL = "random_label"


def split_halves(truth: Sequence[int]) -> np.ndarray:
    """Half (0: A, 1: B) of each excerpt in the order shown: the k-th positive and the
    k-th negative go to half k % 2, so each half has its own positives and negatives."""
    t = as_binary(truth, "truth")
    half = np.empty(t.size, dtype=np.int8)
    for kind in (True, False):
        where = np.flatnonzero(t == kind)
        half[where] = np.arange(where.size) % 2
    return half


def half_scores(truth: Sequence[int], values: Sequence, metric: str) -> tuple[float, float]:
    """The headline `metric` ('balanced_accuracy' of 0/1 predictions, or 'auroc' of
    similarities) on half A and half B of one feature's excerpts (`split_halves` of the
    whole `truth`, failed excerpts included). An excerpt whose value is None (a failed
    batch) or NaN is left out of its half; NaN where a half's metric is undefined."""
    half = split_halves(truth)
    out = []
    for h in (0, 1):
        keep = [i for i in np.flatnonzero(half == h) if values[i] is not None and values[i] == values[i]]
        t = [truth[i] for i in keep]
        v = [values[i] for i in keep]
        if metric == "balanced_accuracy":
            out.append(binary_metrics(t, v)["balanced_accuracy"] if t else NAN)
        elif metric == "auroc":
            out.append(auroc(v, t) if t else NAN)
        else:
            raise ValueError(f"no half score for metric {metric!r}")
    return out[0], out[1]


def spearman_brown(r: float) -> float:
    """Reliability of the full test from the correlation r of its two halves: 2r / (1 + r),
    floored at 0 (halves that disagree, r ≤ 0, measure nothing: the formula would diverge
    towards −∞ as r → −1); NaN for NaN."""
    return max(0.0, 2 * r / (1 + r)) if math.isfinite(r) and r > -1 else (0.0 if math.isfinite(r) else NAN)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of a against the same row of b (NaN where one is constant)."""
    da = a - a.mean(axis=-1, keepdims=True)
    db = b - b.mean(axis=-1, keepdims=True)
    den = np.sqrt((da * da).sum(axis=-1) * (db * db).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (da * db).sum(axis=-1) / den
    return np.where(den > 1e-12, np.clip(r, -1.0, 1.0), NAN)


def split_half_reliability(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                           seed: int = 0) -> dict[str, float]:
    """Half-A and half-B scores of the same features → n (features with both halves), r
    (Pearson), reliability (Spearman–Brown of r), its percentile bootstrap CI over
    features, `reliable` (the module's rule) and `status`: 'reliable', 'too unreliable',
    'no spread' (a half scored every feature the same, e.g. all perfect: r undefined) or
    'too few features' (under MIN_FEATURES with both halves)."""
    x = np.asarray([NAN if v is None else v for v in a], dtype=np.float64)
    y = np.asarray([NAN if v is None else v for v in b], dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out = {"n": int(x.size), "r": NAN, "reliability": NAN, "ci_low": NAN, "ci_high": NAN, "reliable": False,
           "status": "too few features"}
    if x.size < MIN_FEATURES:
        return out
    r = float(_pearson_rows(x, y))
    out.update(r=r, reliability=spearman_brown(r), status="no spread" if math.isnan(r) else "too unreliable")
    if math.isnan(r):  # a half scored every feature the same (e.g. all perfect): nothing to correlate
        return out
    rng, step = np.random.default_rng(seed), boot_rows(n_boot, x.size)
    draws = (rng.integers(0, x.size, size=(min(step, n_boot - i), x.size)) for i in range(0, n_boot, step))
    rb = np.concatenate([_pearson_rows(x[idx], y[idx]) for idx in draws])
    rb = rb[np.isfinite(rb) & (rb > -1)]
    if rb.size:
        sb = np.maximum(2 * rb / (1 + rb), 0.0)  # floored at 0, as spearman_brown
        lo, hi = np.quantile(sb, [(1 - level) / 2, 1 - (1 - level) / 2])
        out.update(ci_low=float(lo), ci_high=float(hi))
    out["reliable"] = bool(math.isfinite(out["reliability"]) and out["reliability"] >= RELIABILITY_MIN
                           and math.isfinite(out["ci_low"]) and out["ci_low"] > 0)
    out["status"] = "reliable" if out["reliable"] else "too unreliable"
    return out


# ---------------------------------------------------------------- paired comparisons

def sign_flip_p(diffs: Sequence[float], n_perm: int = N_PERM, seed: int = 0, exact_max: int = EXACT_MAX) -> tuple[float, str]:
    """Two-sided sign-flip permutation p-value of the mean of paired differences: the share
    of sign vectors s with |Σ s·d| ≥ |Σ d|. Exact over all 2^n vectors for n ≤ exact_max
    ('exact'); else (1 + hits) / (1 + n_perm) over n_perm seeded random vectors
    ('monte carlo'). (nan, 'none') without differences."""
    d = np.asarray(diffs, dtype=np.float64)
    n = d.size
    if n == 0:
        return NAN, "none"
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # sums equal up to rounding count as ties
    if n <= exact_max:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        hits = int((np.abs(signs @ d) >= observed - tol).sum())
        return hits / 2**n, "exact"
    rng = np.random.default_rng(seed)
    hits = 0
    step = boot_rows(1000, n)
    for start in range(0, n_perm, step):
        signs = 1 - 2 * rng.integers(0, 2, size=(min(step, n_perm - start), n), dtype=np.int8)
        hits += int((np.abs(signs @ d) >= observed - tol).sum())
    return (1 + hits) / (1 + n_perm), "monte carlo"


def paired_comparison(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0,
                      n_perm: int = N_PERM) -> dict:
    """Paired scores of two methods on the same features → n (pairs where both are
    numbers), mean_a, mean_b, mean_diff (a − b) with its 95% bootstrap CI, and the sign-flip
    p-value with how it was computed."""
    x = np.asarray([NAN if v is None else v for v in a], dtype=np.float64)
    y = np.asarray([NAN if v is None else v for v in b], dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} scores paired with {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    d = x[keep] - y[keep]
    mean, lo, hi = bootstrap_ci(d.tolist(), n_boot=n_boot, seed=seed)
    p, how = sign_flip_p(d, n_perm=n_perm, seed=seed)
    return {"n": int(d.size), "mean_a": float(x[keep].mean()) if d.size else NAN, "mean_b": float(y[keep].mean()) if d.size else NAN,
            "mean_diff": mean, "ci_low": lo, "ci_high": hi, "p_value": p, "p_method": how}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values becomes
    max over j ≤ i of min(1, (m − j + 1) · p_(j)). NaN stays NaN and is not counted in m."""
    p = np.asarray([NAN if v is None else v for v in pvalues], dtype=np.float64)
    out = np.full(p.size, NAN)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = order.size, 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out.tolist()


def _scores_frame(scores):
    import pandas as pd

    df = scores if isinstance(scores, pd.DataFrame) else scores.to_pandas()
    for col in ("score_half_a", "score_half_b"):  # scores written before the halves were kept
        if col not in df.columns:
            df = df.assign(**{col: NAN})
    return df


def method_order(methods: Iterable[str]) -> list[str]:
    """Methods sorted by name, the random-label control last."""
    ms = sorted(set(methods))
    return [m for m in ms if m != CONTROL] + ([CONTROL] if CONTROL in ms else [])


def reliability_table(scores, seed: int = 0):
    """Scores table → one row per (benchmark, method): the headline metric, features with
    both halves, Pearson r of half A vs half B, the Spearman–Brown reliability with its
    bootstrap 95% CI, and `reliable` (see the module docstring)."""
    import pandas as pd

    df = _scores_frame(scores)
    rows = []
    for (bench, method), g in df.groupby(["benchmark", "method"], sort=True):
        rel = split_half_reliability(g["score_half_a"].tolist(), g["score_half_b"].tolist(), seed=seed)
        rows.append({"benchmark": bench, "method": method, "metric": HEADLINE[bench], **rel})
    cols = ["benchmark", "method", "metric", "n", "r", "reliability", "ci_low", "ci_high", "reliable", "status"]
    return pd.DataFrame(rows, columns=cols)


def comparison_table(scores, reliability=None, seed: int = 0):
    """Scores table → one row per (benchmark, method a, method b): every method against the
    random-label control, then every pair of methods, on the features both scored (a pair
    with no feature in common is left out)
    (`paired_comparison` of the headline metric, a − b), the p-values Holm-corrected
    across all rows (`p_holm`), the `winner` (the better of the two when p_holm < ALPHA,
    else None), `interpretable` (every non-control method of the pair reliable on that
    benchmark, from `reliability`, computed when not given) and `reliability_note` (the
    status of each non-control method that is not, e.g. 'b: too unreliable')."""
    import pandas as pd

    df = _scores_frame(scores)
    rel = reliability_table(df, seed=seed) if reliability is None else reliability
    status = {(r["benchmark"], r["method"]): r["status"] for r in rel.to_dict(orient="records")}
    rows = []
    for bench, g in df.groupby("benchmark", sort=True):
        metric = HEADLINE[bench]
        wide = g.pivot_table(index=["sae_id", "feature"], columns="method", values=metric, aggfunc="first", dropna=False)
        methods = method_order(g["method"])
        plain = [m for m in methods if m != CONTROL]
        pairs = [(m, CONTROL) for m in plain if CONTROL in methods] + [(a, b) for i, a in enumerate(plain) for b in plain[i + 1 :]]
        for a, b in pairs:
            cmp = paired_comparison(wide[a].tolist() if a in wide else [], wide[b].tolist() if b in wide else [], seed=seed)
            if not cmp["n"]:  # no feature scored by both (a label job routes features to different methods)
                continue
            notes = [f"{m}: {status.get((bench, m), 'no halves')}" for m in (a, b) if m != CONTROL and status.get((bench, m)) != "reliable"]
            rows.append({"benchmark": bench, "metric": metric, "method_a": a, "method_b": b, **cmp, "interpretable": not notes,
                         "reliability_note": "; ".join(notes)})
    out = pd.DataFrame(rows, columns=["benchmark", "metric", "method_a", "method_b", "n", "mean_a", "mean_b", "mean_diff", "ci_low",
                                      "ci_high", "p_value", "p_method", "interpretable", "reliability_note"])
    out["p_holm"] = holm(out["p_value"].tolist()) if len(out) else []
    out["winner"] = [(r.method_a if r.mean_diff > 0 else r.method_b) if r.p_holm < ALPHA and r.mean_diff != 0 else None
                     for r in out.itertuples()]
    return out
