"""A cluster loses nodes (SPEC §6, docs/cluster-faults.md): on a multi-node Ray cluster on
this machine (`ray.cluster_utils.Cluster`), a worker node is removed in the middle of each
stage of one label job (collect, route, label, score) and the run finishes, in the same
process, with the tables of an uninterrupted run; a run whose actor needs a resource only
the lost node had stops with one line and exit code 75, and resumes once such a node has
joined. Plus the merge actor's own restore (snapshot + log, a call cut short), without Ray.

Where work is held for the removal: a gate (files in a folder). Collect and route workers
(subclasses shipped by value, as in test_faults.py) wait at it in the middle of a part or
at a batch; the fake OpenAI server holds an explainer or a scorer request. The main thread
then adds a node, removes the one the work is on (SIGKILL of its processes, as a
preempted spot node), and opens the gate. The head node has no CPU: every actor runs on
the one worker node of the moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from baez_ray.stages.collect import CollectWorker
from baez_ray.stages.route import RouteWorker
from conftest import make_text, our_pids_under, serve_local



# ---- the gate ----------------------------------------------------------------------------


def wait_at(folder: str, name: str) -> None:
    """Wait here (once armed, until opened): `at-<name>-<pid>` tells the test who waits."""
    d = Path(folder)
    if not (d / f"arm-{name}").exists() or (d / f"open-{name}").exists():
        return
    (d / f"at-{name}-{os.getpid()}").touch()
    while not (d / f"open-{name}").exists():
        time.sleep(0.05)


class GatedCollectWorker(CollectWorker):
    """Waits at the gate after pushing the first batch of rows of any part >= GATE_PART."""

    gate = ""
    GATE_PART = 3

    def _part(self, tokens, cids, part):
        for i, table in enumerate(super()._part(tokens, cids, part)):
            yield table
            if i == 0 and part >= self.GATE_PART:
                wait_at(self.gate, "collect")


class GatedRouteWorker(RouteWorker):
    """Waits at the gate at its second batch."""

    gate = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            wait_at(self.gate, "route")
        return super().__call__(batch)


@pytest.fixture(scope="module", autouse=True)
def gated(tmp_path_factory):
    """The gated classes in place of the stages' own, shipped by value (Ray's workers
    cannot import this module); the gate folder is armed per test."""
    import ray.cloudpickle

    from baez_ray.stages import collect, route

    folder = tmp_path_factory.mktemp("gate")
    GatedCollectWorker.gate = GatedRouteWorker.gate = str(folder)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(collect, "CollectWorker", GatedCollectWorker)
        mp.setattr(route, "RouteWorker", GatedRouteWorker)
        yield folder
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ---- a fake OpenAI-compatible server that can hold a request --------------------------------


class FakeLLM:
    """Answers from the request alone (the same request, the same answer): explainer
    prompts a label, scorer prompts (a `binary_list` response format) a list of 0/1. A
    gate (`hold[kind] = when`) holds the first request of that kind for which `when(n)`
    (n: the requests of that kind so far) until `release` is set; that request is never
    answered. `answered` counts the answers delivered per request."""

    def __init__(self):
        self.hold: dict = {}
        self.seen: Counter = Counter()
        self.answered: Counter = Counter()
        self.arrived = {"label": threading.Event(), "score": threading.Event()}
        self.release = {"label": threading.Event(), "score": threading.Event()}
        self.lock = threading.Lock()

    def respond(self, body: dict) -> dict | None:
        kind = "score" if "response_format" in body else "label"
        digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.lock:
            self.seen[kind] += 1
            when = self.hold.get(kind)
            held = when is not None and when(self.seen[kind])
            if held:
                del self.hold[kind]
        if held:
            self.arrived[kind].set()
            self.release[kind].wait(300)
            return None
        h = hashlib.sha1(json.dumps(body["messages"]).encode()).hexdigest()
        if kind == "score":
            n = body["response_format"]["json_schema"]["schema"]["minItems"]
            text = json.dumps([int(c, 16) % 2 for c in h[:n]])
        else:
            text = f"They share a word.\n[EXPLANATION]: words {h[:6]}"
        with self.lock:
            self.answered[digest] += 1
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4, "completion_tokens": 7, "total_tokens": 0}}

    def handler(self):
        fake = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                answer = fake.respond(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                if answer is None:  # held: its client is gone
                    self.close_connection = True
                    return
                payload = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return H


def nth_when(k: int, cond):
    """A hold rule (`FakeLLM.hold`): the k-th request of its kind among those that come
    while `cond()`."""
    seen = [0]

    def when(_n: int) -> bool:
        if cond():
            seen[0] += 1
        return seen[0] == k

    return when


# ---- the cluster -------------------------------------------------------------------------

WORKER = {"num_cpus": 3, "resources": {"merge_slot": 2}}


@pytest.fixture(scope="module")
def cluster():
    """A head node without CPUs (the driver's node) in a private Ray temp dir; the tests
    add and remove worker nodes. This process's Ray session is shut down for the module
    and started again after it (the `ray_local` of the other tests)."""
    import ray

    from baez_ray.config import RayConfig
    from baez_ray.ray_pool import init_ray
    from ray.cluster_utils import Cluster

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    tmp = tempfile.mkdtemp(prefix="bcf", dir="/tmp")  # short: Ray's unix sockets live in it
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    # a lost node noticed within ~2 s (Ray's default: 5 health checks 3 s apart, what a real cluster keeps)
    health = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 2}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": health})
    try:
        init_ray(RayConfig(address=c.address))
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for pid in our_pids_under(tmp):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
        if was:
            ray.init(address="local", num_cpus=4, include_dashboard=False)


def connect(cluster) -> None:
    from baez_ray.config import RayConfig
    from baez_ray.ray_pool import init_ray

    init_ray(RayConfig(address=cluster.address))


def swap(cluster, old, **node_args):
    """A new worker node, then the old one removed as a lost node is (SIGKILL)."""
    new = cluster.add_node(**(node_args or WORKER))
    cluster.remove_node(old, allow_graceful=False)
    return new


def wait_for(cond, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---- the job -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm():
    fake = FakeLLM()
    with serve_local(fake.handler()) as fake.url:
        yield fake


@pytest.fixture(scope="module")
def job(cluster, llm, tiny_gemma, random_sae, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("cluster_job")
    (tmp / "c.txt").write_text(make_text(2000, 3))
    explainer = {"backend": "openai", "model": "fake", "base_url": llm.url + "/v1", "max_retries": 0, "timeout_s": 60,
                 "batch_size": 4, "max_concurrency": 1}
    return {
        "job": "label", "name": "faults", "seed": 5,
        "ray": {"address": cluster.address, "unplaceable_timeout_s": 3},
        "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
        "sae": {"id": "s", "path": str(random_sae)},
        "corpus": {"paths": [str(tmp / "c.txt")], "context_len": 24},
        # no snapshot round during the stage: a restarted merge actor replays its whole log
        "collect": {"top_k": 5, "window": 8, "window_left": 4, "reservoir": 6, "batch_size": 2, "features": 24, "num_actors": 2,
                    "merge_actors": 2, "merge_resources": {"merge_slot": 1}, "checkpoint_s": 3600, "checkpoint_contexts": None},
        "route": {"tau_in": 1.0, "tau_out": 1.0, "tau_cross": -1.0, "num_cpus": 0.5, "batch_size": 8},
        "label": {"tier2": "eleuther_acts_top5", "max_retries": 0, "explainer": explainer,
                  "score": {"sample": 6, "benchmarks": ["detection"], "test_examples": 4, "n_negatives": 4, "examples_per_prompt": 4,
                            "min_test_examples": 2}},
    }


TABLES = {"features": ["sae_id", "feature"], "routes": ["sae_id", "feature"], "labels": ["sae_id", "feature", "method"],
          "scores": ["sae_id", "feature", "method", "benchmark"]}


def tables(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for name, key in TABLES.items():
        rows = pq.read_table(run_dir / name).to_pylist()
        keys = [tuple(r[k] for k in key) for r in rows]
        assert len(keys) == len(set(keys)), f"{name}: duplicate rows"
        out[name] = sorted(rows, key=lambda r: tuple(r[k] for k in key))
    return out


@pytest.fixture(scope="module")
def baseline(cluster, job, llm, tmp_path_factory):
    """The job, uninterrupted, on one worker node (and the answers the server delivered
    for it: `llm.uninterrupted`)."""
    from baez_ray.config import validate
    from baez_ray.jobs import execute

    node = cluster.add_node(**WORKER)
    out = tmp_path_factory.mktemp("baseline") / "run"
    llm.answered = Counter()
    execute(validate(job), out)
    llm.uninterrupted = Counter(llm.answered)
    cluster.remove_node(node)
    return tables(out)


# ---- a node lost in each stage -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_node_lost_in_each_stage_costs_only_its_work_in_flight(cluster, job, baseline, llm, gated, tmp_path, capfd):
    from baez_ray.config import validate
    from baez_ray.jobs import execute

    node = cluster.add_node(**WORKER)
    for name in ("collect", "route"):
        (gated / f"arm-{name}").touch()
    out, result = tmp_path / "run", {}
    # the label stage asks for labels and scores them as they come (label+score); the score
    # stage's own requests come once the manifest has the label stage: hold its second
    label_done = lambda: "label" in json.loads((out / "manifest.json").read_text()).get("stages", {})  # noqa: E731
    llm.hold, llm.seen, llm.answered = {"label": lambda n: n == 2, "score": nth_when(2, label_done)}, Counter(), Counter()

    def run():
        try:
            result["run"] = execute(validate(job), out)
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            import traceback

            result["error"] = "".join(traceback.format_exception(e))

    thread = threading.Thread(target=run)
    thread.start()
    # collect: both workers hold a part (its first rows merged, the rest not), parts before merged
    wait_for(lambda: len(list(gated.glob("at-collect-*"))) == 2 or not thread.is_alive(), "collect workers at the gate")
    node = swap(cluster, node)
    (gated / "open-collect").touch()
    # route: the embedder actor holds its second batch
    wait_for(lambda: any(gated.glob("at-route-*")) or not thread.is_alive(), "the route worker at the gate")
    node = swap(cluster, node)
    (gated / "open-route").touch()
    # label, then score: the API caller's actor waits on a request the server holds
    for kind in ("label", "score"):
        wait_for(lambda: llm.arrived[kind].is_set() or not thread.is_alive(), f"a {kind} request held")
        node = swap(cluster, node)
        llm.release[kind].set()
    thread.join(timeout=600)
    cluster.remove_node(node)
    assert "error" not in result, result
    run = result["run"]
    assert tables(out) == baseline  # features, routes, labels, scores: those of the uninterrupted run
    # no answer received was asked for again: each request answered as often as in the
    # uninterrupted run (two features with the same examples ask the same request twice)
    assert llm.answered == llm.uninterrupted, llm.answered - llm.uninterrupted

    stages = run.manifest["stages"]
    for name in ("collect", "route", "label", "score"):
        f = stages[name]["faults"]
        assert len(f["lost_nodes"]) == 1 and f["restarted_actors"] >= 1 and f["retried_parts"] >= 1, (name, stages[name])
    assert stages["collect"]["faults"]["restarted_actors"] >= 4  # two workers, two merge actors
    assert stages["collect"]["replayed_merges"] >= 2  # each merge actor replayed the parts merged before
    err = capfd.readouterr().err
    sys.stderr.write(err)  # (shown with -rP)
    assert re.search(r"\[collect\] lost node \w{8} at [\d,]+/[\d,]+ tok: part \d+ redone on \w{8}", err), err
    assert re.search(r"\[collect\] lost node \w{8} at .*: merge actor \d restored on \w{8} \(no snapshot yet; \d+ parts replayed from its log\)", err), err
    assert re.search(r"\[route\] lost node \w{8} at [\d,]+/[\d,]+ feature: features s:\d+\.\.\d+ redone on", err), err
    assert "retries remaining" not in err and "Traceback" not in err, err


# ---- the only node with a resource lost -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_actor_that_cannot_be_placed_stops_the_run_then_it_resumes(cluster, job, baseline, gated, tmp_path, capfd):
    """Collect's workers need `only_b`, which one node has; it is lost mid-stage: the run
    stops within ray.unplaceable_timeout_s with one line and exit code 75; a node with
    `only_b` joins, the same command finishes with the features of an uninterrupted run."""
    from baez_ray.cli import EXIT_UNPLACEABLE, main

    spec = {**job, "job": "collect", "model": {**job["model"], "resources": {"only_b": 1}}}
    spec["collect"] = {**job["collect"], "merge_resources": {}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    keep = cluster.add_node(num_cpus=2)  # where the merge actors may go, and stay
    b = cluster.add_node(num_cpus=2, resources={"only_b": 2})
    (gated / "arm-collect").touch()
    for f in gated.glob("open-collect"):
        f.unlink()

    def lose_b():
        wait_for(lambda: len(list(gated.glob("at-collect-*"))) >= 2, "collect workers at the gate")
        cluster.remove_node(b, allow_graceful=False)
        (gated / "open-collect").touch()

    for f in gated.glob("at-collect-*"):
        f.unlink()
    remover = threading.Thread(target=lose_b)
    remover.start()
    code = main(["run", str(path), "--out", str(tmp_path / "run")])  # stops within ray.unplaceable_timeout_s (3 s) of the loss
    remover.join()
    err = capfd.readouterr().err
    sys.stderr.write(err)  # (shown with -rP)
    assert code == EXIT_UNPLACEABLE, err
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"stopped: lost node {b.node_id[:8]} \(.*\): .*CollectWorker.* waits for only_b: 1, which no node left has "
                        rf"\(waited \d+ s\); rerun the same command once such a node has joined: .* resumes", last), err
    assert "retries remaining" not in err and "Traceback" not in err, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "stopped" and "Unplaceable" in manifest["stages"]["collect"]["error"]

    cluster.add_node(num_cpus=2, resources={"only_b": 2})
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 0, capfd.readouterr().err
    assert tables_features(tmp_path / "run") == baseline["features"]
    cluster.remove_node(keep)
    connect(cluster)


def tables_features(run_dir: Path) -> list[dict]:
    rows = pq.read_table(run_dir / "features").to_pylist()
    return sorted(rows, key=lambda r: (r["sae_id"], r["feature"]))


# ---- the operations page ---------------------------------------------------------------------


def test_the_operations_page_shows_the_line_and_the_exit_code_of_a_run_stopped_by_a_lost_node():
    """The line the docs show is the one `faults.stuck_line` writes (for the page's
    example), and exit code 75 is in the page's table."""
    from baez_ray import faults
    from baez_ray.cli import EXIT_UNPLACEABLE

    lost = faults.Node("3f2a9c1e" + "0" * 48, False, "10.0.3.7", {"CPU": 8.0, "only_b": 1.0})
    left = faults.Node("9bd10c44" + "0" * 48, True, "10.0.3.8", {"CPU": 8.0})
    actor = faults.Actor("a1", "MapWorker(MapBatches(CollectWorker))", "RESTARTING", 1, lost.id, {"CPU": 1.0, "only_b": 1.0})
    line = "stopped: " + faults.stuck_line(actor, lost, {n.id: n for n in (lost, left)}, 600, "runs/gemma-l41")
    page = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    assert line in page and f"| {EXIT_UNPLACEABLE} | stopped: a node was lost" in page


# ---- the merge actor's restore, without Ray --------------------------------------------------


def test_a_merge_state_restores_from_its_snapshot_and_log(tiny_gemma, random_sae, tmp_path):
    """Six parts' calls: three merged before a snapshot, two after, the sixth cut short
    while it was logged. A new actor's state (the snapshot, the log replayed, then the
    calls Ray retries: the sixth, and the fifth, answered but retried) is that of an actor
    that merged each call once."""
    from baez_ray.config import CollectConfig
    from baez_ray.stages.merge import Merger, Snapshots

    cfg = CollectConfig(top_k=5, window=8, window_left=4, reservoir=6, batch_size=2)
    worker = CollectWorker({"id": "tiny", "path": str(tiny_gemma), "num_cpus": 1}, [{"id": "s", "path": str(random_sae), "layer": 0}],
                           cfg.model_dump(), 0, [96], 2, 1)
    from transformers import AutoTokenizer

    rng, vocab = np.random.default_rng(0), len(AutoTokenizer.from_pretrained(tiny_gemma))
    calls = [worker({"context_id": np.arange(4 * p, 4 * p + 4), "tokens": np.array(list(rng.integers(4, vocab, size=(4, 24))), dtype=object),
                     "part": np.full(4, p)}) for p in range(6)]
    sizes, names = {p: 4 for p in range(6)}, [f"part-{p}" for p in range(6)]

    def actor():
        return Merger(96, cfg, part_sizes=sizes), Snapshots(tmp_path / "merge-000", names, 0, 96)

    whole = Merger(96, cfg, part_sizes=sizes)
    for c in calls:
        whole.add(c)
    merger, snaps = actor()
    snaps.load(merger)
    for i, c in enumerate(calls[:5]):
        snaps.log(c)
        merger.add(c)
        if i == 2:
            snaps.save(merger)
    (log,) = tmp_path.glob("merge-000/log-000001-*.arrows")
    size = log.stat().st_size
    snaps.log(calls[5])  # the actor's node is lost while it writes: the call is never answered
    with open(log, "r+b") as f:
        f.truncate(size + (log.stat().st_size - size) // 2)

    merger2, snaps2 = actor()
    assert snaps2.load(merger2) == {0, 1, 2, 3, 4} and snaps2.replayed == 2
    for c in (calls[4], calls[5]):  # what Ray retries: a call answered as the node went, and the one cut short
        snaps2.log(c)
        merger2.add(c)
    text = lambda ids: [str(i) for i in ids]  # noqa: E731
    assert merger2.features_table([("s", 0, 96)], "m", text).equals(whole.features_table([("s", 0, 96)], "m", text))
    assert merger2.n_tokens == whole.n_tokens == 6 * 4 * 24
