"""The activation verbalizer: sidecar checks, injection at the marker row, generation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from baez_ray.config import ConfigError
from baez_ray.models.av import Verbalizer, last_paragraph, load_sidecar, parse_explanation

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
    p = write(tmp_path, inject_layer=5, injection_scale="auto")
    deep = Verbalizer(load_sidecar(p), "cpu", str(p))
    assert len(deep.explain(np.ones((1, deep.d_model), np.float32))) == 1
    with pytest.raises(ValueError, match=r"vectors of shape \(1, 7\)"):
        verbalizer.explain(np.ones((1, 7), np.float32))


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
