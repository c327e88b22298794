"""The simulation benchmark (Bills et al. 2023; docs/output-scoring.md): Pearson's r and the
expected value from log-probs against hand-computed cases, the answer parser, the
transformers backend's per-token top log-probs against a direct forward pass, and the
score stage through Ray Data and the real openai backend against a local server that
answers the true activations (correlation 1.0, read from its log-probs), random ones
(≈ 0, read from its integers: no log-probs), or nothing readable (retried, then counted
as failed)."""

from __future__ import annotations

import json
import math
import re
import zlib

import numpy as np
import pyarrow as pa
import pytest

from baez_ray import schema
from baez_ray.config import LLMConfig, ScoreConfig
from baez_ray.llm import prompts
from baez_ray.metrics import simulation_correlation
from baez_ray.stages import simulation
from conftest import RecordingServer, serve_local
from helpers import WORDS, as_dataset, synthetic_features

# ------------------------------------------------------------------ pure parts


def test_pearson_hand_computed_and_its_constant_cases():
    # truth 0, 0, 10, 5 (mean 3.75), prediction 0, 1, 9, 5 (mean 3.75):
    # Σ dt·dp = 14.0625 + 10.3125 + 32.8125 + 1.5625 = 58.75; Σ dt² = 68.75; Σ dp² = 50.75
    assert simulation_correlation([0, 0, 10, 5], [0, 1, 9, 5]) == pytest.approx(58.75 / math.sqrt(68.75 * 50.75))
    assert simulation_correlation([0, 2, 4], [1, 3, 5]) == pytest.approx(1.0)  # any affine map of the truth
    assert simulation_correlation([0, 2, 4], [5, 3, 1]) == pytest.approx(-1.0)
    assert simulation_correlation([0, 3, 0, 7], [2, 2, 2, 2]) == 0.0  # a constant prediction explains nothing
    assert math.isnan(simulation_correlation([0, 0, 0], [1, 2, 3]))  # nothing to predict
    with pytest.raises(ValueError):
        simulation_correlation([0, 1], [0])


def _tok(text: str, top: dict[str, float]) -> dict:
    return {"token": text, "logprob": math.log(top[text]) if text in top else -9.0,
            "top": [{"token": t, "logprob": math.log(p)} for t, p in top.items()]}


def test_expected_values_from_top_logprobs_hand_computed():
    """Tokens of the answer "1: 7\\n2: 10\\n3: 0" from a tokenizer that splits digits; the
    expected value of each line from the top log-probs of its value's first token."""
    toks = [_tok("1", {"1": 1.0}), _tok(":", {":": 1.0}), _tok(" ", {" ": 1.0}),
            _tok("7", {"7": 0.5, "6": 0.3, "x": 0.2}),  # E = (7·0.5 + 6·0.3) / 0.8
            _tok("\n", {"\n": 1.0}), _tok("2", {"2": 1.0}), _tok(":", {":": 1.0}), _tok(" ", {" ": 1.0}),
            _tok("1", {"1": 0.6, "9": 0.4}),  # "1" then "0": P("0" | "1") = 0.75 splits 0.6 into 1 (0.15) and 10 (0.45)
            _tok("0", {"0": 0.75, "\n": 0.25}), _tok("\n", {"\n": 1.0}), _tok("3", {"3": 1.0}), _tok(":", {":": 1.0}),
            _tok(" ", {" ": 1.0}), _tok("0", {"0": 0.9, "1": 0.1})]  # the last token: "1" stays 1 → E = 0.1
    ev = simulation.expected_values(toks, 3)
    assert ev[1] == pytest.approx((7 * 0.5 + 6 * 0.3) / 0.8)
    assert ev[2] == pytest.approx(0.15 * 1 + 0.45 * 10 + 0.4 * 9)
    assert ev[3] == pytest.approx(0.1)
    # a tokenizer that writes " 7" as one token: candidates are read after the same prefix
    ev = simulation.expected_values([_tok("1", {"1": 1.0}), _tok(":", {":": 1.0}), _tok(" 7", {" 7": 0.5, " 8": 0.25, "9": 0.25})], 1)
    assert ev[1] == pytest.approx((7 * 0.5 + 8 * 0.25) / 0.75)
    # a value whose token carries no number among its top log-probs: no expected value
    assert simulation.expected_values([_tok("1", {"1": 1.0}), _tok(": ", {": ": 1.0}), _tok("4", {"four": 0.9, "4": 0.0001})], 1)[1] \
        == pytest.approx(4.0)
    assert simulation.expected_values([_tok("1: ", {"1: ": 1.0}), _tok("4", {"four": 1.0})], 1) == {}


