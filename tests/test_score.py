"""Scoring (SPEC §3) and the benchmark job (SPEC §5): metrics against hand-computed cases,
train/test splits that never overlap, scorers through real Ray Data and the real openai
backend against a deterministic local scorer (an HTTP server on 127.0.0.1), parse failures
retried then counted, and a whole benchmark run with its report."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.config import LLMConfig, ScoreConfig
from baez_ray.metrics import aggregate, auroc, binary_metrics, bootstrap_ci, embedding_metrics
from baez_ray.llm.prompts import parse_binary_list
from baez_ray.stages.split import identity, split_examples
from helpers import FILLER, WORDS, Scorer, as_dataset, guard_driver, scorer_cfg, synthetic_features  # noqa: F401

# ------------------------------------------------------------------ metrics


def test_binary_metrics_hand_computed():
    m = binary_metrics([1, 1, 0, 0], [1, 0, 0, 1])  # TP 1, FN 1, TN 1, FP 1
    assert m == {"balanced_accuracy": 0.5, "accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5}
    m = binary_metrics([1, 1, 1, 0], [1, 1, 0, 0])  # TP 2, FN 1, TN 1, FP 0
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["accuracy"] == 0.75 and m["precision"] == 1.0 and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(0.8)
    # imbalanced: balanced accuracy is not fooled by always answering 0
    m = binary_metrics([1, 0, 0, 0, 0], [0, 0, 0, 0, 0])
    assert m["accuracy"] == 0.8 and m["balanced_accuracy"] == 0.5 and math.isnan(m["precision"]) and math.isnan(m["f1"])
    # no negatives: balanced accuracy undefined
    assert math.isnan(binary_metrics([1, 1], [1, 0])["balanced_accuracy"])
    with pytest.raises(ValueError):
        binary_metrics([1, 0], [1])


def test_auroc_gap_and_bootstrap_hand_computed():
    # positives 0.9, 0.3; negatives 0.8, 0.1: 3 of 4 pairs ordered correctly
    assert auroc([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0]) == 0.75
    assert auroc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts one half
    assert auroc([0.2, 0.1, 0.3], [1, 1, 0]) == 0.0
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    e = embedding_metrics([0.9, 0.8, 0.3, 0.1], [1, 0, 1, 0])
    assert e["gap"] == pytest.approx((0.9 + 0.3) / 2 - (0.8 + 0.1) / 2) and e["auroc"] == 0.75
    assert bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7, 0.7))
    mean, lo, hi = bootstrap_ci([0.0, 1.0] * 50 + [float("nan")])
    assert mean == 0.5 and lo < 0.5 < hi and hi - lo < 0.3
    assert all(math.isnan(x) for x in bootstrap_ci([float("nan")]))


def test_parse_binary_list():
    assert parse_binary_list("[1, 0, 1]", 3) == ([1, 0, 1], None)
    assert parse_binary_list("Sure! Answer: [true, false, True]", 3) == ([1, 0, 1], None)
    assert parse_binary_list("first [0,0] then [1,1,0]", 3) == ([1, 1, 0], None)
    assert parse_binary_list("[1, 0]", 3)[1] == "the list has 2 values, not 3"
    assert parse_binary_list("[1, 2, 0]", 3)[0] is None
    assert parse_binary_list("no idea", 3)[0] is None
    assert parse_binary_list(None, 3)[0] is None
    assert parse_binary_list("[1,,0,1,0,1]", 5)[0] is None  # an empty slot is not skipped (tests/test_statistics.py)


# ------------------------------------------------------------------ synthetic features

def test_negatives_are_other_features_examples_drawn_uniformly():
    """Each feature's negatives (one block): n_negatives distinct examples of other
    features, seeded per feature; over many seeds every other feature's example is drawn
    about equally often."""
    from baez_ray.stages.score import block_items

    def ex(f, j):
        return {"token_strs": [f"f{f}e{j}", " x"], "acts": [1.0, 0.0]}

    tests = {("s", f): [ex(f, j) for j in range(1 + f % 4)] for f in range(6)}
    cfg = ScoreConfig(test_examples=10, n_negatives=3)
    seen = Counter()
    for seed in range(400):
        for it in block_items(tests, cfg, seed):
            f = it["feature"]
            negs = [text for text, truth in zip(it["plain"], it["truth"]) if truth == 0]
            assert len(negs) == 3 and len(set(negs)) == 3
            assert not any(n.startswith(f"f{f}e") for n in negs)
            if f == 0:
                seen.update(negs)
    others = [f"f{f}e{j} x" for f in range(1, 6) for j in range(1 + f % 4)]
    assert sorted(seen) == sorted(others)
    share = np.array([seen[o] for o in others]) / (400 * 3)
    assert np.all(np.abs(share - 1 / len(others)) < 0.04)


def brute_force_items(tests: dict, cfg: ScoreConfig, seed: int, block_features: int) -> dict:
    """The negatives rule of stages/score.py, written out: keys in order, block of the i-th
    key i * n_blocks // N; a feature's negatives drawn (rng seeded per feature) from the
    list of the other features' test examples of its block, built by scanning the block."""
    from baez_ray.stages.score import example_text, fuzz_text
    from baez_ray.stages.split import feature_seed

    keys = sorted(tests)
    n_blocks = math.ceil(len(keys) / block_features)
    block = {k: i * n_blocks // len(keys) for i, k in enumerate(keys)}
    out = {}
    for key in keys:
        others = [e for k in keys if k != key and block[k] == block[key] for e in tests[k]]
        rng = np.random.default_rng(feature_seed(seed, *key))
        pos = tests[key][: cfg.test_examples]
        neg = [others[i] for i in rng.choice(len(others), size=min(cfg.n_negatives, len(others)), replace=False)] if others else []
        marks = [{i for i, a in enumerate(e["acts"]) if a >= cfg.fuzz_threshold * max(e["acts"])} for e in pos]
        n_mark = max(1, round(float(np.mean([len(m) for m in marks]))))
        marks += [set(rng.choice(len(e["token_strs"]), size=min(n_mark, len(e["token_strs"])), replace=False).tolist()) for e in neg]
        examples, truth = pos + neg, [1] * len(pos) + [0] * len(neg)
        order = rng.permutation(len(examples))
        out[key] = {"plain": [example_text(examples[i]) for i in order], "fuzz": [fuzz_text(examples[i], marks[i]) for i in order],
                    "truth": [truth[i] for i in order], "block": block[key]}
    return out


def test_items_by_block_match_brute_force(ray_local):
    """The streaming items (Ray Data: tag each feature with its block, groupby block,
    build in the workers) are those of the rule written out in full, here with blocks of
    at most 5 features (12 features of two SAEs: 3 blocks of 4); with one block (N <=
    block_features) every other feature's examples are candidates."""
    from baez_ray.ray_pool import gather
    from baez_ray.stages.score import items_dataset

    feats = synthetic_features().to_pylist()
    tests = {(sae, r["feature"]): split_examples(r["examples"], "top", 5, 3 + r["feature"] % 4)[1]
             for r in feats for sae in ("a", "b") if (sae == "a") == (r["feature"] < 7)}
    cfg = ScoreConfig(n_negatives=6)
    for block_features, n_blocks in ((5, 3), (256, 1)):
        got = gather(items_dataset(*as_dataset(tests), cfg, seed=4, block_features=block_features)).to_pylist()
        want = brute_force_items(tests, cfg, 4, block_features)
        assert sorted((r["sae_id"], r["feature"]) for r in got) == sorted(want)
        assert len({w["block"] for w in want.values()}) == n_blocks
        for r in got:
            w = want[(r["sae_id"], r["feature"])]
            assert (r["plain"], r["fuzz"], r["truth"]) == (w["plain"], w["fuzz"], w["truth"])
            assert r["truth"].count(0) == 6
            own = {example_text_of(e) for e in tests[(r["sae_id"], r["feature"])]}
            mates = {example_text_of(e) for k, v in tests.items() if want[k]["block"] == w["block"] for e in v}
            negs = [t for t, y in zip(r["plain"], r["truth"]) if y == 0]
            assert not set(negs) & own and set(negs) <= mates


def example_text_of(e: dict) -> str:
    from baez_ray.stages.score import example_text

    return example_text(e)


def test_driver_never_holds_examples_prompts_or_answers(ray_local, scorer_server, tmp_path, monkeypatch):
    """The label job's sample and score stage with the driver barred from examples,
    prompts and answers: a Parquet read of `examples` in the driver fails, and so does any
    Dataset batch that reaches the driver with an examples, items, prompt or answer
    column. The stages still run: they read keys and counts only."""
    import ray

    from baez_ray.config import LabelScoreConfig
    from baez_ray.stages.split import _held_out, held_out_sample
    from baez_ray.rundir import write_table
    from baez_ray.stages.score import score_labels

    feats = synthetic_features().to_pylist()
    for r in feats:  # decile samples of their own (synthetic_features repeats top examples): 6 held out each
        r["examples"] = [{**e, "context_id": e["context_id"] + 10**6} if e["kind"] == "sample" else e for e in r["examples"]]
    write_table(schema.conform(pa.Table.from_pylist(feats), schema.FEATURES), tmp_path / "features", rows_per_file=4)
    labels = schema.conform(pa.Table.from_pylist(
        [{"sae_id": "syn", "layer": 3, "feature": f, "method": "exact", "label": w, "n_examples": 5, "input_tokens": 0,
          "output_tokens": 0, "cost_usd": 0.0, "tries": 1} for f, w in enumerate(WORDS)]), schema.LABELS)
    forbidden = {"examples", "messages", "answer", "plain", "fuzz", "texts", "truth", "value", "token_strs"}
    guard_driver(monkeypatch, forbidden)
    with pytest.raises(AssertionError, match="the driver read"):  # the guards bite
        pq.read_table(tmp_path / "features")
    with pytest.raises(AssertionError, match="reached the driver"):
        list(ray.data.from_items([{"answer": "an answer"}]).iter_batches(batch_format="pyarrow"))
    cfg = LabelScoreConfig(sample=8, test_examples=5, min_test_examples=2, benchmarks=["detection", "embedding"], max_retries=1)
    keys, counts = held_out_sample(labels, tmp_path / "features", cfg.test_examples, cfg.min_test_examples, cfg.sample, seed=0)
    assert keys.num_rows == 8 and counts["eligible"] == 12
    tests = ray.data.read_parquet(str(tmp_path / "features")).select_columns(["sae_id", "feature", "examples"]).map_batches(
        _held_out, batch_format="pyarrow", fn_kwargs={"keys": keys, "test_n": cfg.test_examples, "counts_only": False})
    scores, info = score_labels(tests, keys, labels, cfg, LLMConfig(**scorer_cfg(scorer_server)), seed=0)
    # 8 features x (exact + random_label) x (detection + embedding); 5 positives + 10 negatives: 3 prompts each
    assert scores.num_rows == 8 * 2 * 2 and info["prompts"] == 8 * 2 * 3 and info["features"] == 8
    assert set(zip(scores.column("sae_id").to_pylist(), scores.column("feature").to_pylist())) == set(
        zip(keys.column("sae_id").to_pylist(), keys.column("feature").to_pylist()))


@pytest.mark.parametrize("split", ["top", "deciles", "random"])
def test_splits_never_overlap(split):
    for row in synthetic_features().to_pylist():
        train, test = split_examples(row["examples"], split, 5, 10, seed=row["feature"])
        assert train and test
        assert not {identity(e) for e in train} & {identity(e) for e in test}
        assert len({identity(e) for e in test}) == len(test)  # no duplicate inside the test set
        if split == "top":
            assert [e["rank"] for e in train] == [0, 1, 2, 3, 4] and [e["rank"] for e in test] == list(range(5, 15))
    # ingest examples have no context id: identity falls back to tokens + top index
    a = {"kind": "top", "rank": 0, "context_id": None, "position": None, "token_strs": [" a", " b"], "top_index": 1}
    assert identity(a) == identity({**a, "kind": "sample", "rank": 3})


# ------------------------------------------------------------------ a deterministic scorer

def test_named_token_label_beats_random_label_control(ray_local, scorer_server):
    from baez_ray.stages.score import score_labels

    feats = synthetic_features().to_pylist()
    tests = {("syn", r["feature"]): split_examples(r["examples"], "top", 5, 10)[1] for r in feats}
    labels = schema.conform(pa.Table.from_pylist(
        [{"sae_id": "syn", "layer": 3, "feature": f, "method": "exact", "label": w, "n_examples": 5, "input_tokens": 0,
          "output_tokens": 0, "cost_usd": 0.0, "tries": 1} for f, w in enumerate(WORDS) if w not in ("kappa", "lambda")]), schema.LABELS)
    cfg = ScoreConfig(max_retries=2)
    scores, info = score_labels(*as_dataset(tests), labels, cfg, LLMConfig(**scorer_cfg(scorer_server)), seed=1)
    df = scores.to_pandas()
    # one row per (feature, method, benchmark): 10 features x {exact, random_label} x 3 benchmarks
    assert len(df) == 10 * 2 * 3 and not df.duplicated(["feature", "method", "benchmark"]).any()
    assert (df["n_shown"] == 20).all() and (df["n_failed"] == 0).all()
    summary = aggregate(df).set_index(["method", "benchmark"])
    for bench in ("detection", "fuzz"):
        assert summary.loc[("exact", bench), "mean"] >= 0.95
        assert summary.loc[("random_label", bench), "mean"] <= 0.65
    assert summary.loc[("exact", "embedding"), "mean"] > summary.loc[("random_label", "embedding"), "mean"] + 0.2
    assert summary.loc[("exact", "embedding"), "gap"] > 0.1
    # the control never scores a feature with its own label
    ctrl = df[df["method"] == "random_label"]
    assert all(lab != WORDS[f] for f, lab in zip(ctrl["feature"], ctrl["label"]))
    # tokens and cost of the scorer are accounted
    assert info["scorer_input_tokens"] == 100 * info["prompts"] and df["cost_usd"].sum() > 0
    # fuzz negatives are highlighted at random positions drawn per example
    fuzz = [r for r in scorer_server.requests if "marked at random" in r["messages"][0]["content"]]
    assert fuzz and all(r["response_format"]["type"] == "json_schema" for r in fuzz)


def test_unreadable_answers_are_retried_then_counted_not_dropped(ray_local, scorer_server):
    from baez_ray.stages.score import score_labels

    feats = synthetic_features().to_pylist()
    tests = {("syn", r["feature"]): split_examples(r["examples"], "top", 5, 10)[1] for r in feats}
    labels = schema.conform(pa.Table.from_pylist(
        [{"sae_id": "syn", "layer": 3, "feature": f, "method": "exact", "label": WORDS[f], "n_examples": 5, "input_tokens": 0,
          "output_tokens": 0, "cost_usd": 0.0, "tries": 1} for f in (9, 10, 11)]), schema.LABELS)
    before = len(scorer_server.requests)
    cfg = ScoreConfig(benchmarks=["detection"], random_label=False, max_retries=2)
    scores, info = score_labels(*as_dataset(tests), labels, cfg, LLMConfig(**scorer_cfg(scorer_server)), seed=1)
    df = scores.to_pandas().set_index("feature")
    sent = scorer_server.requests[before:]
    # 3 features x 4 prompts; kappa (10) fails once then succeeds; lambda (11) fails 3 times
    assert len(sent) == 12 + 4 + 4 * 2
    retries = [r for r in sent if len(r["messages"]) > 2]
    # only the unreadable rows are sent again: kappa's 4 prompts once, lambda's 4 twice
    label_of = lambda r: re.search(r"^Label: (.*)$", r["messages"][1]["content"], re.M).group(1)  # noqa: E731
    assert Counter(label_of(r) for r in retries) == {"kappa": 4, "lambda": 8}
    assert retries and all("could not be read" in r["messages"][-1]["content"] and r["messages"][-2]["role"] == "assistant" for r in retries)
    assert df.loc[9, "n_failed"] == 0 and df.loc[9, "balanced_accuracy"] == 1.0
    assert df.loc[10, "n_failed"] == 0 and df.loc[10, "balanced_accuracy"] == 1.0
    assert df.loc[11, "n_failed"] == 20 and df.loc[11, "n_shown"] == 20 and math.isnan(df.loc[11, "balanced_accuracy"])
    assert info["failed_prompts"] == 4 and info["retried_prompts"] == 8
    s = aggregate(scores.to_pandas()).iloc[0]
    assert s["failure_rate"] == pytest.approx(20 / 60)


# ------------------------------------------------------------------ the benchmark job

@pytest.fixture(scope="module")
def benchmark_run(ray_local, scorer_server, tmp_path_factory):
    from baez_ray.config import validate
    from baez_ray.jobs import execute
    from baez_ray.rundir import write_table

    root = tmp_path_factory.mktemp("bench")
    write_table(synthetic_features(), root / "features")
    spec = validate({
        "job": "benchmark", "name": "syn-bench", "seed": 3, "features": str(root / "features"),
        "benchmark": {"n_features": 8, "min_examples": 15, "methods": ["eleuther_acts_top5", "token_freq"], "explainer": scorer_cfg(scorer_server),
                      "split": "top", "score": {"max_retries": 1}},
        "route": {"top_n": 5},
    })
    run = execute(spec, root / "run")
    return run.dir


@pytest.mark.slow
def test_benchmark_job_tables_and_manifest(benchmark_run):
    d = benchmark_run
    train, test = pq.read_table(d / "train").to_pylist(), pq.read_table(d / "test").to_pylist()
    assert len(train) == len(test) == 8
    for tr, te in zip(sorted(train, key=lambda r: r["feature"]), sorted(test, key=lambda r: r["feature"])):
        assert len(tr["examples"]) == 5 and len(te["examples"]) == 10
        assert not {identity(e) for e in tr["examples"]} & {identity(e) for e in te["examples"]}
    labels = pq.read_table(d / "labels").to_pandas()
    assert set(labels["method"]) == {"eleuther_acts_top5", "token_freq"} and len(labels) == 16
    eleuther = labels[labels["method"] == "eleuther_acts_top5"]
    # the explainer read the train examples: it names each feature's word
    assert all(lab == WORDS[f] for f, lab in zip(eleuther["feature"], eleuther["label"]))
    scores = pq.read_table(d / "scores").to_pandas()
    assert len(scores) == 8 * 3 * 3  # features x (2 methods + control) x 3 benchmarks
    manifest = json.loads((d / "manifest.json").read_text())
    summary = {(r["method"], r["benchmark"]): r for r in manifest["summary"]}
    assert summary[("eleuther_acts_top5", "detection")]["mean"] >= 0.95
    assert summary[("random_label", "detection")]["mean"] < summary[("eleuther_acts_top5", "detection")]["mean"] - 0.3
    assert (d / "report" / "index.html").exists() and (d / "report" / "scores_by_method.png").stat().st_size > 5000


@pytest.mark.slow
def test_benchmark_job_reliability_comparisons_and_verdict(benchmark_run):
    """summarise writes the split-half reliability and the paired comparisons beside the
    summary (and in the manifest); the report opens with the verdict table."""
    import itertools

    d = benchmark_run
    scores = pq.read_table(d / "scores").to_pandas()
    answered = scores[scores["n_failed"] == 0]
    assert answered[["score_half_a", "score_half_b"]].notna().all().all()
    perfect = answered[(answered["benchmark"] == "detection") & (answered["balanced_accuracy"] == 1.0)]
    assert len(perfect) and (perfect["score_half_a"] == 1.0).all() and (perfect["score_half_b"] == 1.0).all()
    reliability = pq.read_table(d / "reliability.parquet").to_pandas()
    comparisons = pq.read_table(d / "comparisons.parquet").to_pandas()
    assert len(reliability) == 3 * 3 and set(reliability["method"]) == {"eleuther_acts_top5", "token_freq", "random_label"}
    # per benchmark: each method vs the control, then the two methods against each other
    assert len(comparisons) == 3 * 3 and (comparisons["n"] <= 8).all() and (comparisons["p_method"] == "exact").all()
    row = comparisons[(comparisons["benchmark"] == "detection") & (comparisons["method_a"] == "eleuther_acts_top5")
                      & (comparisons["method_b"] == "random_label")].iloc[0]
    wide = scores[scores["benchmark"] == "detection"].pivot(index="feature", columns="method", values="balanced_accuracy").dropna()
    diffs = (wide["eleuther_acts_top5"] - wide["random_label"]).tolist()
    exact = sum(abs(sum(s * x for s, x in zip(signs, diffs))) >= abs(sum(diffs)) - 1e-12
                for signs in itertools.product((1, -1), repeat=len(diffs))) / 2 ** len(diffs)
    assert row["n"] == len(diffs) and row["mean_diff"] > 0.3 and row["p_value"] == pytest.approx(exact)
    assert row["p_holm"] >= row["p_value"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert len(manifest["reliability"]) == 9 and len(manifest["comparisons"]) == 9
    page = (d / "report" / "index.html").read_text()
    assert page.index("<table class=verdict>") < page.index("<h2>Scores</h2>") < page.index("<table class=reliability>")
    assert "eleuther_acts_top5 vs random_label" in page.replace("<wbr>", "")  # names may wrap after "_"


@pytest.mark.slow
def test_report_renders_in_headless_chromium(benchmark_run, tmp_path):
    """The report opened in Debian's chromium (playwright drives it): no console or page
    errors, every image loads, the chart and the tables are there; a screenshot is kept."""
    import shutil

    from playwright.sync_api import sync_playwright

    from baez_ray.cli import main

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    assert shutil.which(chromium), "Debian chromium is missing: `make test` installs it (apt-get install chromium)"
    (benchmark_run / "report" / "index.html").unlink()
    assert main(["report", str(benchmark_run)]) == 0  # re-rendered from the tables
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: errors.append(f"failed to load {r.url}"))
        page.goto((benchmark_run / "report" / "index.html").as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])")
        n_summary_rows = page.locator("table.summary tr").count()
        n_feature_rows = page.locator("table.perfeature tr").count()
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert not errors, errors
    assert ("scores_by_method.png", True) in [tuple(i) for i in images]
    assert all(ok for _, ok in images), images
    assert n_summary_rows == 1 + 3 * 3 and n_feature_rows > 8
    from PIL import Image

    im = np.asarray(Image.open(shot).convert("L"))
    assert im.shape[0] > 900 and im.std() > 10  # a long page with content, not a blank one


