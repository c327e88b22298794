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


def test_nla_direct_shortened_sends_the_av_text_to_the_explainer(ray_local, scorer_server):
    """nla_direct with nla_direct_shorten: each AV text becomes one explainer prompt whose
    answer is the label (the AV's text kept as evidence, the prompt version with the AV's
    name); a decoder error or an AV failure stays a row with its error, never a prompt."""
    import pyarrow as pa

    from baez_ray.config import LLMConfig
    from baez_ray.llm.rounds import label_rounds, rows_table
    from baez_ray.methods.nla_direct import _rows
    from helpers import scorer_cfg

    version = f"{prompts.NLA_DIRECT_VERSION}+av:tiny-self"
    key = lambda f: {"sae_id": "s", "layer": 0, "feature": f}  # noqa: E731
    expl = pa.Table.from_pylist([
        {**key(0), "explanation": "words about <<cobalt>> and <<cobalt>> again", "decoder_error": None, "av_error": None},
        {**key(1), "explanation": None, "decoder_error": "feature 1 is not in the SAE (it has 1 features)", "av_error": None},
        {**key(2), "explanation": None, "decoder_error": None, "av_error": "RuntimeError: out of memory"},
    ])
    done, pending = _rows(expl, True, "transformers", "tiny", version, 32)
    assert [(r["feature"], r["error"]) for r in done] == [(1, "feature 1 is not in the SAE (it has 1 features)"), (2, "RuntimeError: out of memory")]
    assert [r["feature"] for r in pending] == [0] and pending[0]["evidence"] == ["words about <<cobalt>> and <<cobalt>> again"]
    assert pending[0]["messages"] == prompts.nla_direct_messages("words about <<cobalt>> and <<cobalt>> again")
    assert pending[0]["max_tokens"] == 32
    llm = LLMConfig(**scorer_cfg(scorer_server))
    ds = ray_local.data.from_arrow(rows_table(pending, pa.schema([pa.field("layer", pa.int32())])))
    (row,) = label_rounds(ds, "nla_direct", prompts.ELEUTHER_MARKER, version, llm, max_retries=1).to_pylist()
    assert row["label"] == "cobalt" and row["prompt_version"] == version and row["evidence"] == pending[0]["evidence"]
    assert row["backend"] == "openai" and row["tries"] == 1 and row["input_tokens"] > 0
    unshortened, none = _rows(expl.slice(0, 1), False, "transformers", "tiny", version, 32)
    assert none == [] and unshortened[0]["label"] == unshortened[0]["raw"] == "words about <<cobalt>> and <<cobalt>> again"
