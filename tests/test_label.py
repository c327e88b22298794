"""LLM labelling: prompts, parsing, retries across features, failures recorded."""

from __future__ import annotations

import pyarrow as pa
import pytest

from baez_ray import schema
from baez_ray.llm import prompts
from baez_ray.config import LLMConfig
from baez_ray.methods.from_examples import label_with_llm


def test_mark_tokens_groups_consecutive_runs():
    toks = [" the", " big", " red", " dog", " ran"]
    assert prompts.mark_tokens(toks, [0, 5, 4, 0, 3], 3.0) == " the<< big red>> dog<< ran>>"
    assert prompts.mark_tokens(toks, [0, 0, 0, 0, 0], 0.0) == " the big red dog ran"


@pytest.mark.parametrize(
    "answer,label",
    [
        ("Reasoning here.\n[EXPLANATION]: spatial prepositions", "spatial prepositions"),
        ("**[EXPLANATION]:** \"numbers in lists\".", "numbers in lists"),
        ("explanation: cats\nmore text\nEXPLANATION: dogs and cats", "dogs and cats"),
    ],
)
def test_parse_marked(answer, label):
    assert prompts.parse_marked(answer, prompts.ELEUTHER_MARKER) == (label, None)


def test_parse_failures_say_why():
    assert prompts.parse_marked("no marker at all", prompts.ELEUTHER_MARKER)[1] == "it has no line starting with '[EXPLANATION]:'"
    assert prompts.parse_marked("[EXPLANATION]:   ", prompts.ELEUTHER_MARKER)[1].startswith("nothing follows")
    assert prompts.parse_marked(None, prompts.ELEUTHER_MARKER)[1] == "the answer was empty"


def feature(i: int, word: str) -> dict:
    ex = []
    for r in range(6):
        toks = [" we", " saw", f" {word}", " today", "."]
        ex.append({"kind": "top", "rank": r, "decile": None, "context_id": r, "position": 2, "value": 5.0 - r * 0.1,
                   "top_index": 2, "tokens": None, "token_strs": toks, "acts": [0, 0.5, 5.0 - r * 0.1, 0, 0], "residual": None})
    return {"sae_id": "t/0", "model_id": "t", "layer": 0, "feature": i, "n_tokens": 100, "n_firing": 6,
            "max_activation": 5.0, "examples": ex}


def test_eleuther_prompt_shape():
    msgs = prompts.eleuther_messages(feature(0, "cats")["examples"][:3])
    assert msgs[0]["role"] == "system" and len(msgs) == 2 + 2 * len(prompts.ELEUTHER_FEWSHOT)
    assert msgs[-1]["content"].splitlines() == [f"Example {i}: we saw<< cats>> today." for i in (1, 2, 3)]


def test_label_with_smollm2_retries_and_records(ray_local):
    table = schema.conform(pa.Table.from_pylist([feature(i, w) for i, w in enumerate(["cats", "rivers", "seven"])]), schema.FEATURES)
    llm = LLMConfig(backend="transformers", model="pypi:smollm2-135m", batch_size=8, num_cpus=1)
    labels = label_with_llm(ray_local.data.from_arrow(table), "np_max_act", llm, max_retries=1)
    assert labels.schema.equals(schema.LABELS, check_metadata=False)
    rows = sorted(labels.to_pylist(), key=lambda r: r["feature"])
    assert [r["feature"] for r in rows] == [0, 1, 2]  # one row per feature, none dropped
    for r in rows:
        assert r["prompt_version"] == prompts.NP_VERSION and r["n_examples"] == 6 and 1 <= r["tries"] <= 2
        assert (r["label"] is None) == (r["error"] is not None)
        assert r["input_tokens"] > 0 and r["raw"] is not None