def test_parse_simulation_answers():
    assert prompts.parse_simulation("1: 0\n2: 7\n3: 10", 3) == ([0, 7, 10], None)
    assert prompts.parse_simulation("Sure.\n- 1: 0\n- **2**: 3\n3 = 1\n", 3) == ([0, 3, 1], None)
    assert prompts.parse_simulation("2: 1\n1: 4", 2) == ([4, 1], None)  # lines in any order
    assert prompts.parse_simulation("1: 0\n2: 7", 3) == (None, "it has no value for token(s) 3")
    assert prompts.parse_simulation("1: 0\n1: 2", 1)[1] == "it gives token 1 twice"
    assert prompts.parse_simulation("1: 11", 1)[1] == "token 1 has value 11, above 10"
    assert prompts.parse_simulation("1: 0\n4: 0", 2)[1] == "it numbers a token 4, but the excerpt has tokens 1 to 2"
    assert prompts.parse_simulation("", 2)[0] is None
    # the parser the score stage uses: expected values where the answer has log-probs, else integers
    row = {"answer": "1: 0\n2: 7", "acts": [0.0, 9.0], "token_logprobs": None}
    assert simulation.parse(row, 0) == ([0.0, 7.0], None)
    row["token_logprobs"] = [_tok("1", {"1": 1.0}), _tok(": ", {": ": 1.0}), _tok("0", {"0": 1.0}), _tok("\n", {"\n": 1.0}),
                             _tok("2", {"2": 1.0}), _tok(": ", {": ": 1.0}), _tok("7", {"7": 0.5, "8": 0.5})]
    assert simulation.parse(row, 0) == ([0.0, 7.5], None)


def test_simulation_excerpts_and_prompt_rows():
    ex = {"token_strs": ["<bos>", " the", " cat", "\n"], "acts": [9.0, 0.0, 4.0, -1.0]}
    assert simulation.excerpt(ex, own=True) == {"token_strs": [" the", " cat", "\n"], "acts": [0.0, 4.0, 0.0]}
    assert simulation.excerpt(ex, own=False)["acts"] == [0.0, 0.0, 0.0]
    assert simulation.selected([1, 0, 1, 1, 0, 0], 2) == [0, 1, 2, 4] and simulation.selected([1, 0], None) == [0, 1]
    item = {"truth": [1, 0], "excerpts": [{"token_strs": [" a", " b"], "acts": [2.0, 4.0]}, {"token_strs": [" c"], "acts": [0.0]}]}
    subject = {"sae_id": "s", "layer": 1, "feature": 3, "method": "m", "label": "b words"}
    rows = simulation.prompt_rows(item, [subject], ScoreConfig(benchmarks=["simulation"]))
    assert [r["acts"] for r in rows] == [[5.0, 10.0], [0.0]]  # 0-10 by the feature's largest activation
    assert rows[0]["top_logprobs"] == 20 and rows[0]["request_id"] == "s|3|m|simulation|0" and rows[1]["truth"] == [0]
    assert rows[0]["constraint"] == "activation_lines:2" and rows[1]["max_tokens"] == 8 + 16
    user = rows[0]["messages"][1]["content"]
    assert 'Label: b words' in user and '1: " a"\n2: " b"' in user and "Answer with 2 lines" in user


# ------------------------------------------------------------------ transformers: per-token log-probs


