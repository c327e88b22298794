"""Job files: validation errors name the key; overrides; the CLI commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from baez_ray.config import ConfigError
from baez_ray.jobs import load_job

ROOT = Path(__file__).resolve().parent.parent
GOOD = """
job: collect
model: {id: m, path: /models/m, layer: 3}
sae: {id: s, path: /saes/s}
corpus: {paths: [a.txt]}
"""


def write(tmp_path, text, name="job.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_job_and_defaults(tmp_path):
    spec = load_job(write(tmp_path, GOOD))
    assert spec.collect.top_k == 20 and spec.collect.window == 32 and spec.corpus.context_len == 128


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'collect.topk': unknown key"):
        load_job(write(tmp_path, GOOD + "collect: {topk: 3}\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'model.layer'"):
        load_job(write(tmp_path, GOOD.replace("layer: 3", "layer: three")))


def test_missing_section_and_conflicting_sources(tmp_path):
    with pytest.raises(ConfigError, match="needs section"):
        load_job(write(tmp_path, "job: collect\n"))
    with pytest.raises(ConfigError, match="exactly one of sae.path or sae.release"):
        load_job(write(tmp_path, GOOD.replace("path: /saes/s", "path: /saes/s, release: r, sae_id: x")))


def test_label_answer_length_is_a_job_setting(tmp_path):
    label = GOOD.replace("job: collect", "job: label") + "label: {explainer: {model: pypi:smollm2-135m%s}%s}\n"
    assert load_job(write(tmp_path, label % ("", ""))).label.explainer.max_tokens is None  # each method's own
    assert load_job(write(tmp_path, label % (", max_tokens: 48", ""))).label.explainer.max_tokens == 48
    with pytest.raises(ConfigError, match=r"key 'label.explainer.max_tokens'"):
        load_job(write(tmp_path, label % (", max_tokens: 2", "")))
    with pytest.raises(ConfigError, match=r"scorer.max_tokens: a scorer's answer length is set by each benchmark"):
        load_job(write(tmp_path, label % ("", ", score: {scorer: {model: pypi:smollm2-135m, max_tokens: 48}}")))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such job file"):
        load_job(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="empty job file"):
        load_job(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(write(tmp_path, "job: [collect"))
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"job: \xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_job(p)


def test_overrides(tmp_path):
    spec = load_job(write(tmp_path, GOOD), ["collect.top_k=7", "model.dtype=bfloat16", "corpus.paths=[x.txt, y.txt]"])
    assert spec.collect.top_k == 7 and spec.model.dtype == "bfloat16" and spec.corpus.paths == ["x.txt", "y.txt"]
    with pytest.raises(ConfigError, match="key 'collect.top_k'"):
        load_job(write(tmp_path, GOOD), ["collect.top_k=-1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        load_job(write(tmp_path, GOOD), ["collect.top_k"])


def cli(*args):
    return subprocess.run([sys.executable, "-m", "baez_ray.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_validate_every_shipped_job():
    for job in sorted((ROOT / "jobs").glob("*.yaml")):
        res = cli("validate", str(job), "--schema-only")  # their inputs live on a cluster (preflight: test_preflight.py)
        assert res.returncode == 0, (job, res.stderr)
        assert "is a valid" in res.stderr


def test_cli_validate_reports_key(tmp_path):
    res = cli("validate", str(write(tmp_path, GOOD)), "--set", "collect.windw=3")
    assert res.returncode == 2 and "key 'collect.windw': unknown key" in res.stderr


def test_shipped_av_sidecars_validate():
    from baez_ray.av.sidecar import load_sidecar

    sidecars = sorted((ROOT / "jobs" / "av").glob("*.yaml"))
    assert sidecars
    for p in sidecars:
        sc = load_sidecar(p)
        assert sc.prompt_template.count(sc.marker) == 1