# ------------------------------------------------------------------ negatives from the corpus

def test_corpus_negatives_are_windows_where_the_feature_is_silent(ray_local, tiny_gemma, random_sae, tmp_path):
    import torch

    from baez_ray.config import validate
    from baez_ray.models.lm import ResidualReader
    from baez_ray.models.sae import load_sae
    from baez_ray.rundir import Run
    from baez_ray.stages.negatives import corpus_negatives
    from conftest import make_text

    (tmp_path / "doc.txt").write_text(" ".join(make_text(60, seed=s) for s in range(12)))
    spec = validate({
        "job": "collect", "name": "neg",
        "model": {"id": "tiny-gemma", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "0-res-random", "path": str(random_sae)},
        "corpus": {"paths": [str(tmp_path / "doc.txt")], "context_len": 33},
        "collect": {"window": 8, "window_left": 3, "batch_size": 4},
    })
    run = Run(spec, tmp_path / "run")
    keys = [("0-res-random", f) for f in range(0, 96, 8)]
    neg = corpus_negatives(run.table_dir("contexts"), spec.model, spec.saes, spec.corpus, spec.collect.window, spec.collect.batch_size,
                           keys, n=3, seed=0, n_contexts=16)
    # recompute every returned window from its context (the model reads the whole context)
    contexts = {r["context_id"]: r["tokens"] for r in pq.read_table(run.table_dir("contexts")).to_pylist()}
    lm = ResidualReader(spec.model, layers=[spec.saes[0].layer])
    sae = load_sae(spec.saes[0], lm.device, lm.d_model)
    n_found = 0
    assert sorted(zip(neg.column("sae_id").to_pylist(), neg.column("feature").to_pylist())) == keys
    for f, exs in zip(neg.column("feature").to_pylist(), neg.column("examples").to_pylist()):
        for e in exs:
            ids = torch.tensor([contexts[e["context_id"]]])
            acts = sae.encode(lm.residual(ids))[0, e["position"] : e["position"] + 8, f]
            assert float(acts.max()) <= 0, (f, e["context_id"], e["position"])
            assert len(e["token_strs"]) == 8 and e["position"] >= 1
            n_found += 1
        assert len(exs) <= 3 and len({(e["context_id"], e["position"]) for e in exs}) == len(exs)
    assert n_found >= 6  # the random SAE's sparse features have silent windows
    # a job without a model cannot take negatives from the corpus
    from baez_ray.config import ConfigError

    with pytest.raises(ConfigError, match="negatives = corpus"):
        validate({"job": "label", "features": str(tmp_path), "label": {"explainer": {"model": "x"}, "score": {"negatives": "corpus"}}})
