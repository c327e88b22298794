"""The output side (issue #26): the benchmark registry, logit_embedding's items by hand,
np_max_act_logits' prompt, the by-kind table on hand-made scores, and a benchmark job
with both sides (np_max_act_logits and token_freq labels; detection, embedding and
logit_embedding with the real embedder) against a deterministic local explainer/scorer
(an HTTP server on 127.0.0.1), whose report shows the by-kind table."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import benchmarks, schema
from baez_ray.config import ScoreConfig
from conftest import serve_local
from helpers import WORDS, Scorer, scorer_cfg, synthetic_features


def test_registry_gives_side_headline_and_chance():
    assert benchmarks.side("logit_embedding") == "output" and benchmarks.side("detection") == "input"
    assert benchmarks.get("logit_embedding").headline == "auroc" and benchmarks.get("logit_embedding").chance == 0.5
    assert not benchmarks.get("logit_embedding").llm and benchmarks.get("fuzz_logprob").logprobs
    with pytest.raises(ValueError, match="registered twice"):
        benchmarks.register(benchmarks.get("fuzz"))
    with pytest.raises(ValueError, match="unknown benchmark 'nope'.*logit_embedding"):
        ScoreConfig(benchmarks=["detection", "nope"])


# ------------------------------------------------------------------ logit_embedding items

def test_promoted_texts_and_logit_items_by_hand():
    """Positives: the feature's promoted tokens by value, stripped, without repeats or
    empty ones; negatives: as many distinct promoted tokens of the other features of the
    block, none equal to a positive, seeded per feature."""
    from baez_ray.stages.logit_embedding import block_logit_items, promoted_texts

    assert promoted_texts([" b", "a", " a", "\n", "<bos>", "c"], [2.0, 3.0, 1.0, 5.0, 4.0, 0.5], 3) == ["a", "b", "c"]
    assert promoted_texts(None, None, 3) == [] and promoted_texts(["x", "y"], None, 1) == ["x"]
    promoted = {("s", 0): ["the", "cat", "cats"], ("s", 1): ["the", "dog"], ("s", 2): ["ran", "run", "runs"], ("s", 3): []}
    cfg = ScoreConfig(logit_tokens=3)
    items = {(r["sae_id"], r["feature"]): r for r in block_logit_items(promoted, cfg, seed=5)}
    a = items[("s", 0)]
    assert a["texts"][:3] == ["the", "cat", "cats"] and a["truth"] == [1, 1, 1, 0, 0, 0]
    assert set(a["texts"][3:]) <= {"dog", "ran", "run", "runs"} and len(set(a["texts"][3:])) == 3  # "the" is its own
    assert items[("s", 1)]["truth"] == [1, 1, 0, 0] and "the" not in items[("s", 1)]["texts"][2:]
    assert items[("s", 3)] == {"sae_id": "s", "feature": 3, "texts": [], "truth": []}
    assert block_logit_items(promoted, cfg, seed=5) == list(items.values())  # seeded


def with_promoted(table: pa.Table) -> pa.Table:
    """synthetic_features with promoted tokens: feature i promotes forms of WORDS[i]."""
    rows = table.to_pylist()
    for r in rows:
        w = WORDS[r["feature"]]
        r["pos_tokens"] = [" " + w, w.capitalize(), " " + w + "s", w.upper(), " " + w + "-like"]
        r["pos_values"] = [5.0, 4.0, 3.0, 2.0, 1.0]
        r["neg_tokens"], r["neg_values"] = [" the"], [-1.0]
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


# ------------------------------------------------------------------ np_max_act_logits

def test_np_max_act_logits_prompt_shows_examples_and_promoted_tokens():
    from baez_ray import methods
    from baez_ray.llm.prompts import NP_LOGITS_VERSION
    from baez_ray.methods.np_max_act_logits import prompt_rows

    assert methods.get("np_max_act_logits").tiers == (2,) and "np_max_act_logits" in methods.known(2)
    feats = with_promoted(synthetic_features()).slice(0, 2).to_pylist()
    feats[1]["pos_tokens"] = None
    rows = prompt_rows(schema.conform(pa.Table.from_pylist(feats), schema.FEATURES)).to_pylist()
    assert [r["n_examples"] for r in rows] == [10, 10] and NP_LOGITS_VERSION == "np_max_act_logits/v2"
    user0, user1 = rows[0]["messages"][1]["content"], rows[1]["messages"][1]["content"]
    assert "Example 10: top token 'alpha'" in user0
    assert user0.endswith("Top promoted tokens: ' alpha', 'Alpha', ' alphas', 'ALPHA', ' alpha-like'")
    assert user1.endswith("Top promoted tokens: (none known)")
    feats[1]["pos_tokens"] = ["▁beta", "<bos>", "Ġbetas"]  # an export's vocabulary pieces, shown as text
    rows = prompt_rows(schema.conform(pa.Table.from_pylist(feats), schema.FEATURES)).to_pylist()
    assert rows[1]["messages"][1]["content"].endswith("Top promoted tokens: ' beta', ' betas'")
    assert "Explanation: <label>" in rows[0]["messages"][0]["content"]


# ------------------------------------------------------------------ results by kind

def test_by_kind_says_which_side_each_kinds_labels_pass():
    """Hand-made scores: on output features method A beats the control on the output side
    (logit_embedding) and not on the input side (detection); on input features the
    reverse; unrouted features form their own kind."""
    from baez_ray.report.by_kind import by_kind

    rng = np.random.default_rng(0)
    rows = []
    for f in range(24):
        kind = "output" if f < 12 else "input"
        good_out, good_in = (0.9, 0.5) if kind == "output" else (0.5, 0.95)
        for method, out_s, in_s in (("A", good_out, good_in), ("random_label", 0.5, 0.5)):
            noise = rng.normal(0, 0.03, 2)
            rows.append({"sae_id": "s", "feature": f, "method": method, "benchmark": "logit_embedding", "auroc": out_s + noise[0],
                         "balanced_accuracy": np.nan})
            rows.append({"sae_id": "s", "feature": f, "method": method, "benchmark": "detection", "auroc": np.nan,
                         "balanced_accuracy": in_s + noise[1]})
    scores = pd.DataFrame(rows)
    routes = pd.DataFrame({"sae_id": "s", "feature": range(20), "kind": ["output"] * 12 + ["input"] * 8})  # 20..23 unrouted
    data = by_kind(scores, routes)
    assert data["benches"] == {"input": ["detection"], "output": ["logit_embedding"]}
    verdict = {(r["kind"], r["method"], r["side"]): r["verdict"] for r in data["sides"]}
    assert verdict[("output", "A", "output")] == "passes" and verdict[("output", "A", "input")] == "unclear"
    assert verdict[("input", "A", "input")] == "passes" and verdict[("input", "A", "output")] == "unclear"
    assert [r["kind"] for r in data["rows"]] == ["input", "input", "output", "output", "unrouted", "unrouted"]
    out_a = next(r for r in data["rows"] if (r["kind"], r["method"]) == ("output", "A"))
    assert out_a["n"] == 12 and out_a["cells"]["logit_embedding"] == pytest.approx(0.9, abs=0.03)
    assert re.fullmatch(r"output features: A passes the output side \(input [+-]0\.0\d, not shown; output \+0\.[34]\d, passes\)\.",
                        data["sentences"][1]), data["sentences"][1]


# ------------------------------------------------------------------ a benchmark job with both sides

class LogitReader(Scorer):
    """Scorer's answers, and np_max_act_logits prompts answered with the first promoted
    token (a perfect reader of the logit lens)."""

    def answer(self, body: dict) -> str:
        user = [m["content"] for m in body["messages"] if m["role"] == "user"]
        hit = re.search(r"Top promoted tokens: '([^']*)'", user[0])
        if hit:
            return f"Explanation: {hit.group(1).strip()}"
        return super().answer(body)


@pytest.fixture(scope="module")
def both_sides_run(ray_local, tmp_path_factory):  # a whole benchmark job: its test is marked slow
    from baez_ray.config import validate
    from baez_ray.jobs import execute
    from baez_ray.rundir import write_table

    fake = LogitReader()
    with serve_local(fake.handler()) as url:
        fake.url = url + "/v1"
        root = tmp_path_factory.mktemp("both")
        write_table(with_promoted(synthetic_features()), root / "features")
        spec = validate({
            "job": "benchmark", "name": "both-sides", "seed": 3, "features": str(root / "features"),
            "benchmark": {"n_features": 8, "min_examples": 15, "methods": ["np_max_act_logits", "token_freq"], "explainer": scorer_cfg(fake),
                          "score": {"max_retries": 1, "benchmarks": ["detection", "embedding", "logit_embedding"], "logit_tokens": 5}},
            "route": {"top_n": 5},
        })
        run = execute(spec, root / "run")
    return run.dir


@pytest.mark.slow
def test_benchmark_job_scores_both_sides_and_reports_by_kind(both_sides_run):
    d = both_sides_run
    labels = pq.read_table(d / "labels").to_pandas()
    np_labels = labels[labels["method"] == "np_max_act_logits"]
    assert len(np_labels) == 8 and all(lab == WORDS[f] for f, lab in zip(np_labels["feature"], np_labels["label"]))
    assert set(np_labels["prompt_version"]) == {"np_max_act_logits/v2"}
    scores = pq.read_table(d / "scores").to_pandas()
    assert len(scores) == 8 * 3 * 3 and set(scores["benchmark"]) == {"detection", "embedding", "logit_embedding"}
    # logit_embedding: the feature's 5 promoted tokens and 5 of other features', both halves, no LLM
    logit = scores[scores["benchmark"] == "logit_embedding"]
    assert (logit["n_shown"] == 10).all() and (logit["n_failed"] == 0).all() and set(logit["prompt_version"]) == {"logit_embedding/v1"}
    assert logit[["score_half_a", "score_half_b"]].notna().all().all() and (logit["input_tokens"] == 0).all()
    manifest = json.loads((d / "manifest.json").read_text())
    summary = {(r["method"], r["benchmark"]): r for r in manifest["summary"]}
    assert summary[("np_max_act_logits", "logit_embedding")]["mean"] >= 0.9 and summary[("np_max_act_logits", "logit_embedding")]["gap"] > 0.1
    assert summary[("np_max_act_logits", "logit_embedding")]["mean"] > summary[("random_label", "logit_embedding")]["mean"] + 0.3
    assert {r["benchmark"] for r in manifest["reliability"]} == {"detection", "embedding", "logit_embedding"}
    assert any(r["benchmark"] == "logit_embedding" and r["method_b"] == "random_label" for r in manifest["comparisons"])
    by_kind = json.loads((d / "report" / "by_kind.json").read_text())
    assert by_kind["benches"] == {"input": ["detection", "embedding"], "output": ["logit_embedding"]}
    kinds = set(pq.read_table(d / "routes", columns=["kind"]).column("kind").to_pylist())
    assert {s.split(" features:")[0] for s in by_kind["sentences"]} == kinds
    out_np = [r for r in by_kind["sides"] if r["method"] == "np_max_act_logits" and r["side"] == "output"]
    assert out_np and all(r["verdict"] == "passes" for r in out_np if r["n"] >= 3)
    page = (d / "report" / "index.html").read_text()
    assert "By kind: input side and output side" in page and "<table class=bykind>" in page
    assert page.index("<table class=bykind>") < page.index("<table class=reliability>")
    assert (d / "report" / "by_kind.png").stat().st_size > 5000


def test_label_report_shows_the_by_kind_table(tmp_path):
    """The label job's report (its scored sample) shows the sides by kind too, from the
    routes' kinds; the page's tables and figure stay within the report's width rules."""
    from baez_ray.report.labels import write_label_report
    from baez_ray.rundir import write_table

    d = tmp_path / "run"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"job": "label", "name": "label-run", "stages": {"label": {"features": 5}},
                                                 "spec": {"route": {"tau_in": 0.5, "tau_out": 0.5, "tau_cross": 0.4}, "seed": 0}}))
    kinds = [(1, "input"), (1, "output"), (2, "cross"), (3, "obscure"), (2, "cross")]
    write_table(schema.conform(pa.Table.from_pylist(
        [{"sae_id": "s", "model_id": "m", "layer": 0, "feature": f, "n_tokens": 100, "n_firing": 3, "max_activation": 1.0,
          "examples": [{"kind": "top", "rank": 0, "value": 1.0, "top_index": 0, "token_strs": [" w"], "acts": [1.0]}]}
         for f in range(5)]), schema.FEATURES), d / "features")
    write_table(schema.conform(pa.Table.from_pylist(
        [{"sae_id": "s", "layer": 0, "feature": f, "n_examples": 3, "c_in": 0.5, "c_out": 0.5, "tier": t, "kind": k}
         for f, (t, k) in enumerate(kinds)]), schema.ROUTES), d / "routes")
    method = {0: "token_freq", 1: "token_freq", 2: "eleuther_acts_top5", 3: "baez", 4: "eleuther_acts_top5"}
    labels = [{"sae_id": "s", "layer": 0, "feature": f, "method": m, "label": f"label {f}", "tier": [1, 1, 2, 3, 2][f], "n_examples": 3,
               "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 1} for f, m in method.items()]
    write_table(schema.conform(pa.Table.from_pylist(labels), schema.LABELS), d / "labels")
    scores = [{"sae_id": "s", "layer": 0, "feature": f, "method": m, "benchmark": b, "label": "x", "n_shown": 20, "n_failed": 0,
               "balanced_accuracy": 0.6 + 0.05 * f if b == "detection" else None, "auroc": 0.8 if b == "logit_embedding" else None,
               "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
              for f in method for m in (method[f], "random_label") for b in ("detection", "logit_embedding")]
    write_table(schema.conform(pa.Table.from_pylist(scores), schema.SCORES), d / "scores")
    page = write_label_report(d).read_text()
    assert "By kind: input side and output side" in page
    rows = page.split("<table class=bykind>", 1)[1].split("</table>", 1)[0].split("<tr>")[3:]
    assert [re.findall(r"<td>([^<]*)</td><td>([^<]*)</td>", r)[0] for r in rows] == [
        ("input", "token_freq"), ("input", "random_label"), ("output", "token_freq"), ("output", "random_label"),
        ("cross", "eleuther_acts_top5"), ("cross", "random_label"), ("obscure", "baez"), ("obscure", "random_label")]
    data = json.loads((d / "report" / "by_kind.json").read_text())
    assert len(data["sentences"]) == 4 and data["sentences"][2].startswith("cross features: eleuther_acts_top5 passes")


@pytest.mark.slow
def test_label_job_scores_logit_embedding_on_its_sample(ray_local, scorer_server, tmp_path):
    """A label job's score sample gets the output side too: the held-out rows carry the
    features' promoted tokens to logit_embedding (the score stage's finish, no LLM)."""
    from baez_ray.config import validate
    from baez_ray.jobs import execute
    from baez_ray.rundir import write_table

    feats = with_promoted(synthetic_features()).to_pylist()
    for r in feats:  # decile samples of their own: held-out examples
        r["examples"] = [{**e, "context_id": e["context_id"] + 10**6} if e["kind"] == "sample" else e for e in r["examples"]]
    write_table(schema.conform(pa.Table.from_pylist(feats), schema.FEATURES), tmp_path / "features", rows_per_file=4)
    execute(validate({"job": "label", "name": "logit", "seed": 1, "features": str(tmp_path / "features"),
                      "label": {"route": False, "method": "eleuther_acts_top5", "explainer": scorer_cfg(scorer_server), "max_retries": 1,
                                "score": {"benchmarks": ["logit_embedding"], "test_examples": 5, "min_test_examples": 2,
                                          "logit_tokens": 5}}}), tmp_path / "run")
    scores = pq.read_table(tmp_path / "run" / "scores").to_pandas()
    assert set(scores["benchmark"]) == {"logit_embedding"} and len(scores) == 12 * 2
    assert (scores["n_shown"] == 10).all() and (scores["input_tokens"] == 0).all()
    own = scores[scores["method"] == "eleuther_acts_top5"]
    assert own["auroc"].mean() > scores[scores["method"] == "random_label"]["auroc"].mean() + 0.3
