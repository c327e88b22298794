"""Resume inside a stage: a real `label` job (collect → route → label with a local LLM) run
as `baez-ray run JOB --out DIR` in a subprocess, killed with SIGKILL (its whole process
group: the driver and the Ray cluster it started) once collect has committed its first
snapshot, run again and killed once label has committed its first shard, then run to
the end. The result must equal that of an uninterrupted run, table for table, with
exactly one label row per feature, and the reruns must not redo committed work."""

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

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import build_random_sae, make_text, our_pids_under
from helpers import tiny_chat_model

pytestmark = pytest.mark.slow  # whole jobs (execute / the CLI with Ray): not in make test-fast

BIN = Path(sys.executable).parent
class Runner:
    """`baez-ray run` in its own process group, with Ray's temp dir in a private folder so
    that every process it leaves behind can be found and killed (never `ray stop`)."""

    def __init__(self, tmp: Path, **env):
        self.ray_tmp = tempfile.mkdtemp(prefix="brs", dir="/tmp")  # short: Ray's unix sockets live in it
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                        RAY_TMPDIR=self.ray_tmp, **env)
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.n = 0

    def start(self, job: Path, out: Path) -> tuple[subprocess.Popen, Path]:
        self.n += 1
        log = self.logs / f"run-{self.n}.log"
        proc = subprocess.Popen([str(BIN / "baez-ray"), "run", str(job), "--out", str(out)], env=self.env,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def run(self, job: Path, out: Path, timeout: float = 240) -> None:
        proc, log = self.start(job, out)
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            self.kill(proc)
        # 3: finished, but rows failed (the tiny model's answers do not parse; docs/operations.md, exit codes)
        assert rc in (0, 3), log.read_text()[-6000:]

    def run_until(self, job: Path, out: Path, marker: str, timeout: float = 240) -> None:
        """Start a run and SIGKILL its process group as soon as `out/marker` (a glob) exists."""
        proc, log = self.start(job, out)
        deadline = time.monotonic() + timeout
        try:
            while not any(out.glob(marker)):
                assert proc.poll() is None, f"the run ended before {marker} appeared:\n{log.read_text()[-6000:]}"
                assert time.monotonic() < deadline, f"no {marker} after {timeout}s:\n{log.read_text()[-6000:]}"
                time.sleep(0.01)
        finally:
            self.kill(proc)

    def kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        for pid in our_pids_under(self.ray_tmp):  # anything of that Ray session outside the group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> list[int]:
        """Kill what is left of the runs' Ray sessions; returns the PIDs it found."""
        time.sleep(0.5)
        left = our_pids_under(self.ray_tmp)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return left


def write_job(tmp: Path) -> Path:
    model = tiny_chat_model(tmp / "model")
    sae = build_random_sae(tmp / "sae")
    (tmp / "corpus.txt").write_text(make_text(2600, 5))
    job = {
        "job": "label", "name": "resume",
        "model": {"id": "tiny", "path": str(model), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "s", "path": str(sae)},
        "corpus": {"paths": [str(tmp / "corpus.txt")], "context_len": 24},
        # batch_size 1: contexts parts of 8 contexts, many parts to commit one by one
        # three merge actors (4 features each): each resumes from its own snapshot
        "collect": {"top_k": 6, "window": 10, "window_left": 5, "features": 12, "reservoir": 8, "batch_size": 1, "checkpoint_s": 0,
                    "merge_actors": 3, "merge_num_cpus": 0.25},
        # every feature to tier 2 (τ = 1 for tier 1, τ_cross = -1)
        "route": {"tau_in": 1.0, "tau_out": 1.0, "tau_cross": -1.0, "num_cpus": 0.5},
        "label": {"explainer": {"backend": "transformers", "model": str(model), "batch_size": 4, "num_cpus": 0.5},
                  "tier2": "np_max_act", "max_retries": 0, "shard_features": 4},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def table(run_dir: Path, name: str, key: list[str]) -> list[dict]:
    return pq.read_table(run_dir / name).sort_by([(k, "ascending") for k in key]).to_pylist()


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@pytest.mark.timeout(900)  # 3 x its time when make test runs two tests at a time (205 s in a fresh clone)
def test_sigkill_mid_collect_and_mid_label_then_rerun_equals_uninterrupted(tmp_path):
    job = write_job(tmp_path)
    runner = Runner(tmp_path)
    try:
        whole, killed = tmp_path / "whole", tmp_path / "killed"
        runner.run(job, whole)

        # 1. killed while collecting, after its first committed snapshot
        runner.run_until(job, killed, "collect_state/COMMITTED.json")
        m = manifest(killed)
        assert m["status"] == "running" and "collect" not in m["stages"]
        snap = json.loads((killed / "collect_state" / "COMMITTED.json").read_text())
        assert 0 < len(snap["done"]) < len(snap["parts"]), "killed before the end of collect"
        assert len(snap["actors"]) == 3
        for a in snap["actors"]:  # each merge actor's own commit marker, for its own range
            own = json.loads((killed / "collect_state" / a["dir"] / "COMMITTED.json").read_text())
            assert own["lo"] == a["range"][0] and own["lo"] + own["n_features"] == a["range"][1]
            assert set(snap["done"]) <= set(own["done"])

        # 2. rerun: collect resumes from the snapshot; killed after the first label shard
        runner.run_until(job, killed, "label_shards/*.done")
        m = manifest(killed)
        assert m["attempts"] == 2 and m["stages"]["collect"]["resumed_parts"] >= len(snap["done"])
        assert m["stages"]["collect"]["merge_actors"] == 3
        assert 0 < m["stages"]["collect"]["contexts_run"] < m["stages"]["contexts"]["contexts"]
        assert m["stages"]["collect"]["tokens"] == manifest(whole)["stages"]["collect"]["tokens"]
        assert not (killed / "collect_state").exists()  # removed once the features table is committed
        assert "label" not in m["stages"]
        committed = sorted((killed / "label_shards").glob("*.done"))
        n_shards = manifest(whole)["stages"]["label"]["shards"]
        assert 1 <= len(committed) < n_shards, "killed before the end of label"
        first = {r["feature"] for m_ in committed for r in pq.read_table(m_.with_suffix(".parquet")).to_pylist()}

        # 3. rerun to the end: only the uncommitted shards are labelled
        runner.run(job, killed)
        m = manifest(killed)
        assert m["status"] == "done" and m["attempts"] == 3
        assert m["stages"]["label"]["resumed_features"] == len(first)
        assert m["stages"]["label"]["shards"] == n_shards - len(committed)
        third = [p for p in (killed / "label_shards").glob("a00003-*.parquet")]
        relabelled = {r["feature"] for p in third for r in pq.read_table(p).to_pylist()}
        assert relabelled and not relabelled & first

        # the same tables as the uninterrupted run, one label row per feature
        labels = table(killed, "labels", ["sae_id", "feature", "method"])
        assert len({(r["sae_id"], r["feature"], r["method"]) for r in labels}) == len(labels)
        assert len({r["feature"] for r in labels}) == len(labels) == m["stages"]["label"]["features"]
        assert labels == table(whole, "labels", ["sae_id", "feature", "method"])
        feats = table(killed, "features", ["feature"])
        assert [r["feature"] for r in feats] == list(range(12))  # exactly one row per feature
        assert feats == table(whole, "features", ["feature"])
        assert table(killed, "routes", ["feature"]) == table(whole, "routes", ["feature"])
        assert len(labels) >= 8 and all(r["tries"] == 1 and r["raw"] is not None for r in labels)
    finally:
        runner.close()
