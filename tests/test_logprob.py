"""Log-prob scoring (SPEC §3: detection_logprob, fuzz_logprob): the transformers backend's
probability against a direct softmax of the model's logits, the real openai backend and
score stage through Ray Data against a deterministic local server that returns log-probs
(a label naming the feature's word beats the random-label control; rows without the two
tokens are failed, counted, not retried), the vLLM backend's pure parts, and the refusal
of a scorer without log-probs (anthropic) when the job is validated."""

from __future__ import annotations

import json
import math
import re

import pyarrow as pa
import pytest

from baez_ray import schema
from baez_ray.config import ConfigError, LLMConfig, ScoreConfig, validate
from baez_ray.llm import prompts
from baez_ray.llm.backends import logprob_targets, p_from_top, prompt_table
from conftest import RecordingServer, serve_local
from helpers import WORDS, as_dataset, synthetic_features

# ------------------------------------------------------------------ pure parts


def test_logprob_constraint_and_probability_from_top_logprobs():
    assert logprob_targets("logprob:1,0") == ("1", "0")
    assert logprob_targets("binary_list:3") is None and logprob_targets(None) is None
    top = {"1": math.log(0.6), " 1": math.log(0.1), "0": math.log(0.2), "The": math.log(0.05)}
    assert p_from_top(top, ("1", "0")) == pytest.approx(0.7 / 0.9)  # tokens with the same stripped text add up
    # one of the two missing: it counts as the least likely listed token (an upper bound)
    assert p_from_top({"1": math.log(0.9), "x": math.log(0.01)}, ("1", "0")) == pytest.approx(0.9 / 0.91)
    assert p_from_top({"Yes": -0.1, "No": -2.0}, ("1", "0")) is None


def test_vllm_backend_asks_for_logprobs_and_reads_them_by_token_id():
    from baez_ray.llm.backends.vllm_backend import _postprocess, _preprocess, first_token_p

    row = {"max_tokens": 50, "temperature": 0.0, "stop": None, "constraint": "logprob:1,0", "tokenized_prompt": [1, 2]}
    params = _preprocess(row)["sampling_params"]
    assert params["logprobs"] == 20 and params["max_tokens"] == 1 and "structured_outputs" not in params
    # other rows ask for the top 1 only, so that every block of the engine's output is stored alike
    other = _preprocess({**row, "constraint": "binary_list:2"})["sampling_params"]
    assert other["logprobs"] == 1 and other["max_tokens"] == 50
    # Ray Data LLM's logprobs: per generated token, token id -> {logprob, rank, decoded_token}
    lp = [{16: {"logprob": math.log(0.3), "rank": 2, "decoded_token": "1"}, 15: {"logprob": math.log(0.6), "rank": 1, "decoded_token": "0"}}]
    assert first_token_p(lp, "16,15") == pytest.approx(1 / 3)
    assert first_token_p([{"16": {"logprob": math.log(0.3)}, "15": {"logprob": math.log(0.6)}}], "16,15") == pytest.approx(1 / 3)
    assert first_token_p([{7: {"logprob": -0.1}}], "16,15") is None and first_token_p(None, "") is None
    out = _postprocess({"__baez_row": b"x", "generated_text": "0", "num_input_tokens": 9, "num_generated_tokens": 1,
                        "logprobs": lp, "__baez_targets": "16,15"})
    assert out["__baez_p"] == pytest.approx(1 / 3)
    assert math.isnan(_postprocess({"__baez_row": b"x", "generated_text": "[1]", "num_input_tokens": 9, "num_generated_tokens": 3})["__baez_p"])


def test_anthropic_refuses_a_logprob_row():
    from baez_ray.llm.backends.anthropic_backend import request_params

    with pytest.raises(ValueError, match="no log-probs"):
        request_params({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, "temperature": 0.0, "stop": None,
                        "constraint": "logprob:1,0"}, LLMConfig(backend="anthropic", model="claude-sonnet-4-6"))


