"""Preflight and errors through the CLI, in a subprocess: every bad input is named (the file
or the key) in one line, with the documented exit code, before a Ray cluster starts, and
without a traceback unless --debug."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import build_random_sae, make_text
from helpers import EXIT_FAILED, EXIT_INVALID, cli



@pytest.fixture(scope="module")
def good(tiny_gemma, random_sae, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("preflight")
    (tmp / "corpus.txt").write_text(make_text(300, 1))
    return {
        "job": "label", "name": "pf", "out": str(tmp / "runs"),
        "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 1},
        "sae": {"id": "s", "path": str(random_sae)},
        "corpus": {"paths": [str(tmp / "corpus.txt")], "context_len": 16},
        "label": {"explainer": {"backend": "transformers", "model": str(tiny_gemma)}},
    }


def with_(job: dict, dotted: str, value) -> dict:
    job = yaml.safe_load(yaml.safe_dump(job))
    cur = job
    keys = dotted.split(".")
    for k in keys[:-1]:
        cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return job


def write(tmp: Path, job: dict) -> Path:
    p = tmp / "job.yaml"
    p.write_text(yaml.safe_dump(job))
    return p


def assert_named_before_ray(res, left, *needles, code=EXIT_INVALID):
    assert res.returncode == code, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(any(n in e for e in errors) for n in needles), res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert left == [], f"a Ray cluster was started: {left}"


def test_good_job_validates_and_passes_preflight(good, tmp_path):
    res, left = cli("validate", str(write(tmp_path, good)))
    assert res.returncode == 0 and "is a valid 'label' job" in res.stderr, res.stderr
    assert left == []


@pytest.mark.parametrize("case", ["corpus", "sae_folder", "model_folder", "explainer_folder", "layer", "features"])
def test_missing_or_wrong_paths_are_named(good, tmp_path, case):
    key, value, needle = {
        "corpus": ("corpus.paths", [str(tmp_path / "nope.txt")], "nope.txt: no such corpus file"),
        "sae_folder": ("sae.path", str(tmp_path / "no_sae"), "sae.path: " + str(tmp_path / "no_sae") + ": no such SAE folder"),
        "model_folder": ("model.path", str(tmp_path / "no_model"), "model.path: " + str(tmp_path / "no_model") + ": no such local model folder"),
        "explainer_folder": ("label.explainer.model", str(tmp_path / "no_expl"), "label.explainer.model: " + str(tmp_path / "no_expl") + ": no such local model folder"),
        "layer": ("model.layer", 99, "model.layer: 99, but"),
        "features": ("features", str(tmp_path / "no_features"), "features: "),
    }[case]
    job = write(tmp_path, with_(good, key, value))
    res, left = cli("run", str(job))
    assert_named_before_ray(res, left, needle)
    res, _ = cli("validate", str(job), "--offline")
    assert res.returncode == EXIT_INVALID and needle in res.stderr


def test_sae_width_against_model_hidden_size(good, tmp_path):
    narrow = build_random_sae(tmp_path / "sae32", d_in=32)
    res, left = cli("run", str(write(tmp_path, with_(good, "sae.path", str(narrow)))))
    assert_named_before_ray(res, left, f"sae.path: {narrow}: d_in=32 does not match the hidden size 64")


def test_anthropic_without_key(good, tmp_path):
    job = with_(good, "label.explainer", {"backend": "anthropic", "model": "claude-sonnet-4-5"})
    res, left = cli("run", str(write(tmp_path, job)))
    assert_named_before_ray(res, left, "label.explainer.api_key_env: ", "ANTHROPIC_API_KEY")


def sidecar(tmp: Path, tiny_gemma: Path, **over) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_gemma)
    ids = tok("the cat sat on a mat", add_special_tokens=True)["input_ids"]
    i = ids.index(tok(" sat", add_special_tokens=False)["input_ids"][0])
    sc = {"name": "t", "av_model": str(tiny_gemma), "base_model": str(tiny_gemma), "extraction_layer": 1, "chat": False,
          "prompt_template": "the cat sat on a mat", "marker": "sat", "marker_token_id": ids[i],
          "marker_left_id": ids[i - 1], "marker_right_id": ids[i + 1], "injection_scale": 1.0, **over}
    p = tmp / "sidecar.yaml"
    p.write_text(yaml.safe_dump(sc))
    return p


def test_av_sidecar_marker_and_neighbours(good, tiny_gemma, tmp_path):
    ok = sidecar(tmp_path, tiny_gemma)
    res, left = cli("validate", str(write(tmp_path, with_(good, "label.av_sidecar", str(ok)))))
    assert res.returncode == 0, res.stderr
    no_marker = sidecar(tmp_path, tiny_gemma, prompt_template="the cat on a mat")
    res, left = cli("run", str(write(tmp_path, with_(good, "label.av_sidecar", str(no_marker)))))
    assert_named_before_ray(res, left, f"label.av_sidecar: {no_marker}: prompt_template must contain the marker")
    wrong = sidecar(tmp_path, tiny_gemma, marker_left_id=3)
    res, left = cli("run", str(write(tmp_path, with_(good, "label.av_sidecar", str(wrong)))))
    assert_named_before_ray(res, left, f"label.av_sidecar: {wrong}: marker left neighbour is token")


def test_out_under_a_regular_file(good, tmp_path):
    (tmp_path / "afile").write_text("x")
    res, left = cli("run", str(write(tmp_path, good)), "--out", str(tmp_path / "afile" / "run"))
    assert_named_before_ray(res, left, "--out: ", "afile is a file")


def test_unreachable_ray_address_fails_fast(good, tmp_path):
    res, left = cli("run", str(write(tmp_path, with_(good, "ray.address", "127.0.0.1:1"))))
    assert_named_before_ray(res, left, "ray.address: 127.0.0.1:1: nothing answers there")


def test_every_problem_at_once(good, tmp_path):
    job = with_(with_(with_(good, "model.layer", 99), "sae.path", str(tmp_path / "no_sae")), "corpus.paths", [str(tmp_path / "x.txt")])
    res, left = cli("run", str(write(tmp_path, job)))
    assert_named_before_ray(res, left, "model.layer: ", "sae.path: ", "corpus.paths: ")
    assert len([line for line in res.stderr.splitlines() if line.startswith("error: ")]) == 3


def test_errors_after_preflight_are_one_line_and_traceback_with_debug(tmp_path):
    res, _ = cli("report", str(tmp_path / "no_run"))
    assert res.returncode == EXIT_FAILED and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    res, _ = cli("report", str(tmp_path / "no_run"), "--debug")
    assert res.returncode == EXIT_FAILED and "Traceback" in res.stderr


def test_ray_wrappers_are_unwrapped():
    from ray.exceptions import ActorDiedError, RayTaskError

    from baez_ray.errors import user_message

    cause = ValueError("sae.path /x: d_in=512 does not match the model's hidden size 640")
    wrapped = RayTaskError("CollectWorker.__init__", "Traceback ...\nValueError: " + str(cause), cause)
    assert user_message(wrapped) == (str(cause), True)
    assert user_message(wrapped.as_instanceof_cause()) == (str(cause), True)
    assert user_message(ActorDiedError(wrapped)) == (str(cause), True)
    msg, known = user_message(ZeroDivisionError("division by zero"))
    assert not known and msg == "ZeroDivisionError: division by zero"
