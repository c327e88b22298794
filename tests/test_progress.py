"""What a run shows (through the CLI, in a subprocess): a progress line per stage with its
count and rate, counted by the workers; a line per stage an earlier run finished; no
third-party warnings or Ray logs unless `--verbose`, also when the run fails after Ray
started. Custom Ray resources (`model.resources`): a job asking for one the local cluster
advertises runs, one asking for a resource nobody has is refused before Ray starts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from conftest import build_random_sae, json_handler, make_text, serve_local
from helpers import EXIT_INVALID, cli

ROOT = Path(__file__).resolve().parents[1]
# e.g. "12:00:01 [collect] 1.54k/8.33k tok (18%), 690 tok/s, 00:09 elapsed, ETA 00:10"
PROGRESS = re.compile(r"^\d\d:\d\d:\d\d \[collect\] [\d.]+k?/[\d.]+k? tok \(\d+%\), [\d.]+k? tok/s, ", re.M)
NOISE = ("Warning", "INFO", "WARNING", "core_worker", "(MapWorker", "Loading weights", "Traceback", "Started a local Ray instance")


@pytest.fixture(scope="module")
def job(tiny_gemma, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("progress")
    (tmp / "corpus.txt").write_text(make_text(3000, 3))
    return {
        "job": "collect", "name": "progress",
        "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "s", "path": str(build_random_sae(tmp / "sae"))},
        "corpus": {"paths": [str(tmp / "corpus.txt")], "context_len": 24},
        "collect": {"top_k": 4, "window": 8, "window_left": 4, "features": 8, "reservoir": 4, "batch_size": 2},
    }


def write(tmp: Path, job: dict, **sections) -> Path:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump({**job, **sections}))
    return path


def noise(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_collect_shows_progress_in_tokens_then_skips_finished_stages(job, tmp_path):
    path, out = write(tmp_path, job), tmp_path / "run"
    res, _ = cli("run", str(path), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert PROGRESS.search(res.stderr), res.stderr
    assert noise(res.stderr) == [], res.stderr
    info = yaml.safe_load((out / "manifest.json").read_text())["stages"]["collect"]
    # rates from the workers' reports: the steady rate covers the tokens after the first batch
    assert info["startup_s"] > 0 and info["steady_tokens_per_s"] > 0
    assert info["steady_tokens_per_s"] * info["seconds"] >= 0.5 * info["tokens"]
    res, _ = cli("run", str(path), "--out", str(out))
    assert res.returncode == 0, res.stderr
    for stage in ("contexts", "collect"):
        assert re.search(rf"\[{stage}\] done in an earlier run \([\d.]+s, .*\), skipped", res.stderr), res.stderr
    assert not PROGRESS.search(res.stderr), res.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_verbose_shows_ray_output_and_an_advertised_custom_resource_runs(job, tmp_path):
    path = write(tmp_path, job, ray={"resources": {"tiny_node": 1}}, model={**job["model"], "resources": {"tiny_node": 1}})
    res, _ = cli("run", str(path), "--out", str(tmp_path / "run"), "--verbose")
    assert res.returncode == 0, res.stderr
    assert PROGRESS.search(res.stderr), res.stderr
    assert "Started a local Ray instance" in res.stderr and "warning" in res.stderr.lower(), res.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_error_after_ray_started_is_our_one_line_without_ray_logs(job, tmp_path):
    sae = build_random_sae(tmp_path / "sae")
    (sae / "sae_weights.safetensors").write_text("not safetensors")  # preflight reads cfg.json only
    path = write(tmp_path, job, sae={"id": "s", "path": str(sae)})
    res, _ = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert res.returncode == 1, res.stderr
    lines = res.stderr.splitlines()
    assert lines[-1].startswith(f"error: sae.path {sae}: cannot load SAE"), res.stderr
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines[:-1]), res.stderr  # only our own log lines above it


@pytest.mark.parametrize("resources, ray_resources, needle", [
    ({"nobody_has_this": 1}, {}, "'nobody_has_this': no node of the local Ray cluster has this resource"),
    ({"tiny_node": 2}, {"tiny_node": 1}, "'tiny_node': 2.0 per actor, but the local Ray cluster has 1.0"),
    ({"GPU": 1}, {}, "'GPU' is Ray's own resource"),
])
def test_a_resource_the_local_cluster_lacks_is_refused_before_ray_starts(job, tmp_path, resources, ray_resources, needle):
    path = write(tmp_path, job, ray={"resources": ray_resources}, model={**job["model"], "resources": resources})
    res, left = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert res.returncode == EXIT_INVALID and needle in res.stderr and "model.resources" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and left == [], (res.stderr, left)


def test_actor_map_reserves_the_custom_resources():
    """actor_map's actors hold the resources they ask for (Ray's own account of them)."""
    script = """
import ray
from baez_ray.ray_pool import actor_map

class Probe:
    def __call__(self, batch):
        got = ray.get_runtime_context().get_assigned_resources()
        return {"tiny_node": [got.get("tiny_node", 0.0)] * len(batch["x"])}

