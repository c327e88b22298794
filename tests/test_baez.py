"""`baez` end to end on a tiny model: collect (with residuals) → self-verbalizer → explainer."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from baez_ray.llm import prompts
from baez_ray.config import AVRunConfig, LLMConfig, validate
from baez_ray.jobs import execute
from baez_ray.methods.av_explanations import label_baez
from conftest import make_text


@pytest.mark.slow
def test_baez_labels_every_feature_with_its_evidence(ray_local, tiny_gemma, random_sae, tmp_path):
    (tmp_path / "c.txt").write_text(make_text(400, 7))
    spec = validate({
        "job": "collect", "name": "b",
        "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "s", "path": str(random_sae)},
        "corpus": {"paths": [str(tmp_path / "c.txt")], "context_len": 24},
        "collect": {"top_k": 4, "window": 8, "window_left": 5, "keep_residual": True, "residual_top_n": 3, "features": 3, "reservoir": 0},
    })
    execute(spec, tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(tiny_gemma)
    ids = tok("the cat sat on a mat", add_special_tokens=True)["input_ids"]
    cat = tok(" cat", add_special_tokens=False)["input_ids"]
    assert len(cat) == 1
    pos = ids.index(cat[0])
    sidecar = tmp_path / "self.yaml"
    sidecar.write_text(yaml.safe_dump({
        "name": "tiny-self", "av_model": str(tiny_gemma), "base_model": str(tiny_gemma), "extraction_layer": 0,
        "self_verbalizer": True, "prompt_template": "the cat sat on a mat", "chat": False, "marker": "cat",
        "marker_token_id": cat[0], "marker_left_id": ids[pos - 1], "marker_right_id": ids[pos + 1],
        "injection_scale": "auto", "temperature": 0.0, "max_new_tokens": 8,
    }))
    features = ray_local.data.read_parquet(str(tmp_path / "run" / "features"))
    llm = LLMConfig(backend="transformers", model="pypi:smollm2-135m", batch_size=4)
    every = AVRunConfig(num_cpus=0.5, dedup_window=0)  # every example verbalized, near-duplicates too
    labels = label_baez(features, str(sidecar), llm, n_examples=3, max_retries=1, av=every, max_tokens=40).to_pylist()
    n_features = pq.read_table(tmp_path / "run" / "features").num_rows
    assert sorted(r["feature"] for r in labels) == list(range(n_features)) == [0, 1, 2]
    for r in labels:
        assert r["method"] == "baez" and r["prompt_version"] == prompts.BAEZ_VERSION
        assert (r["label"] is None) == (r["error"] is not None)
        assert r["n_examples"] == len(r["evidence"]) == len(r["evidence_scores"]) == 3
        assert all(isinstance(t, str) for t in r["evidence"])
        assert r["evidence_scores"][0] == 10 and all(1 <= s <= 10 for s in r["evidence_scores"])
        assert r["evidence_scores"] == sorted(r["evidence_scores"], reverse=True)
    assert sum(r["label"] is not None for r in labels) >= 2
    # baez_k2 through the registry: two explanations whatever n_examples says; rows carry its name
    from baez_ray import methods

    ctx = methods.LabelContext(name="baez_k2", explainer=llm, max_retries=1, n_examples=3, av_sidecar=str(sidecar), av=every)
    k2 = methods.label("baez_k2", features, ctx).to_pylist()
    assert sorted(r["feature"] for r in k2) == [0, 1, 2] and {r["method"] for r in k2} == {"baez_k2"}
    assert all(r["n_examples"] == 2 and len(r["evidence"]) == 2 for r in k2 if r["evidence"] is not None)


def tiny_self_sidecar(tiny_gemma, path, name="tiny-self"):
    """A self-verbalizer sidecar for the tiny Gemma: the vector replaces the row of 'cat'."""
    tok = AutoTokenizer.from_pretrained(tiny_gemma)
    ids = tok("the cat sat on a mat", add_special_tokens=True)["input_ids"]
    cat = tok(" cat", add_special_tokens=False)["input_ids"]
    pos = ids.index(cat[0])
    path.write_text(yaml.safe_dump({
        "name": name, "av_model": str(tiny_gemma), "base_model": str(tiny_gemma), "extraction_layer": 0,
        "self_verbalizer": True, "prompt_template": "the cat sat on a mat", "chat": False, "marker": "cat",
        "marker_token_id": cat[0], "marker_left_id": ids[pos - 1], "marker_right_id": ids[pos + 1],
        "injection_scale": "auto", "other_rows_scale": "sqrt_d_model", "temperature": 0.0, "max_new_tokens": 8,
    }))
    return path


def test_nla_direct_labels_each_feature_from_its_decoder_row(ray_local, tiny_gemma, random_sae, tmp_path):
    """nla_direct without the explainer: the AV's text on W_dec[f] is the label of f; a
    feature that is not in the SAE, or of another SAE, keeps its row with the error."""
    import torch
    from sae_lens import SAE

    from baez_ray.config import SAEConfig
    from baez_ray.av.hf_engine import Verbalizer
    from baez_ray.av.sidecar import load_sidecar
    from baez_ray.methods.nla_direct import label_nla_direct

    sidecar = tiny_self_sidecar(tiny_gemma, tmp_path / "self.yaml")
    keys = [{"sae_id": "s", "layer": 0, "feature": f} for f in (0, 5, 17)] + [
        {"sae_id": "s", "layer": 0, "feature": 500}, {"sae_id": "other", "layer": 0, "feature": 1}]
    features = ray_local.data.from_items(keys)
    labels = label_nla_direct(features, str(sidecar), [SAEConfig(id="s", path=str(random_sae), layer=0)], av=AVRunConfig(num_cpus=0.5, batch_size=2)).to_pylist()
    by = {(r["sae_id"], r["feature"]): r for r in labels}
    assert len(labels) == len(keys) and set(by) == {(k["sae_id"], k["feature"]) for k in keys}
    version = f"{prompts.NLA_DIRECT_VERSION}+av:tiny-self"
    assert all(r["method"] == "nla_direct" and r["prompt_version"] == version for r in labels)
    assert "not in the SAE (it has 96 features)" in by[("s", 500)]["error"] and by[("s", 500)]["label"] is None
    assert "but the job's SAEs are ['s']" in by[("other", 1)]["error"]
    # the label is what the AV says about the decoder row, computed here directly
    sae = SAE.load_from_disk(random_sae, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the AV actor (threads = ceil(num_cpus))
    try:
        direct = Verbalizer(load_sidecar(sidecar), "cpu").explain(sae.W_dec[[0, 5, 17]].detach().numpy())
    finally:
        torch.set_num_threads(threads)
    for f, text in zip((0, 5, 17), direct):
        r = by[("s", f)]
        assert r["error"] is None and r["label"] == text and r["evidence"] == [text] and r["raw"] == text
        assert r["backend"] == "av:transformers" and r["model"] == str(tiny_gemma) and r["n_examples"] == 0


@pytest.mark.slow
def test_label_job_tier3_nla_direct_shortened(ray_local, tiny_gemma, random_sae, tmp_path):
    """The label job with label.tier3 = nla_direct and av.nla_direct_shorten: every tier-3
    feature gets one label row, written by the explainer from the AV's text (its evidence),
    with the prompt version; the explainer's `max_tokens` bounds every answer (SmolLM2 on
    this CPU: 32 tokens instead of the method's 200 cut the test from ~100 s)."""
    (tmp_path / "c.txt").write_text(make_text(300, 5))
    sidecar = tiny_self_sidecar(tiny_gemma, tmp_path / "self.yaml")
    spec = validate({
        "job": "label", "name": "nd",
        "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "s", "path": str(random_sae)},
        "corpus": {"paths": [str(tmp_path / "c.txt")], "context_len": 24},
        "collect": {"top_k": 4, "window": 8, "window_left": 5, "features": 3, "reservoir": 0},
        # every feature to tier 3 (τ = 1 everywhere)
        "route": {"tau_in": 1.0, "tau_out": 1.0, "tau_cross": 1.0, "num_cpus": 0.5},
        "label": {"explainer": {"backend": "transformers", "model": "pypi:smollm2-135m", "batch_size": 4, "max_tokens": 32},
                  "tier3": "nla_direct", "av_sidecar": str(sidecar), "av": {"num_cpus": 0.5, "nla_direct_shorten": True},
                  "max_retries": 1},
    })
    run = execute(spec, tmp_path / "run")
    labels = sorted(pq.read_table(tmp_path / "run" / "labels").to_pylist(), key=lambda r: r["feature"])
    n = pq.read_table(tmp_path / "run" / "features").num_rows
    assert [r["feature"] for r in labels] == list(range(n)) and n == 3
    assert run.manifest["stages"]["label"]["by_tier"] == {"1": 0, "2": 0, "3": 3}
    for r in labels:
        assert r["tier"] == 3 and r["method"] == "nla_direct"
        assert r["prompt_version"] == f"{prompts.NLA_DIRECT_VERSION}+av:tiny-self"
        assert len(r["evidence"]) == 1 and r["evidence"][0]  # the AV's text on the decoder row
        assert r["backend"] == "transformers" and r["model"] == "pypi:smollm2-135m" and r["input_tokens"] > 0
        assert (r["label"] is None) == (r["error"] is not None)
        assert 0 < r["output_tokens"] <= 32 * r["tries"]  # the job's max_tokens, on every try
    assert sum(r["label"] is not None for r in labels) >= 2
