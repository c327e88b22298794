"""Scores that mean something (SPEC §3, issue 15): the edge cases of the public metric and
parse functions, split-half reliability against hand-computed cases, the sign-flip
permutation p-value against an exact enumeration, Holm on a hand case, the per-method
comparison tables, and the report's verdict and reliability sections from real Parquet."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from baez_ray import schema
from baez_ray.llm.prompts import parse_binary_list
from baez_ray.metrics import (
    auroc, binary_metrics, comparison_table, drop_nan, embedding_metrics, half_scores, holm, paired_comparison,
    reliability_table, sign_flip_p, spearman_brown, split_half_reliability, split_halves,
)

NAN = float("nan")

# ------------------------------------------------------------------ edge cases


def test_parse_binary_list_refuses_empty_slots():
    # a skipped excerpt would shift every later answer: refused (the scorer is asked again)
    values, problem = parse_binary_list("[1,,0,1,0,1]", 5)
    assert values is None and "empty slot" in problem
    assert parse_binary_list("[,1,0,1,0]", 4)[0] is None
    assert parse_binary_list("[1,0,1,0,,]", 4)[0] is None
    assert parse_binary_list("[1, '', 0]", 2)[0] is None
    # a single trailing comma is Python's list syntax, not a slot
    assert parse_binary_list("[1, 0, 1,]", 3) == ([1, 0, 1], None)
    assert parse_binary_list("[1, 0, 1,]", 4)[1] == "the list has 3 values, not 4"


def test_binary_metrics_refuse_missing_predictions():
    for bad in (NAN, None, np.nan, 2, "1"):
        with pytest.raises(ValueError):
            binary_metrics([1, 0, 1], [1, bad, 0])
    with pytest.raises(ValueError, match="truth 0 is missing"):
        binary_metrics([None, 0], [1, 0])
    # valid inputs keep their values: floats 0.0/1.0, bools and numpy ints read as before
    ref = binary_metrics([1, 1, 1, 0], [1, 1, 0, 0])
    assert binary_metrics(np.array([1, 1, 1, 0], dtype=np.int8), [1.0, True, 0.0, False]) == ref


def test_auroc_drops_nan_rows_and_counts_them():
    # NaN used to rank above every value: here it would have been a negative ranked first
    assert auroc([0.9, NAN, 0.3, 0.1], [1, 0, 1, 0]) == 1.0 == auroc([0.9, 0.3, 0.1], [1, 1, 0])
    assert auroc([NAN, 0.2, 0.1], [1, 1, 0]) == 1.0
    assert math.isnan(auroc([NAN, 0.2], [0, 1]))  # no negative left
    s, t, dropped = drop_nan([0.5, None, NAN, 0.1], [1, 1, 0, 0])
    assert s.tolist() == [0.5, 0.1] and t.tolist() == [True, False] and dropped == 2
    e = embedding_metrics([0.9, NAN, 0.3, 0.1], [1, 0, 1, 0])
    assert e["n_dropped"] == 1 and e["auroc"] == 1.0 and e["gap"] == pytest.approx(0.6 - 0.1)
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [1, None])


# ------------------------------------------------------------------ split-half reliability


def test_split_halves_and_half_scores_hand_computed():
    truth = [1, 0, 0, 1, 1, 0, 1, 0, 1]
    # positives at 0, 3, 4, 6, 8 → halves A B A B A; negatives at 1, 2, 5, 7 → A B A B
    assert split_halves(truth).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0]
    truth = [1, 0, 1, 0, 1, 0, 1, 0]  # half A: excerpts 0, 1, 4, 5; half B: 2, 3, 6, 7
    pred = [1, 0, 0, 1, 1, None, 1, 1]  # excerpt 5 was in a failed batch
    # A: positives 0, 4 both right (1.0), negative 1 right (5 left out) → 1.0
    # B: positives 2 wrong, 6 right (0.5); negatives 3, 7 wrong (0.0) → 0.25
    assert half_scores(truth, pred, "balanced_accuracy") == (1.0, 0.25)
    sim = [0.9, 0.1, 0.2, 0.3, 0.8, NAN, 0.4, 0.5]
    # A: positives 0.9, 0.8 vs negative 0.1 → 1.0; B: positives 0.2, 0.4 vs 0.3, 0.5 → 1 of 4 pairs
    assert half_scores(truth, sim, "auroc") == (1.0, 0.25)


def test_split_half_reliability_hand_computed():
    # deviations (−1, 0, 1) and (−1, 1, 0): r = 1 / √(2·2) = 0.5, Spearman–Brown 2·0.5/1.5 = 2/3
    rel = split_half_reliability([1, 2, 3, NAN], [1, 3, 2, 0.5])
    assert rel["n"] == 3 and rel["r"] == pytest.approx(0.5) and rel["reliability"] == pytest.approx(2 / 3)
    assert rel["ci_low"] <= rel["reliability"] <= rel["ci_high"]
    # four features: a = (0.5, 0.6, 0.7, 0.8), b = (0.6, 0.5, 0.8, 0.7):
    # deviations (−.15, −.05, .05, .15) and (−.05, −.15, .15, .05): Σab = .0075+.0075+.0075+.0075 = .03,
    # Σa² = Σb² = .05 → r = 0.6, reliability = 1.2 / 1.6 = 0.75
    rel = split_half_reliability([0.5, 0.6, 0.7, 0.8], [0.6, 0.5, 0.8, 0.7])
    assert rel["r"] == pytest.approx(0.6) and rel["reliability"] == pytest.approx(0.75)
    assert spearman_brown(0.0) == 0.0 and spearman_brown(1.0) == 1.0 and math.isnan(spearman_brown(NAN))
    assert spearman_brown(-0.5) == 0.0 and spearman_brown(-1.0) == 0.0  # disagreeing halves: floored at 0, never -inf
    # identical halves on many features: reliable; independent noise: not
    rng = np.random.default_rng(0)
    x = rng.uniform(0.4, 1.0, 40)
    good = split_half_reliability(x, x + rng.normal(0, 0.02, 40))
    assert good["reliable"] and good["status"] == "reliable"
    noise = split_half_reliability(rng.uniform(size=40), rng.uniform(size=40))
    assert not noise["reliable"] and noise["ci_low"] < 0.5 and noise["status"] == "too unreliable"
    # too few features, or a constant half (every label perfect): undefined, never reliable
    few = split_half_reliability([0.1, 0.2], [0.1, 0.2])
    assert math.isnan(few["reliability"]) and few["status"] == "too few features"
    const = split_half_reliability([1.0] * 5, [0.2, 0.4, 0.6, 0.8, 1.0])
    assert math.isnan(const["r"]) and not const["reliable"] and const["status"] == "no spread"


# ------------------------------------------------------------------ paired comparisons


def exact_p(d) -> float:
    """Two-sided sign-flip p-value by brute force over every sign vector."""
    d = list(d)
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= abs(sum(d)) - 1e-12 for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_sign_flip_p_equals_exact_enumeration():
    # d = (1, 2, 3): signed sums ±6, ±4, ±2, 0, 0; |sum| ≥ 6 for 2 of 8
    assert sign_flip_p([1, 2, 3]) == (0.25, "exact")
    assert sign_flip_p([0.0, 0.0]) == (1.0, "exact")
    rng = np.random.default_rng(7)
    for n in (1, 5, 11):
        d = rng.normal(0.3, 1.0, n)
        p, how = sign_flip_p(d)
        assert how == "exact" and p == pytest.approx(exact_p(d), abs=1e-15)
    # ties in |sum| (integer differences) are counted as at least as extreme
    d = [1, 1, 1, 1, -1, 2]
    assert sign_flip_p(d)[0] == exact_p(d)
    # above EXACT_MAX: Monte Carlo with a fixed seed, close to the exact value
    d = rng.normal(0.4, 1.0, 17)
    exact, _ = sign_flip_p(d, exact_max=17)
    mc, how = sign_flip_p(d, n_perm=20_000)
    assert how == "monte carlo" and abs(mc - exact) < 0.02 and sign_flip_p(d, n_perm=20_000)[0] == mc
    assert math.isnan(sign_flip_p([])[0])


def test_holm_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 (m = 4) → 0.02, 0.03, 0.06, max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = holm([0.5, NAN, 0.2])  # NaN is not a comparison: m = 2
    assert adj[0] == pytest.approx(0.5) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.4)
    assert holm([0.9, 0.8]) == [1.0, 1.0]
    assert holm([]) == []


def test_paired_comparison_uses_the_features_both_scored():
    c = paired_comparison([0.9, 0.8, NAN, 0.7], [0.5, 0.6, 0.5, None])
    assert c["n"] == 2 and c["mean_diff"] == pytest.approx(0.3) and c["mean_a"] == pytest.approx(0.85)
    assert c["p_value"] == exact_p([0.4, 0.2]) == 0.5 and c["p_method"] == "exact"
    with pytest.raises(ValueError):
        paired_comparison([0.1], [0.1, 0.2])


def scores_frame(n: int = 12, seed: int = 0) -> pd.DataFrame:
    """A SCORES-like table: 'good' tracks each feature's difficulty on both halves (reliable)
    and beats 'noisy' (independent halves) and the control, on detection."""
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.6, 1.0, n)
    rows = []
    for f in range(n):
        for method, a, b in (("good", difficulty[f], difficulty[f] - 0.02), ("noisy", rng.uniform(0.4, 0.8), rng.uniform(0.4, 0.8)),
                             ("random_label", 0.5, 0.5)):
            rows.append({"sae_id": "s", "layer": 0, "feature": f, "method": method, "benchmark": "detection", "label": "x",
                         "n_shown": 20, "n_failed": 0, "balanced_accuracy": (a + b) / 2, "score_half_a": a, "score_half_b": b,
                         "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    return schema.conform(pa.Table.from_pylist(rows), schema.SCORES).to_pandas()


def test_reliability_and_comparison_tables():
    df = scores_frame()
    rel = reliability_table(df).set_index("method")
    assert rel.loc["good", "reliable"] and rel.loc["good", "reliability"] > 0.9
    assert not rel.loc["noisy", "reliable"] and math.isnan(rel.loc["random_label", "r"])  # constant control halves
    cmp = comparison_table(df)
    assert [(r.method_a, r.method_b) for r in cmp.itertuples()] == [("good", "random_label"), ("noisy", "random_label"), ("good", "noisy")]
    good = cmp.iloc[0]
    diffs = df[df.method == "good"]["balanced_accuracy"].to_numpy() - 0.5
    assert good["n"] == 12 and good["p_method"] == "exact" and good["p_value"] == pytest.approx(exact_p(diffs))
    assert cmp["p_holm"].tolist() == pytest.approx(holm(cmp["p_value"].tolist()))
    assert good["winner"] == "good" and good["interpretable"]
    assert cmp.iloc[2]["winner"] == "good" and not cmp.iloc[2]["interpretable"]  # 'noisy' is not reliable
    assert cmp.iloc[2]["reliability_note"] == "noisy: too unreliable" and cmp.iloc[0]["reliability_note"] == ""
    # scores written before the halves were kept: reliability undefined, comparisons still made
    old = comparison_table(df.drop(columns=["score_half_a", "score_half_b"]))
    assert not old["interpretable"].any() and old.iloc[0]["winner"] == "good"
    assert old.iloc[0]["reliability_note"] == "good: too few features"
    # a method that shares no feature with another (a label job's tiers) is not compared with it
    apart = df[df.method == "noisy"].assign(method="apart", feature=lambda g: g["feature"] + 100)
    pairs = comparison_table(pd.concat([df, apart]))[["method_a", "method_b"]].apply(tuple, axis=1).tolist()
    assert ("apart", "random_label") not in pairs and ("apart", "good") not in pairs and ("good", "noisy") in pairs


def test_scoring_section_opens_with_the_verdict(tmp_path):
    """The label job's report shows the verdict and reliability from its scores/ alone."""
    from baez_ray.report.benchmark import scoring_section
    from baez_ray.rundir import write_table

    write_table(schema.conform(pa.Table.from_pandas(scores_frame(), preserve_index=False), schema.SCORES), tmp_path / "scores")
    page = scoring_section(tmp_path, tmp_path)
    assert page.index("<table class=verdict>") < page.index("<h2>Scores</h2>") < page.index("<table class=reliability>")
    assert "<b>good</b> beats random_label by" in page
    assert "<b>detection</b> is too unreliable to compare methods for noisy" in page
    assert "(too unreliable to compare methods)" in page  # good vs noisy
    assert "<table class=verdict>" not in scoring_section(tmp_path, tmp_path, verdict=False)
    # every label perfect: no spread across features, the reliability is unknown (not "too unreliable")
    perfect = scores_frame().assign(score_half_a=1.0, score_half_b=1.0)
    (tmp_path / "p").mkdir()
    write_table(schema.conform(pa.Table.from_pandas(perfect, preserve_index=False), schema.SCORES), tmp_path / "p" / "scores")
    page = scoring_section(tmp_path / "p", tmp_path / "p")
    assert "reliability is unknown for good (undefined: a half scored every feature the same" in page
    assert "(too unreliable to compare methods)" not in page and "is too unreliable to compare methods for" not in page and "(reliability unknown)" in page


def test_verdict_rows_read_back_with_missing_strings():
    """A comparisons table read back through pandas/Parquet has NaN where no method won and
    where no note was written (the demo's case): the verdict says no significant difference."""
    from baez_ray.report.benchmark import verdict_section

    cmp = comparison_table(scores_frame())
    back = pa.Table.from_pandas(cmp.assign(winner=[None] * len(cmp)), preserve_index=False).to_pandas()
    back["winner"], back["reliability_note"] = np.nan, np.nan  # what a column of missing strings can come back as
    assert back["winner"].isna().all()
    page = verdict_section(back, reliability_table(scores_frame()))
    assert page.count("no significant difference") == len(cmp) and "beats" not in page.split("</p>", 1)[1]