def test_transformers_token_logprobs_match_a_direct_forward_pass():
    """A simulation row (constraint activation_lines:3, top_logprobs = 20): the answer is
    exactly three `i: v` lines, and each answer token comes with its log-prob and the top 20
    at its step, equal to the log-softmax of one forward pass over prompt + answer (the raw
    logits: the constraint only limits the choice)."""
    import torch

    from baez_ray.llm.backends import prompt_table
    from baez_ray.llm.backends.transformers_backend import TransformersChat

    chat = TransformersChat(LLMConfig(backend="transformers", model="pypi:smollm2-135m", num_cpus=1).model_dump())
    kept = {}
    step_logprobs = chat._step_logprobs

    def spy(steps, row, ids, k):  # the generated ids, to run them through the model again
        kept[row] = ids
        return step_logprobs(steps, row, ids, k)

    chat._step_logprobs = spy
    row = {"request_id": "r", "messages": prompts.simulation_messages("cats", [" The", " cat", " sat"]), "max_tokens": 40,
           "temperature": 0.0, "stop": None, "constraint": "activation_lines:3", "top_logprobs": 20}
    choice = {**row, "request_id": "choice", "messages": prompts.intervention_messages("cats", "I think", "cats purr", "it rains"),
              "constraint": "choice:1,2", "top_logprobs": None}  # intervention's parsed form: one of the two digits
    out = chat(prompt_table([row, {**row, "request_id": "plain", "top_logprobs": None}, choice])).to_pylist()
    assert out[2]["answer"].strip() in ("1", "2") and out[2]["output_tokens"] <= 2
    toks = out[0]["token_logprobs"]
    assert out[1]["token_logprobs"] is None and out[0]["answer"] == out[1]["answer"]  # the same greedy text
    assert prompts.parse_simulation(out[0]["answer"], 3)[0] is not None, out[0]["answer"]
    assert len(toks) == out[0]["output_tokens"] == len(kept[0]) and all(len(t["top"]) == 20 for t in toks)
    assert sorted(simulation.expected_values(toks, 3)) == [1, 2, 3]  # digits are among the top 20 at every value
    prompt_ids = chat.tok(chat.prompt_text(row["messages"]), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        lp = torch.log_softmax(chat.model(input_ids=torch.tensor([prompt_ids + kept[0]])).logits[0].float(), -1)
    for j, (t, a) in enumerate(zip(toks, kept[0])):
        step = lp[len(prompt_ids) + j - 1]
        assert t["logprob"] == pytest.approx(float(step[a]), abs=1e-4)
        assert [c["logprob"] for c in t["top"]] == pytest.approx(step.topk(20).values.tolist(), abs=1e-4)


def test_vllm_backend_reads_every_answer_tokens_logprobs():
    from baez_ray.llm.backends.vllm_backend import _postprocess, _preprocess, answer_tokens, structured_outputs

    assert structured_outputs("activation_lines:2") == {"regex": "1: (10|[0-9])\n2: (10|[0-9])"}
    assert structured_outputs("choice:1,2") == {"regex": "(1|2)"}

    row = {"max_tokens": 50, "temperature": 0.0, "stop": None, "constraint": None, "top_logprobs": 20, "tokenized_prompt": [1, 2]}
    assert _preprocess(row)["sampling_params"]["logprobs"] == 20
    assert _preprocess({**row, "top_logprobs": None})["sampling_params"]["logprobs"] == 1
    # per generated token: token id -> {logprob, rank, decoded_token}, the sampled one included
    lp = [{16: {"logprob": -0.1, "rank": 1, "decoded_token": "1"}, 17: {"logprob": -2.5, "rank": 2, "decoded_token": "2"}},
          {"25": {"logprob": -3.0, "rank": 3, "decoded_token": ":"}, "26": {"logprob": -0.2, "rank": 1, "decoded_token": "x"}}]
    toks = answer_tokens(lp, [16, 25])
    assert toks[0] == {"token": "1", "logprob": -0.1, "top": [{"token": "1", "logprob": -0.1}, {"token": "2", "logprob": -2.5}]}
    assert toks[1]["token"] == ":" and [t["token"] for t in toks[1]["top"]] == ["x", ":"]
    assert answer_tokens(lp, [16, 99]) is None and answer_tokens(None, [16]) is None
    out = _postprocess({"__baez_row": b"x", "generated_text": "1:", "num_input_tokens": 9, "num_generated_tokens": 2, "logprobs": lp,
                        "generated_tokens": [16, 25], "top_logprobs": 20})
    assert json.loads(out["__baez_toks"]) == toks
    assert _postprocess({"__baez_row": b"x", "generated_text": "1", "num_input_tokens": 9, "num_generated_tokens": 1})["__baez_toks"] == ""


# ------------------------------------------------------------------ the score stage against a local server


class SimulationServer(RecordingServer):
    """An OpenAI-compatible chat server for simulation prompts. `oracle`: where the excerpt
    holds the label's word, the true activations of that excerpt (looked up by its tokens),
    else 0, each value v written as round(v) with log-probs that put P(floor v) = 1 − frac,
    P(ceil v) = frac (expected value v exactly); `random`: integers drawn at random (seeded by
    the prompt), no log-probs. A label with 'lambda' gets an unreadable answer."""

    def __init__(self, mode: str, truth: dict[tuple, list[float]]):
        self.mode, self.truth = mode, truth
        super().__init__()

    def values(self, label: str, tokens: list[str], user: str) -> list[float]:
        if self.mode == "random":
            rng = np.random.default_rng(zlib.crc32(user.encode()))
            return [float(v) for v in rng.integers(0, 11, len(tokens))]
        if any(label == t.strip() for t in tokens):
            return self.truth[tuple(tokens)]
        return [0.0] * len(tokens)

    def completion(self, body: dict) -> dict:
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")  # the first: a retry appends its own
        label = re.search(r"^Label: (.*)$", user, re.M).group(1).strip()
        tokens = [json.loads(m) for m in re.findall(r"^\d+: (\".*\")$", user, re.M)]
        vals = self.values(label, tokens, user)
        content, toks = [], []
        for i, v in enumerate(vals, 1):
            lo, frac = int(math.floor(v)), v - math.floor(v)
            top = [(str(lo), math.log(1 - frac))] + ([(str(lo + 1), math.log(frac))] if frac > 0 else [])
            content.append(f"{i}: {round(v)}")
            toks += [(f"{i}", [(f"{i}", 0.0)]), (": ", [(": ", 0.0)]), (str(round(v)), top), ("\n", [("\n", 0.0)])]
        text = "\n".join(content) if "lambda" not in label else "I cannot tell."
        msg = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if self.mode == "oracle" and "lambda" not in label:
            msg["logprobs"] = {"content": [{"token": t, "logprob": top[0][1], "bytes": None,
                                            "top_logprobs": [{"token": c, "logprob": lp, "bytes": None} for c, lp in top]} for t, top in toks]}
        return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [msg],
                "usage": {"prompt_tokens": 100, "completion_tokens": 4 * len(vals)}}