ray.init(num_cpus=2, resources={"tiny_node": 1}, include_dashboard=False)
rows = actor_map(ray.data.from_items([{"x": 1}, {"x": 2}]), Probe, num_cpus=0.5, resources={"tiny_node": 0.25},
                 batch_format="numpy").take_all()
print("assigned", sorted({r["tiny_node"] for r in rows}))
"""
    ray_tmp = tempfile.mkdtemp(prefix="bpr", dir="/tmp")  # short: Ray's socket paths live there
    try:
        res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "PATH": "/usr/bin:/bin", "RAY_TMPDIR": ray_tmp})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "assigned [0.25]" in res.stdout, res.stdout + res.stderr


def test_rates_come_from_the_workers_not_from_results_reaching_the_driver(ray_local):
    """A task ticks 5 × 100 units 0.3 s apart and returns only at the end (one burst at the
    driver): the steady rate is that of the ticks, ~400 units in 1.2 s."""
    from baez_ray import progress

    @ray_local.remote
    def work():
        for _ in range(5):
            progress.tick(100)
            time.sleep(0.3)

    with progress.bar("test", total=500, unit="unit") as b:
        ray_local.get(work.remote())
    rates = b.rates()
    assert b.tqdm.n == 500
    assert 400 / 1.2 * 0.6 < rates["steady_per_s"] < 400 / 1.2 * 1.3, rates


def test_llm_rounds_count_prompts_and_retry_rounds(ray_local, capsys):
    """Three prompts, one answered unreadably the first time: the bar ends at 4/4 prompts."""
    from baez_ray.config import LLMConfig
    from baez_ray.llm.rounds import ask_until_parsed, rows_table

    def respond(body: dict) -> dict:
        content = body["messages"][0]["content"]
        text = "garbled" if content == "p1" and len(body["messages"]) == 1 else "fine"
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    rows = [{"request_id": f"r{i}", "messages": [{"role": "user", "content": f"p{i}"}], "max_tokens": 5, "temperature": 0.0,
             "stop": None, "constraint": None} for i in range(3)]
    with serve_local(json_handler(respond)) as url:
        llm = LLMConfig(backend="openai", model="m", base_url=url + "/v1", max_retries=0, timeout_s=10)
        done = ask_until_parsed(ray_local.data.from_arrow(rows_table(rows)), llm,
                                parse=lambda row, attempt: (row["answer"], None) if row["answer"] == "fine" else (None, "garbled"),
                                retry_messages=lambda row, problem, attempt: row["messages"] + [{"role": "user", "content": "again"}],
                                max_retries=1, value_type=pa.string(), what="label:test").take_all()
    assert sorted(r["value"] for r in done) == ["fine"] * 3
    assert sorted((r["request_id"], r["tries"], r["input_tokens"]) for r in done) == [("r0", 1, 1), ("r1", 2, 2), ("r2", 1, 1)]
    err = capsys.readouterr().err
    assert re.search(r"\[label:test\] 4/4 prompt \(100%\)", err), err



def test_the_bars_of_a_run_share_one_counter_actor(ray_local):
    """A run's bars (one per stage) are moved by one Counter actor, made by the first bar
    and kept for the Ray session: a bar does not wait for a new actor process to start (a
    Counter whose last handle went with its bar died, and the next bar made another), and
    the workers' ticks reach each later bar."""
    import gc

    from baez_ray import progress

    class Ticker:  # a stage's actor: it ticks, then is killed with its pool at the end of the stage
        def tick(self, n: int) -> None:
            from baez_ray import progress

            progress.tick(n)

    def count(b, n: int) -> int:
        deadline = time.monotonic() + 60
        while b.tqdm.n < n and time.monotonic() < deadline:
            b._pull()
            time.sleep(0.1)
        return b.tqdm.n

    ids = []
    for stage in range(3):
        with progress.bar(f"stage{stage}", total=6, unit="x") as b:
            actors = [ray_local.remote(Ticker).options(num_cpus=0.01).remote() for _ in range(3)]
            ray_local.get([a.tick.remote(2) for a in actors])
            assert count(b, 6) == 6
            ids.append(b.counter._actor_id.hex())
            for a in actors:
                ray_local.kill(a)
        del b
        gc.collect()
    assert len(set(ids)) == 1, ids


STALE_SESSION = """
import ray
from baez_ray import progress
ray.init(num_cpus=2, include_dashboard=False)
with progress.bar("a", 3, "x"):
    progress.tick(1)
ray.shutdown()
ray.init(num_cpus=2, include_dashboard=False)
progress.tick(2)  # this process's handle on the first session's Counter is stale
with progress.bar("b", 3, "x") as b:
    progress.tick(3)
    b._pull()
print("counted", b.tqdm.n)
ray.shutdown()
"""


@pytest.mark.timeout(300)
def test_a_tick_after_a_new_ray_session_counts_and_never_raises(tmp_path):
    """A process that outlives a Ray session (a notebook, the tests) and ticks in the next one
    (a backend called in the driver) neither fails on the old session's Counter nor loses
    the count of the new one's bar."""
    res = subprocess.run([sys.executable, "-c", STALE_SESSION], capture_output=True, text=True, timeout=240, cwd=tmp_path,
                         env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.strip().splitlines()[-1] == "counted 3", res.stdout