def test_anthropic_scorer_with_logprob_benchmarks_is_refused_at_validation(tmp_path):
    claude = {"backend": "anthropic", "model": "claude-sonnet-4-6"}
    local = {"backend": "vllm", "model": "google/gemma-3-27b-it"}
    label_job = {"job": "label", "features": str(tmp_path), "label": {"explainer": claude, "score": {"benchmarks": ["detection", "detection_logprob"]}}}
    with pytest.raises(ConfigError, match=r"detection_logprob read the scorer's log-probs, which the anthropic backend does not give"):
        validate(label_job)
    bench_job = {"job": "benchmark", "features": str(tmp_path),
                 "benchmark": {"explainer": local, "score": {"benchmarks": ["fuzz_logprob"], "scorer": claude}}}
    with pytest.raises(ConfigError, match="benchmark.score.scorer is anthropic:claude-sonnet-4-6"):
        validate(bench_job)
    # the same benchmarks with a scorer that gives log-probs validate
    label_job["label"]["score"]["scorer"] = local
    validate(label_job)
    bench_job["benchmark"]["score"]["scorer"] = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}
    validate(bench_job)
    validate({"job": "label", "features": str(tmp_path), "label": {"explainer": claude, "score": {"benchmarks": ["detection"]}}})


# ------------------------------------------------------------------ transformers: logits


