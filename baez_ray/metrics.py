"""Scoring metrics (SPEC §3): binary metrics for detection and fuzz, gap and AUROC for
embedding, and the aggregation per method × benchmark with bootstrap confidence intervals.

Conventions for degenerate inputs (documented, tested):
* balanced accuracy needs at least one positive and one negative; otherwise NaN.
* precision is NaN when nothing was predicted positive; recall NaN without positives;
  F1 is NaN when precision or recall is NaN, 0 when both are 0.
* AUROC is the Mann–Whitney probability that a random positive outranks a random negative
  (ties count one half); NaN without positives or negatives.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

NAN = float("nan")


def binary_metrics(truth: Sequence[int], pred: Sequence[int]) -> dict[str, float]:
    """balanced_accuracy = (TP/P + TN/N)/2, accuracy, precision, recall, f1."""
    t = np.asarray(truth, dtype=bool)
    p = np.asarray(pred, dtype=bool)
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


def auroc(scores: Sequence[float], truth: Sequence[int]) -> float:
    """Area under the ROC curve of `scores` as a classifier of `truth` (ties count 1/2)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
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
    """gap = mean similarity of positives − mean similarity of negatives, and AUROC."""
    s = np.asarray(sim, dtype=np.float64)
    t = np.asarray(truth, dtype=bool)
    gap = float(s[t].mean() - s[~t].mean()) if t.any() and (~t).any() else NAN
    return {"gap": gap, "auroc": auroc(s, t)}


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
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return m, float(lo), float(hi)


# the headline metric of each benchmark (the bar chart's y axis); chance is 0.5 for both
HEADLINE = {"detection": "balanced_accuracy", "fuzz": "balanced_accuracy", "embedding": "auroc",
            "detection_logprob": "auroc", "fuzz_logprob": "auroc"}
CHANCE = 0.5


def aggregate(scores, seed: int = 0):
    """Scores table (schema.SCORES, pyarrow or pandas) → one row per (method, benchmark):
    n features, headline metric with mean and 95% bootstrap CI, every metric's mean, the
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
            "mean": mean, "ci_low": lo, "ci_high": hi,
            "failure_rate": float(g["n_failed"].sum() / shown) if shown else NAN,
        }
        for m in ("balanced_accuracy", "accuracy", "precision", "recall", "f1", "gap", "auroc"):
            vals = g[m].dropna()
            row[m] = float(vals.mean()) if len(vals) else NAN
        gaps = g["gap"].dropna()
        row["negative_gap_share"] = float((gaps < 0).mean()) if len(gaps) else NAN
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        control = out[out["method"] == "random_label"].set_index("benchmark")["mean"]
        out["random_label_mean"] = [control.get(b, NAN) for b in out["benchmark"]]
    return out
