"""Kept actor pools (`ray_pool.kept_pools`): a model that several Datasets of a job call is
loaded once; pools give way when a stage needs their resources; nothing outlives the job."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from baez_ray.ray_pool import actor_map, gather, kept_pools


@pytest.fixture(autouse=True)
def by_value():
    """The actor class below lives in this test module: ship it by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


class Model:
    """Writes a file per construction (`<state>/<tag>-<pid>-<id>`); answers each row with
    the PID of the process that holds it."""

    def __init__(self, state: str, tag: str):
        Path(state, f"{tag}-{os.getpid()}-{uuid.uuid4().hex[:6]}").touch()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.append_column("pid", pa.array([os.getpid()] * batch.num_rows, pa.int64()))


def loads(state: Path, tag: str) -> list[int]:
    return [int(p.name.split("-")[1]) for p in state.glob(f"{tag}-*")]


def run(ray, state: Path, tag: str, n: int = 24, **kw) -> pa.Table:
    ds = ray.data.from_arrow(pa.table({"x": list(range(n))}))
    out = gather(actor_map(ds, Model, {"state": str(state), "tag": tag}, batch_size=4, **kw))
    assert sorted(out.column("x").to_pylist()) == list(range(n))  # every row, once
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.timeout(300)
def test_a_kept_pool_loads_once_per_job_and_is_gone_after(ray_local, tmp_path):
    with kept_pools():
        pids = {p for _ in range(3) for p in run(ray_local, tmp_path, "llm", num_cpus=0.5, keep=True).column("pid").to_pylist()}
        assert len(loads(tmp_path, "llm")) == 1  # three Datasets (rounds, shards), one load
        assert pids == set(loads(tmp_path, "llm"))
        two = {p for p in run(ray_local, tmp_path, "two", num_cpus=0.5, size=2, keep=True).column("pid").to_pylist()}
        assert len(loads(tmp_path, "two")) == 2 and two == set(loads(tmp_path, "two"))  # batches in turn over both
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids | two) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(p) for p in pids | two)  # killed when the job ended

    for _ in range(2):  # outside a job's scope: a pool per Dataset, as Ray Data does
        run(ray_local, tmp_path, "plain", num_cpus=0.5, keep=True)
    assert len(loads(tmp_path, "plain")) == 2


@pytest.mark.timeout(300)
def test_kept_pools_give_way_to_what_a_stage_needs(ray_local, tmp_path):
    # the local cluster has 4 CPUs; kept pools always leave 1 free
    with kept_pools():
        run(ray_local, tmp_path, "a", num_cpus=1.5, keep=True)
        run(ray_local, tmp_path, "b", num_cpus=1.5, keep=True)  # 3 held, 1 free: both kept
        run(ray_local, tmp_path, "a", num_cpus=1.5, keep=True)
        assert len(loads(tmp_path, "a")) == 1 and len(loads(tmp_path, "b")) == 1
        run(ray_local, tmp_path, "c", num_cpus=1.5, keep=True)  # evicts b, the least recently used
        run(ray_local, tmp_path, "a", num_cpus=1.5, keep=True)
        assert len(loads(tmp_path, "a")) == 1
        run(ray_local, tmp_path, "b", num_cpus=1.5, keep=True)
        assert len(loads(tmp_path, "b")) == 2
        # a plain pool of 3 CPUs: the kept ones give way instead of leaving it waiting forever
        run(ray_local, tmp_path, "big", num_cpus=3.0)
        # a pool that would leave no CPU free runs as a plain Ray Data pool
        for _ in range(2):
            run(ray_local, tmp_path, "huge", num_cpus=3.5, keep=True)
        assert len(loads(tmp_path, "huge")) == 2


class SlowStart:
    """The first actor built starts at once, the others after `delay` s; each batch takes
    `work` s and is answered with the PID of the actor that ran it."""

    def __init__(self, state: str, delay: float, work: float):
        try:
            os.close(os.open(Path(state, "first"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(delay)
        self.work = work

    def __call__(self, batch: dict) -> pa.Table:
        time.sleep(self.work)
        return pa.table({"x": batch["x"], "pid": [os.getpid()] * len(batch["x"])})


@pytest.mark.timeout(300)
def test_in_flight_1_gives_long_batches_to_whichever_actor_is_free(ray_local, tmp_path):
    """Two long batches, two actors of which one is ready 3 s late: with one batch in
    flight per actor the late one runs the second batch (with Ray Data's default queue per
    actor the first actor ready took both parts of a short collect)."""
    ds = ray_local.data.from_items([{"x": i} for i in range(2)], override_num_blocks=2)
    out = gather(actor_map(ds, SlowStart, {"state": str(tmp_path), "delay": 3.0, "work": 8.0}, size=2, num_cpus=1.0,
                           batch_format="numpy", fault_tolerant=True, in_flight=1))
    assert sorted(out.column("x").to_pylist()) == [0, 1]
    assert len(set(out.column("pid").to_pylist())) == 2
