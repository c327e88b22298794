"""The transformers backend through Ray Data, on SmolLM2-135M-Instruct (PyPI)."""

from __future__ import annotations

import pytest

from baez_ray import schema
from baez_ray.backends import generate, prompt_table
from baez_ray.config import LLMConfig

COLORS = [{"role": "user", "content": "Name three colors."}]


def rows():
    out = []
    for i, q in enumerate(["Name three colors.", "What is 2+2?", "Say hello.", "Name a fruit.", "Count to five.", "Name an animal."]):
        out.append({"request_id": f"r{i}", "messages": [{"role": "user", "content": q}], "max_tokens": 12 if i != 2 else 3,
                    "temperature": 0.0, "stop": ["\n3."] if i == 0 else None, "feature": 100 + i})
    return out


@pytest.fixture(scope="module")
def cfg():
    return LLMConfig(backend="transformers", model="pypi:smollm2-135m", batch_size=4, num_cpus=1,
                     price={"input_per_mtok": 1.0, "output_per_mtok": 2.0})


def test_batched_generation_through_ray_data(ray_local, cfg):
    ds = ray_local.data.from_arrow(prompt_table(rows()))
    out = generate(ds, cfg).to_pandas()
    out = out.sort_values("request_id").reset_index(drop=True)
    assert list(out["feature"]) == [100, 101, 102, 103, 104, 105]  # passthrough column kept
    assert set(schema.ANSWERS.names) <= set(out.columns)
    assert out["error"].isna().all() and (out["answer"].str.len() > 0).all()
    assert (out["output_tokens"] <= out["max_tokens"]).all() and out.loc[2, "output_tokens"] == 3
    assert "3." not in out.loc[0, "answer"] and "1." in out.loc[0, "answer"]  # cut at the stop string
    assert (out["input_tokens"] > 5).all()
    assert out["cost_usd"].tolist() == pytest.approx([(i * 1.0 + o * 2.0) / 1e6 for i, o in zip(out["input_tokens"], out["output_tokens"])])
    assert set(out["backend"]) == {"transformers"} and set(out["model"]) == {"pypi:smollm2-135m"}


def test_left_padded_batch_matches_single_prompt(cfg):
    """Greedy answers do not depend on the other prompts of the batch (left padding)."""
    from baez_ray.backends.transformers_backend import TransformersChat

    chat = TransformersChat(cfg.model_dump())
    texts = [chat.prompt_text(r["messages"]) for r in rows()[:3]]
    batched, _, _ = chat.generate(texts, [10, 10, 10], 0.0)
    single, _, _ = chat.generate(texts[1:2], [10], 0.0)
    assert batched[1] == single[0]