def test_transformers_logprob_is_the_softmax_of_the_two_tokens():
    """p_yes from one forward per prefix run (left-padded, over the kept prefix's KV cache)
    equals the softmax over the logits of "1" and "0" of each prompt run alone, within 1e-5."""
    import torch

    from baez_ray.llm.backends.transformers_backend import TransformersChat

    chat = TransformersChat(LLMConfig(backend="transformers", model="pypi:smollm2-135m", num_cpus=1).model_dump())
    excerpts = ["The cat sat on the mat.", "Stocks fell sharply on Monday.", "Rain is expected over the weekend.", "A kitten slept."]
    rows = [{"request_id": f"{label}|{i}", "messages": prompts.logprob_messages(bench, label, ex), "max_tokens": 1, "temperature": 0.0,
             "stop": None, "constraint": prompts.LOGPROB_CONSTRAINT}
            for bench, label in [("detection_logprob", "cats"), ("detection_logprob", "the weather"), ("fuzz_logprob", "finance")]
            for i, ex in enumerate(excerpts)]
    texts = [chat.prompt_text(r["messages"]) for r in rows]
    ids = [chat.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert chat.prefix_runs(ids) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # one run per label
    out = chat(prompt_table(rows)).to_pylist()
    assert all(r["error"] is None and r["output_tokens"] == 1 for r in out)
    one, zero = chat._token_id("1"), chat._token_id("0")
    with torch.inference_mode():
        for r, x in zip(out, ids):
            logits = chat.model(input_ids=torch.tensor([x])).logits[0, -1].float()
            direct = torch.softmax(logits[[one, zero]], dim=-1)[0].item()
            assert r["p_yes"] == pytest.approx(direct, abs=1e-5)
            assert r["answer"] == chat.tok.decode([int(logits.argmax())]) and r["input_tokens"] == len(x)
    # a plain row of the same batch keeps its behaviour: generated text, no probability
    plain = chat(prompt_table([{**rows[0], "request_id": "plain", "constraint": None, "max_tokens": 4}])).to_pylist()[0]
    assert plain["p_yes"] is None and plain["answer"]


# ------------------------------------------------------------------ a deterministic log-prob server


class LogprobScorer(RecordingServer):
    """An OpenAI-compatible chat server that answers log-prob requests like a reader of
    labels: P("1") = 0.9 when the label's word is in the excerpt (detection) or inside
    << >> (fuzz), else 0.1. Labels with 'lambda' get top log-probs without "1" or "0"."""

    def completion(self, body: dict) -> dict:
        system, user = body["messages"][0]["content"], body["messages"][-1]["content"]
        label = re.search(r"^Label: (.*)$", user, re.M).group(1).strip().lower()
        excerpt = re.search(r"^Excerpt: (.*)$", user, re.M).group(1)
        where = re.findall(r"<<(.*?)>>", excerpt) if "marked at random" in system else [excerpt]
        p = 0.9 if any(label in w.lower() for w in where) else 0.1
        top = [("1", math.log(p)), ("0", math.log(1 - p)), (" The", math.log(0.001))]
        if "lambda" in label:
            top = [("Yes", -0.1), ("No", -2.5)]
        first = max(top, key=lambda t: t[1])[0]
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": first}, "finish_reason": "length",
                             "logprobs": {"content": [{"token": first, "logprob": max(t[1] for t in top), "bytes": None,
                                                       "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]}]}}],
                "usage": {"prompt_tokens": 80, "completion_tokens": 1, "total_tokens": 81}}


def test_named_token_label_beats_control_on_logprobs(ray_local):
    from baez_ray.metrics import aggregate
    from baez_ray.stages.score import score_labels
    from baez_ray.stages.split import split_examples

    fake = LogprobScorer()
    feats = synthetic_features().to_pylist()
    tests = {("syn", r["feature"]): split_examples(r["examples"], "top", 5, 10)[1] for r in feats}
    labels = schema.conform(pa.Table.from_pylist(
        [{"sae_id": "syn", "layer": 3, "feature": f, "method": "exact", "label": w, "n_examples": 5, "input_tokens": 0,
          "output_tokens": 0, "cost_usd": 0.0, "tries": 1} for f, w in enumerate(WORDS) if w != "kappa"]), schema.LABELS)
    cfg = ScoreConfig(benchmarks=["detection_logprob", "fuzz_logprob"], max_retries=2, control_method="exact")
    with serve_local(fake.handler()) as url:
        scorer = LLMConfig(backend="openai", model="fake-logprob", base_url=url + "/v1", batch_size=16, max_retries=1, timeout_s=10,
                           price={"input_per_mtok": 3.0, "output_per_mtok": 15.0})
        scores, info = score_labels(*as_dataset(tests), labels, cfg, scorer, seed=1)
    df = scores.to_pandas()
    # 11 features x {exact, random_label} x 2 benchmarks; one excerpt per prompt, never retried
    assert len(df) == 11 * 2 * 2 and not df.duplicated(["feature", "method", "benchmark"]).any()
    assert len(fake.requests) == info["prompts"] == 11 * 2 * 2 * 20 and info["retried_prompts"] == 0
    assert all(r["logprobs"] is True and r["top_logprobs"] == 20 and r["max_tokens"] == 1 and "response_format" not in r
               for r in fake.requests)
    assert (df["n_shown"] == 20).all() and set(df["prompt_version"]) == {"detection_logprob/v1", "fuzz_logprob/v1"}
    # 'lambda' (feature 11): no "1" or "0" among the top log-probs -> failed, counted, not dropped
    lam = df[(df["feature"] == 11) & (df["method"] == "exact")]
    assert (lam["n_failed"] == 20).all() and lam["auroc"].isna().all()
    ok = df[~((df["feature"] == 11) & (df["method"] == "exact")) & ~((df["method"] == "random_label") & (df["label"] == "lambda"))]
    assert (ok["n_failed"] == 0).all()
    summary = aggregate(df).set_index(["method", "benchmark"])
    for bench in ("detection_logprob", "fuzz_logprob"):
        assert summary.loc[("exact", bench), "metric"] == "auroc"
        assert summary.loc[("exact", bench), "mean"] >= 0.95 and summary.loc[("exact", bench), "balanced_accuracy"] >= 0.95
        assert summary.loc[("random_label", bench), "mean"] <= 0.65
    assert df["cost_usd"].sum() == pytest.approx(len(fake.requests) * (80 * 3.0 + 15.0) / 1e6)
    # a label's prompts share their prefix (instructions + label): only the excerpt differs
    # (alpha: feature 0's own label and the control that borrows it)
    first = [r for r in fake.requests if "Label: alpha\n" in r["messages"][1]["content"] and "marked" not in r["messages"][0]["content"]]
    assert len(first) == 40 and len({r["messages"][1]["content"].split("Excerpt:")[0] for r in first}) == 1


# ------------------------------------------------------------------ the seed's study as jobs


def test_seed_study_jobs_validate():
    """jobs/seed_study.yaml (Claude scorer) and its log-prob alternative (vLLM scorer) load
    with their methods checked against the registry; the log-prob benchmarks on the Claude
    scorer are refused."""
    from pathlib import Path

    from baez_ray.jobs import load_job

    jobs = Path(__file__).resolve().parents[1] / "jobs"
    spec = load_job(jobs / "seed_study.yaml")
    b = spec.benchmark
    assert spec.job == "benchmark" and spec.features.endswith("ingest-gemma27b-l41/features")
    assert (b.n_features, b.min_examples, b.split, b.train_examples, b.score.test_examples) == (40, 15, "top", 5, 10)
    assert b.methods == ["baez", "baez_last", "eleuther_acts_top5"] and b.av_sidecar == "jobs/av/nla-gemma3-27b-L41.yaml"
    assert (b.explainer.backend, b.explainer.model, b.score.scorer.model) == ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-6")
    assert b.score.embedder is None  # the packaged all-MiniLM-L6-v2
    alt = load_job(jobs / "seed_study_logprob.yaml")
    assert {"detection_logprob", "fuzz_logprob"} <= set(alt.benchmark.score.benchmarks) and alt.benchmark.score.scorer.backend == "vllm"
    assert alt.benchmark.model_copy(update={"score": b.score}) == b  # the same study, another scorer
    with pytest.raises(ConfigError, match="anthropic backend does not give"):
        load_job(jobs / "seed_study.yaml", ["benchmark.score.benchmarks=[detection, detection_logprob]"])


@pytest.mark.slow
def test_benchmark_job_with_logprob_benchmarks_summary_and_report(ray_local, tmp_path):
    """A benchmark job (token_freq labels, no explainer call) scored with the log-prob
    benchmarks on the local log-prob server: scores, the summary (AUROC headline) and the
    report with the log-prob columns."""
    from baez_ray.jobs import execute
    from baez_ray.rundir import write_table

    fake = LogprobScorer()
    write_table(synthetic_features(), tmp_path / "features")
    with serve_local(fake.handler()) as url:
        scorer = {"backend": "openai", "model": "fake-logprob", "base_url": url + "/v1", "max_retries": 1, "timeout_s": 10}
        spec = validate({
            "job": "benchmark", "name": "logprob-bench", "seed": 3, "features": str(tmp_path / "features"),
            "benchmark": {"n_features": 6, "min_examples": 15, "methods": ["token_freq"], "explainer": scorer,
                          "score": {"benchmarks": ["detection_logprob", "fuzz_logprob"], "max_retries": 1}},
            "route": {"top_n": 5},
        })
        run = execute(spec, tmp_path / "run")
    import pyarrow.parquet as pq

    scores = pq.read_table(run.dir / "scores").to_pandas()
    assert len(scores) == 6 * 2 * 2 and set(scores["benchmark"]) == {"detection_logprob", "fuzz_logprob"}
    assert (scores["n_shown"] == 20).all() and scores["auroc"].notna().all()
    summary = {(r["method"], r["benchmark"]): r for r in json.loads((run.dir / "manifest.json").read_text())["summary"]}
    assert summary[("token_freq", "detection_logprob")]["metric"] == "auroc"
    page = (run.dir / "report" / "index.html").read_text()
    assert "detection_logprob" in page and "fuzz_logprob" in page
