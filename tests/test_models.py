"""The base model read at layer L, and SAE loading."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from baez_ray.config import ModelConfig, SAEConfig
from baez_ray.models.lm import ResidualReader
from baez_ray.models.sae import load_sae
from conftest import build_random_sae, build_tiny_gemma


@pytest.mark.parametrize("layer", [0])  # HF's last hidden_states entry is after the final norm
def test_residual_is_hidden_state_after_block(tiny_gemma, layer):
    lm = ResidualReader(ModelConfig(id="t", path=str(tiny_gemma), layer=layer, device="cpu"))
    ids = torch.randint(4, 200, (2, 12))
    plain = AutoModelForCausalLM.from_pretrained(tiny_gemma).eval()  # no hook on this copy
    ref = plain(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]
    assert torch.equal(lm.residual(ids), ref)


def test_tuple_returning_blocks(tmp_path):
    """GPT-2 blocks return tuples; the hook takes the hidden states from the first element."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    lm = ResidualReader(ModelConfig(id="g", path=str(tmp_path), layer=1, device="cpu"))
    ids = torch.randint(0, 100, (1, 10))
    plain = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert torch.equal(lm.residual(ids), plain(input_ids=ids, output_hidden_states=True).hidden_states[2])


def test_layer_out_of_range(tiny_gemma):
    with pytest.raises(ValueError, match=r"model.layer=5 but .* has 2 layers"):
        ResidualReader(ModelConfig(id="t", path=str(tiny_gemma), layer=5, device="cpu"))


def test_sae_width_mismatch_and_missing(tmp_path):
    sae = build_random_sae(tmp_path / "sae", d_in=32, d_sae=16)
    with pytest.raises(ValueError, match=r"d_in=32 does not match the model's hidden size 64"):
        load_sae(SAEConfig(id="s", path=str(sae)), "cpu", d_model=64)
    with pytest.raises(FileNotFoundError, match="no such SAE directory"):
        load_sae(SAEConfig(id="s", path=str(tmp_path / "nope")), "cpu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot load SAE"):
        load_sae(SAEConfig(id="s", path=str(tmp_path / "broken")), "cpu")


FAULTS = """
import json, resource, sys, torch
from baez_ray.config import ModelConfig
from baez_ray.stages.collect import CollectWorker
from baez_ray.models.lm import ResidualReader
model = {"id": "t", "path": sys.argv[2], "layer": 1, "device": "cpu"}
if sys.argv[1] == "worker":  # a collect worker's process, as Ray builds it
    lm = CollectWorker(model, [{"id": "s", "path": sys.argv[3], "layer": 1}], {}, seed=0, n_features=[96], bos_id=None,
                       threads=1).lm
else:
    torch.set_num_threads(1)
    lm = ResidualReader(ModelConfig(**model))
ids = torch.randint(4, 200, (8, 128))
for i in range(6):
    if i == 2:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    lm.residuals(ids)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4))
"""


def test_a_collect_worker_reuses_freed_tensor_memory(tmp_path):
    """glibc hands a freed tensor of a few MB back to the kernel, and the next one faults in
    fresh zeroed pages: ~100,000 faults per forward of Gemma 3 270M on 8 × 128 tokens,
    10-15% of its time on one thread. A CollectWorker's process keeps the memory for the
    next tensors (`hold_freed_memory`). Page faults per forward of a 2-block Gemma 3 of
    Gemma 3 270M's width on 8 × 128 tokens, after two warm-up passes, in fresh processes."""
    import subprocess
    import sys

    model = build_tiny_gemma(tmp_path / "model", hidden=640)
    sae = build_random_sae(tmp_path / "sae", d_in=640)

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode, str(model), str(sae)], capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.strip().splitlines()[-1])

    plain, worker = faults("plain"), faults("worker")
    assert plain > 5000, f"{plain} faults per forward: the case should show glibc's default"
    assert worker < plain / 5, (worker, plain)