def _simulate(mode: str, cap: int = 4):
    from baez_ray.stages.score import score_labels
    from baez_ray.stages.split import split_examples

    feats = synthetic_features().to_pylist()
    tests = {("syn", r["feature"]): split_examples(r["examples"], "top", 5, 10)[1] for r in feats}
    truth = {tuple(e["token_strs"]): [float(a) for a in e["acts"]] for exs in tests.values() for e in exs}
    labels = schema.conform(pa.Table.from_pylist(
        [{"sae_id": "syn", "layer": 3, "feature": f, "method": "exact", "label": w, "n_examples": 5, "input_tokens": 0,
          "output_tokens": 0, "cost_usd": 0.0, "tries": 1} for f, w in enumerate(WORDS) if w != "kappa"]), schema.LABELS)
    cfg = ScoreConfig(benchmarks=["simulation"], max_retries=1, control_method="exact", simulation_excerpts=cap)
    fake = SimulationServer(mode, truth)
    with serve_local(fake.handler()) as url:
        scorer = LLMConfig(backend="openai", model="fake-sim", base_url=url + "/v1", batch_size=16, max_retries=1, timeout_s=10)
        scores, info = score_labels(*as_dataset(tests), labels, cfg, scorer, seed=1)
    return scores.to_pandas(), info, fake


def test_true_activations_correlate_1_and_failures_are_counted(ray_local):
    df, info, fake = _simulate("oracle")
    # 11 labelled features × {exact, random_label}; 4 positives + 4 negatives simulated each
    assert len(df) == 22 and set(df["benchmark"]) == {"simulation"} and (df["n_shown"] == 8).all()
    assert all(r["logprobs"] is True and r["top_logprobs"] == 20 and "response_format" not in r for r in fake.requests)
    exact = df[df["method"] == "exact"].set_index("feature")
    ok = exact.drop(index=11)  # 'lambda' (feature 11): unreadable, retried once, then failed
    assert ok["correlation"].tolist() == pytest.approx([1.0] * len(ok), abs=1e-6) and (ok["n_failed"] == 0).all()
    assert ok["score_half_a"].tolist() == pytest.approx([1.0] * len(ok), abs=1e-6)
    assert exact.loc[11, "n_failed"] == 8 and math.isnan(exact.loc[11, "correlation"])
    assert info["retried_prompts"] == 8 * 2  # lambda's own 8 excerpts and those of the control that borrows it
    control = df[(df["method"] == "random_label") & (df["label"] != "lambda")]
    assert control["correlation"].mean() < 0.2  # another feature's label predicts activations where this feature has none


def test_random_predictions_correlate_about_0(ray_local):
    df, info, fake = _simulate("random", cap=10)
    exact = df[(df["method"] == "exact") & (df["feature"] != 11)]
    assert (exact["n_failed"] == 0).all() and (exact["n_shown"] == 20).all()
    assert abs(exact["correlation"].mean()) < 0.1 and (exact["correlation"].abs() < 0.3).all()
