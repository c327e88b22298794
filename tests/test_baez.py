"""`baez` end to end on a tiny model: collect (with residuals) → self-verbalizer → explainer."""

from __future__ import annotations

import pyarrow.parquet as pq
import yaml
from transformers import AutoTokenizer

from baez_ray import prompts
from baez_ray.config import LLMConfig, validate
from baez_ray.run import execute
from baez_ray.stages.label import label_baez
from conftest import make_text


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
    labels = label_baez(features, str(sidecar), llm, n_examples=3, max_retries=1, av={"num_cpus": 0.5}, max_tokens=40).to_pylist()
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
