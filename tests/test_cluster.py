"""Cluster operation: cluster.yaml passes Ray's own launcher validation, and
`baez-ray submit / status / logs / stop` drive a real Ray head (started here with
`ray start --head` in a private temp dir and ports, torn down by process group) through
the Ray Jobs API with a real baez_ray job."""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import our_pids_under

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BAEZ = [sys.executable, "-m", "baez_ray.cli"]


# ---- cluster.yaml ------------------------------------------------------------------------


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)

    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head node does no GPU work"
    big = [t for t in types.values() if t["resources"].get("gpu_80gb")]
    assert big and all(t["resources"]["GPU"] >= 1 for t in big)
    assert any("accelerator_type:H100" in t["resources"] for t in big)
    assert any("accelerator_type:L40S" in t["resources"] for t in types.values())
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]
    # setup installs torch first, then the project with its GPU extra
    cmds = config["setup_commands"]
    i_torch = next(i for i, c in enumerate(cmds) if "torch" in c)
    i_proj = next(i for i, c in enumerate(cmds) if "[gpu]" in c)
    assert i_torch < i_proj
    # the project is mounted where setup installs it from
    assert any(remote.startswith("/home/ubuntu/baez_ray") for remote in config["file_mounts"])


def test_k8s_rayjob_is_a_valid_kuberay_cluster():
    """k8s/rayjob.yaml: the RayJob fields KubeRay needs, and a rayClusterSpec that Ray's
    KubeRay autoscaler turns into a valid autoscaling config."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    job = yaml.safe_load((ROOT / "k8s" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "baez_ray.cli run jobs/" in spec["entrypoint"]
    job_file = spec["entrypoint"].split("baez_ray.cli run ")[1].split()[0]
    assert (ROOT / job_file).is_file()
    cluster = spec["rayClusterSpec"]
    config = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "baez", "namespace": "default"}, "spec": cluster})
    types = config["available_node_types"]
    assert not types["headgroup"]["resources"].get("GPU")
    assert types["gpu-80gb"]["resources"]["GPU"] == 8 and types["gpu-80gb"]["resources"]["gpu_80gb"] == 8
    assert types["gpu-l40s"]["resources"]["GPU"] >= 1


# ---- submission plan (no cluster) --------------------------------------------------------


def test_plan_ships_project_root_and_runs_the_job_file(monkeypatch):
    from baez_ray.tools.submit import plan_submission

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("BAEZ_TEST_TOKEN", "x")
    sub = plan_submission("jobs/collect_gemma270m.yaml", ["seed=3", "collect.top_k=5"], env=["BAEZ_TEST_TOKEN", "A=b"])
    assert sub.working_dir == ROOT
    assert sub.entrypoint == "python -m baez_ray.cli run jobs/collect_gemma270m.yaml --set seed=3 --set collect.top_k=5"
    env = sub.runtime_env
    assert env["working_dir"] == str(ROOT)
    for pat in (".venv/", "runs/", ".git/", "__pycache__/", "/runs/"):
        assert pat in env["excludes"]
    assert env["env_vars"] == {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "BAEZ_TEST_TOKEN": "x", "A": "b"}
    # the driver orchestrates; model actors (model.num_gpus) request their own GPUs
    assert (sub.entrypoint_num_cpus, sub.entrypoint_num_gpus) == (1.0, 0.0)
    assert any("relative" in w for w in sub.warnings)  # out: runs

    # what Ray would upload: the package and job files, no virtualenv, runs or git data
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[str] = []
    _dir_travel(
        ROOT, [_get_excludes(ROOT, env["excludes"])],
        lambda p: files.append(p.relative_to(ROOT).as_posix()) if p.is_file() else None, include_gitignore=True,
    )
    assert "baez_ray/cli.py" in files and "jobs/collect_gemma270m.yaml" in files and "pyproject.toml" in files
    assert not [f for f in files if f.split("/")[0] in (".venv", ".git", "runs") or "__pycache__" in f]


def test_submit_rejects_bad_job_before_contacting_a_cluster(tmp_path, monkeypatch):
    from baez_ray.cli import main

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: ingest\ningest:\n  path: x\n  topk: 3\n")
    # port 9 (discard) would fail to connect: rc 2 proves nothing was contacted
    assert main(["submit", str(bad), "--address", "http://127.0.0.1:9"]) == 2
    outside = tmp_path / "sub" / "job.yaml"
    outside.parent.mkdir()
    outside.write_text("job: ingest\ningest:\n  path: x\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x").mkdir()  # the export preflight looks for (relative to --working-dir)
    assert main(["submit", str(outside), "--address", "http://127.0.0.1:9", "--working-dir", str(tmp_path / "elsewhere")]) == 1
    # an unreachable cluster is an error naming the address
    assert main(["status", "raysubmit_x", "--address", "http://127.0.0.1:9"]) == 1


def test_submit_cli_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: ingest\ningest:\n  path: x\n  topk: 3\n")
    r = subprocess.run([*BAEZ, "submit", str(bad), "--address", "http://127.0.0.1:9"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "ingest.topk" in r.stderr and "unknown key" in r.stderr


# ---- a real head -------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """`ray start --head` on loopback with its own temp dir and ports; yields the Jobs API URL.

    Teardown kills the process group it started (never `ray stop`, which would stop every
    cluster on the machine), then any leftover process of ours under its temp dir."""
    tmp = tempfile.mkdtemp(prefix="brc", dir="/tmp")  # short: Ray's unix sockets live in it
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, nm, om = _free_ports(9)
    cmd = [
        str(BIN / "ray"), "start", "--head",
        "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
        "--num-cpus=2", "--num-gpus=0", f"--temp-dir={tmp}", "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    pgid = proc.pid
    url = f"http://127.0.0.1:{dash}"

    def teardown():
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            for pid in our_pids_under(tmp):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1.0 if sig == signal.SIGTERM else 0.2)
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"ray start failed ({proc.returncode}):\n{out[-4000:]}")
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 60
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            proc.kill()
        teardown()


def _write_export(root: Path) -> None:
    acts = root / "export" / "activations"
    acts.mkdir(parents=True)
    rows = [
        {"modelId": "m", "layer": "3-res", "index": "0", "tokens": ["a", "b"], "values": [0.0, 1.0], "maxValue": 1.0, "maxValueTokenIndex": 1},
        {"modelId": "m", "layer": "3-res", "index": "0", "tokens": ["c", "d"], "values": [0.5, 0.0], "maxValue": 0.5, "maxValueTokenIndex": 0},
    ]
    with gzip.open(acts / "batch-0.jsonl.gz", "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _baez(*args, timeout=180, **env) -> subprocess.CompletedProcess:
    return subprocess.run([*BAEZ, *args], capture_output=True, text=True, env=_env(**env), timeout=timeout, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_submit_status_logs_real_ingest_job(ray_head, tmp_path):
    wd = tmp_path / "project"  # the directory shipped to the cluster: job file + data
    wd.mkdir()
    _write_export(wd)
    (wd / "ingest.yaml").write_text(
        "job: ingest\nname: cluster-ingest\nout: runs\n"
        "ingest:\n  path: export\n  top_k: 5\n"
    )
    out = tmp_path / "runs"  # same machine: the driver writes where the test can look
    r = _baez("submit", str(wd / "ingest.yaml"), "--address", ray_head, "--working-dir", str(wd), "--set", f"out={out}")
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    sid = r.stdout.splitlines()[0].strip()
    assert sid.startswith("raysubmit_")
    assert "run finished" in r.stdout  # followed logs of the driver
    assert f"{sid}: SUCCEEDED" in r.stderr

    # the default address comes from RAY_ADDRESS
    s = _baez("status", sid, timeout=60, RAY_ADDRESS=ray_head)
    assert s.returncode == 0, s.stderr
    assert "status: SUCCEEDED" in s.stdout
    assert "python -m baez_ray.cli run ingest.yaml --set out=" in s.stdout

    lg = _baez("logs", sid, "--address", ray_head, timeout=60)
    assert lg.returncode == 0, lg.stderr
    assert "[ingest]" in lg.stdout or "ingest" in lg.stdout
    assert "run finished" in lg.stdout

    manifest = json.loads((out / "cluster-ingest" / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["spec"]["out"] == str(out)

    # --no-wait returns with the id at once; `logs --follow` streams until the job ends
    # (the same job and run directory again: the run resumes, nothing is redone)
    r2 = _baez("submit", str(wd / "ingest.yaml"), "--address", ray_head, "--working-dir", str(wd), "--set", f"out={out}", "--no-wait")
    assert r2.returncode == 0, r2.stderr
    sid2 = r2.stdout.strip()
    assert sid2.startswith("raysubmit_") and sid2 != sid
    fl = _baez("logs", sid2, "--follow", "--address", ray_head)
    assert fl.returncode == 0, fl.stderr
    assert "run finished" in fl.stdout
    assert "status: SUCCEEDED" in _baez("status", sid2, "--address", ray_head, timeout=60).stdout
    assert json.loads((out / "cluster-ingest" / "manifest.json").read_text())["attempts"] == 2

    # unknown id: an error, not an empty answer
    bad = _baez("status", "raysubmit_doesnotexist", "--address", ray_head, timeout=60)
    assert bad.returncode == 1 and "raysubmit_doesnotexist" in bad.stderr


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_stop_running_job(ray_head):
    from ray.job_submission import JobStatus, JobSubmissionClient

    c = JobSubmissionClient(ray_head)
    sid = c.submit_job(entrypoint="sleep 300")
    deadline = time.time() + 90
    while c.get_job_status(sid) != JobStatus.RUNNING:
        assert time.time() < deadline, c.get_job_info(sid)
        time.sleep(0.5)
    r = _baez("stop", sid, "--address", ray_head, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "stop requested" in r.stdout
    deadline = time.time() + 60
    while not c.get_job_status(sid).is_terminal():
        assert time.time() < deadline
        time.sleep(0.5)
    assert c.get_job_status(sid) == JobStatus.STOPPED
    again = _baez("stop", sid, "--address", ray_head, timeout=60)
    assert again.returncode == 0 and "already STOPPED" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_submitted_driver_joins_the_cluster_it_runs_on(ray_head):
    """init_ray with no ray.address, inside a Ray job, joins the job's cluster (RAY_ADDRESS set
    by Ray Jobs) instead of starting a local one with ray.num_cpus=4."""
    from ray.job_submission import JobSubmissionClient

    code = (
        "import ray; from baez_ray.config import validate; from baez_ray.ray_pool import init_ray; "
        "init_ray(validate({'job': 'ingest', 'ingest': {'path': 'x'}}).ray); "
        "print('CPUS', ray.cluster_resources().get('CPU'), 'GCS', ray.get_runtime_context().gcs_address)"
    )
    c = JobSubmissionClient(ray_head)
    sid = c.submit_job(entrypoint=f'python -c "{code}"', runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    deadline = time.time() + 120
    while not c.get_job_status(sid).is_terminal():
        assert time.time() < deadline
        time.sleep(0.5)
    logs = c.get_job_logs(sid)
    assert str(c.get_job_status(sid)) == "SUCCEEDED", logs
    assert "CPUS 2.0" in logs  # the head's --num-cpus=2, not a fresh local cluster's 4
