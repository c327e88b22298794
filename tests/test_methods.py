"""The method registry: a new labelling method is one module in baez_ray/methods/ (the
docs' "Adding a method" example, docs/methods.md, run as written), and job files are checked against
the registry when they are loaded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from baez_ray.config import ConfigError
from baez_ray.jobs import load_job

ROOT = Path(__file__).resolve().parents[1]


def docs_example() -> str:
    text = (ROOT / "docs" / "methods.md").read_text()
    section = text[text.index("## Adding a method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


CHECK = r'''
import pyarrow as pa, ray
from baez_ray import methods, schema
from baez_ray.jobs import load_job
spec = load_job("label.yaml")
assert spec.label.tier1 == "top_token", spec.label.tier1
assert "top_token" in methods.known(tier=1) and "top_token" not in methods.known(tier=2)
ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
ex = lambda toks, top: {"kind": "top", "rank": 0, "value": 1.0, "top_index": top, "token_strs": toks, "acts": [0.0] * len(toks)}
rows = [{"sae_id": "s", "model_id": "m", "layer": 3, "feature": i, "n_tokens": 10, "n_firing": 1, "max_activation": 1.0,
         "examples": [ex(["a", " volcano", "b"], 1)] if i == 0 else []} for i in range(2)]
feats = ray.data.from_arrow(schema.conform(pa.Table.from_pylist(rows, schema=schema.FEATURES), schema.FEATURES))
out = {r["feature"]: r for r in methods.label("top_token", feats, methods.LabelContext(name="top_token")).to_pylist()}
assert out[0]["label"] == "volcano" and out[0]["method"] == "top_token" and out[0]["error"] is None, out[0]
assert out[1]["label"] is None and out[1]["error"] == "no top example", out[1]
print("ok")
'''


def test_a_new_method_is_one_module(tmp_path):
    """Copy the package, add the docs' example as methods/top_token.py and nothing
    else: a label job file naming it validates, and the registry runs it on real rows."""
    pkg = tmp_path / "baez_ray"
    shutil.copytree(ROOT / "baez_ray", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "methods" / "top_token.py").write_text(docs_example())
    (tmp_path / "label.yaml").write_text("job: label\nfeatures: f/\nlabel:\n  tier1: top_token\n  explainer: {model: x}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_job_files_are_checked_against_the_registry(tmp_path):
    base = "job: label\nfeatures: f/\nlabel:\n  explainer: {model: x}\n"
    assert load_job(write(tmp_path, base)).label.tier2 == "eleuther_acts_top5"
    assert load_job(write(tmp_path, base + "  tier2: eleuther_acts_top20\n")).label.tier2 == "eleuther_acts_top20"
    with pytest.raises(ConfigError, match=r"key 'label.tier2': unknown method 'eleuther_top5'; known: eleuther_acts_topK, np_max_act"):
        load_job(write(tmp_path, base + "  tier2: eleuther_top5\n"))
    with pytest.raises(ConfigError, match=r"key 'label.tier1': baez cannot label tier-1 features; tier 1 methods: .*token_freq"):
        load_job(write(tmp_path, base + "  tier1: baez\n"))
    with pytest.raises(ConfigError, match=r"key 'label.tier3': nla_direct reads the SAE's decoder rows: the job needs the sae \(or saes\) section"):
        load_job(write(tmp_path, base + "  tier3: nla_direct\n  av_sidecar: jobs/av/x.yaml\n"))
    bench = "job: benchmark\nfeatures: f/\nbenchmark:\n  explainer: {model: x}\n  methods: [token_freq, baez, np_max_act, np_max_act]\n"
    with pytest.raises(ConfigError) as e:
        load_job(write(tmp_path, bench))
    msg = str(e.value)
    assert "key 'benchmark.methods.1': baez needs benchmark.av_sidecar" in msg and "a method is listed twice" in msg
