"""The transformers backend through Ray Data, on SmolLM2-135M-Instruct (PyPI)."""

from __future__ import annotations

import pytest

from baez_ray import schema
from baez_ray.llm.backends import generate, prompt_table
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
    from baez_ray.llm.backends.transformers_backend import TransformersChat

    chat = TransformersChat(cfg.model_dump())
    texts = [chat.prompt_text(r["messages"]) for r in rows()[:3]]
    batched, _, _, _ = chat.generate(texts, [10, 10, 10], 0.0)
    single, _, _, _ = chat.generate(texts[1:2], [10], 0.0)
    assert batched[1] == single[0]


def test_shared_prefix_cache_gives_the_plain_batch_answers(cfg):
    """The system prompt every scorer prompt opens with is run once per call as a KV cache
    (pads go between it and each prompt's own tokens): greedy answers and token counts are
    those of plain left-padded batches, with and without the binary-list constraint, and a
    single prompt reuses the prefix kept from the call before."""
    from baez_ray.llm.backends.transformers_backend import TransformersChat
    from baez_ray.llm.prompts import scorer_messages, parse_binary_list

    chat = TransformersChat(cfg.model_dump())
    assert chat.prefix_cache  # SmolLM2: full attention only
    excerpts = ["The cat sat on the mat.", "Stocks fell sharply on Monday.", "She fed the cat twice a day.",
                "Rain is expected over the weekend.", "A kitten slept by the fire.", "The cat and the dog played."]
    texts = [chat.prompt_text(scorer_messages(bench, label, excerpts[i : i + 3]))
             for i, (bench, label) in enumerate([("detection", "cats"), ("detection", "the weather"), ("fuzz", "cats"), ("fuzz", "finance")])]
    shared = chat._common_prefix([chat.tok(t, add_special_tokens=False)["input_ids"] for t in texts])
    assert shared >= 20  # the chat template's opening and the first sentence of both system prompts

    cached = chat.generate(texts, [12] * 4, 0.0, "binary_list:3"), chat.generate(texts, [8] * 4, 0.0)
    reused = chat.prefix_tokens_reused
    single = chat.generate(texts[2:3], [12], 0.0, "binary_list:3")
    assert chat.prefix_tokens_reused - reused >= shared  # the single prompt started from the kept prefix

    chat.prefix_cache = False
    plain = chat.generate(texts, [12] * 4, 0.0, "binary_list:3"), chat.generate(texts, [8] * 4, 0.0)
    assert cached == plain
    assert all(parse_binary_list(a, 3)[0] is not None for a in cached[0][0])
    assert single[0][0] == plain[0][0][2] and single[1][0] == plain[0][1][2]
