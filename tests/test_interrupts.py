"""Exiting honestly, through the CLI in a subprocess: SIGINT or SIGTERM during collect stops the run
within seconds with a snapshot the rerun resumes from, and leaves no process of the run
behind; a label run whose LLM calls failed for some rows exits with the partial-failure
code and its report shows the failures as failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import build_random_sae, make_text, our_pids_under, serve_local
from helpers import KEY, KEY_ENV, Outage, tagged_features

pytestmark = pytest.mark.slow  # whole jobs (execute / the CLI with Ray): not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
EXIT_PARTIAL, EXIT_STOPPED = 3, {"SIGINT": 130, "SIGTERM": 143}


class Session:
    """`baez-ray run` in subprocesses sharing one private Ray temp dir."""

    def __init__(self, tmp: Path, **env):
        self.ray_tmp = tempfile.mkdtemp(prefix="bin", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONUNBUFFERED="1", RAY_TMPDIR=self.ray_tmp, **env)
        self.tmp, self.n = tmp, 0

    def start(self, job: Path, out: Path) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        log = self.tmp / f"run-{self.n}.log"
        proc = subprocess.Popen([sys.executable, "-m", "baez_ray.cli", "run", str(job), "--out", str(out)], env=self.env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def leftovers(self, patience_s: float = 30) -> list[int]:
        """The run's processes still alive once it has exited (waits while they go away)."""
        deadline = time.monotonic() + patience_s
        while (left := our_pids_under(self.ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def close(self) -> None:
        for pid in our_pids_under(self.ray_tmp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def collect_job(tmp: Path, tiny_gemma: Path) -> Path:
    sae = build_random_sae(tmp / "sae")
    (tmp / "corpus.txt").write_text(make_text(4000, 3))
    job = {
        "job": "collect", "name": "stop",
        "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "s", "path": str(sae)},
        "corpus": {"paths": [str(tmp / "corpus.txt")], "context_len": 24},
        # parts of 8 contexts; a snapshot every part by progress, never by time
        "collect": {"top_k": 6, "window": 10, "window_left": 5, "features": 12, "reservoir": 8, "batch_size": 1,
                    "checkpoint_s": 1.0e6, "checkpoint_contexts": 8},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.timeout(900)
@pytest.mark.parametrize("how", ["ctrl-c-group", "sigterm-driver"])
def test_stop_during_collect_saves_a_snapshot_the_rerun_uses(tiny_gemma, tmp_path, how):
    """SIGINT to the driver's whole process group (Ctrl-C in a terminal: the driver and
    every Ray process get it), SIGTERM to the driver alone (`kill PID`, a scheduler's stop).
    (SIGINT to the driver alone takes the driver's path of the first and the workers' of
    the second: not run again, it cost 40 s of the suite.)"""
    signame = "SIGTERM" if how.startswith("sigterm") else "SIGINT"
    job, out = collect_job(tmp_path, tiny_gemma), tmp_path / "run"
    s = Session(tmp_path)
    try:
        proc, log = s.start(job, out)
        marker = out / "collect_state" / "COMMITTED.json"
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        if how == "ctrl-c-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, signame))
        rc = proc.wait(timeout=120)
        text = log.read_text()
        assert rc == EXIT_STOPPED[signame], text[-4000:]
        assert f"stopped ({signame}); rerun the same command to resume" in text
        assert "Traceback" not in text, text[-4000:]
        assert s.leftovers() == [], "processes of the stopped run survive"
        m = json.loads((out / "manifest.json").read_text())
        assert m["status"] == "stopped" and m["stages"]["collect"]["error"] == f"KeyboardInterrupt: {signame}"
        snap = json.loads(marker.read_text())
        assert 0 < len(snap["done"]) < len(snap["parts"]), "stopped before the end of collect"

        proc, log = s.start(job, out)
        assert proc.wait(timeout=300) == 0, log.read_text()[-4000:]
        m = json.loads((out / "manifest.json").read_text())
        st = m["stages"]["collect"]
        assert st["resumed_parts"] == len(snap["done"])
        assert 0 < st["contexts_run"] < m["stages"]["contexts"]["contexts"]
        assert st["tokens"] == m["stages"]["contexts"]["tokens"]
        assert s.leftovers() == []
    finally:
        s.close()


@pytest.mark.timeout(600)
def test_failed_llm_rows_exit_partial_with_a_banner(tmp_path):
    from baez_ray.rundir import write_table

    write_table(tagged_features(8), tmp_path / "features")
    fake = Outage(failing={2, 5})
    s = Session(tmp_path, **{KEY_ENV: KEY})
    with serve_local(fake.handler()) as fake.url:
        job = {"job": "label", "name": "partial", "features": str(tmp_path / "features"),
               "route": {"tau_in": 1.0, "tau_out": 1.0, "tau_cross": -1.0, "num_cpus": 0.5},
               "label": {"tier2": "eleuther_acts_top5", "max_retries": 0,
                         "explainer": {"backend": "anthropic", "model": "claude-sonnet-4-5", "base_url": fake.url,
                                       "api_key_env": KEY_ENV, "max_retries": 0, "timeout_s": 10, "batch_size": 4}}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        out = tmp_path / "run"
        try:
            proc, log = s.start(tmp_path / "job.yaml", out)
            rc = proc.wait(timeout=400)
        finally:
            s.close()
    text = log.read_text()
    assert rc == EXIT_PARTIAL, text[-4000:]
    assert "label: 2 of 8 features got no label (2 failed in the LLM backend" in text
    assert "rerun the same command to retry only those" in text
    page = (out / "report" / "index.html").read_text()
    assert "class=banner" in page and "2 of 8 features failed" in page
    assert page.count("<span class=failed>failed</span>") == 2
    # the error text sits in its own column, never in the label column
    label_cells = [row.split("<td>")[5] for row in page.split("<tr>") if row.count("<td>") >= 7]
    assert not any("Overloaded" in c for c in label_cells)


def test_failures_from_the_manifest():
    from baez_ray.jobs import failures

    ok = {"stages": {"collect": {"seconds": 1}, "label": {"features": 8, "llm_failed": 0, "backend_failed": 0},
                     "score": {"rows": 40, "prompts": 10, "failed_prompts": 0}}}
    assert failures(ok) == ([], False)
    parse_only = {"stages": {"label": {"features": 8, "llm_failed": 3, "backend_failed": 0}}}
    lines, retryable = failures(parse_only)
    assert lines == ["label: 3 of 8 features got no label (0 failed in the LLM backend, 3 answers could not be parsed)"] and not retryable
    nothing_scored = {"stages": {"label": {"features": 8, "llm_failed": 2, "backend_failed": 2}, "score": {"rows": 0, "prompts": 0}}}
    lines, retryable = failures(nothing_scored)
    assert retryable and lines[1] == "score: no label was scored"
    bench = {"stages": {"label:np_max_act": {"failed": 4}, "score": {"rows": 12, "prompts": 6, "failed_prompts": 1}}}
    assert failures(bench)[0] == ["label:np_max_act: 4 features got no label", "score: 1 of 6 scorer prompts failed"]
