"""The Ray session and the one way this package runs work in an actor pool.

* `init_ray(ray_cfg)`: join the cluster in `ray.address` (`auto`: the one `ray start` made
  on this machine; or $RAY_ADDRESS, which Ray Jobs sets), or start a private local one
  (never another's: a stale `ray_current_cluster` file is not read), once per process.
* `actor_map(ds, cls, ...)`: `ds.map_batches(cls, ...)` on a pool of `size` actors, each
  holding a model or a client; an actor that dies (OOM kill, segfault, a lost node) is
  restarted, on another node if its own is gone, and its batch retried
  (`ACTOR_FAULT_TOLERANCE`).
* `gather(ds)`: a (small) Dataset's rows as one Arrow table, for the driver.
* `watch(run)`: while a job runs, a thread that notices lost nodes (a line each), counts
  the actors Ray restarted per stage, and stops the run (`faults.Unplaceable`, one line)
  when an actor has waited `ray.unplaceable_timeout_s` for a resource no node has left.

What a lost worker node costs, and the settings that make it cost no more (docs/cluster-faults.md):
Ray Data retries a lost task (`TASK_RETRIES`) and rebuilds lost blocks from their lineage;
every actor this package starts is restarted with its batch retried
(`ACTOR_FAULT_TOLERANCE`); the groupbys shuffle with tasks (`SHUFFLE`: Ray Data's default
hash shuffle keeps partitions in actors that a lost node takes with it); the stateful
actors restore their own state (collect's merge actors: `stages/merge.py`; the API
callers' answers: `llm/journal.py`); the small actors of the driver (progress Counter, a
kept pool's turn keeper) live on the driver's node.

Kept pools. A model in an actor costs its start-up (a process, the imports, the weights:
5-10 s for a small LLM on CPU, minutes for a large one on a GPU) every time a Dataset runs
through a new Ray Data actor pool. A stage that sends several Datasets to the same model
(the label stage's shards, every retry round, the two LLM rounds of a method, a scorer
that is also the explainer) asks with `keep=True`: inside `kept_pools()` (`jobs.execute`
opens one around a job) the first such call starts `size` long-lived actors and every
later call with the same class and arguments reuses them; Ray Data then maps light tasks
that hand each batch to one of them (in turn). Kept actors are killed when the scope
ends, or earlier when another pool needs their resources: a pool is evicted (oldest
first) whenever what the kept pools hold plus what a new pool asks for would leave less
than one CPU of the cluster free, so keeping never starves a stage of the job.

Async actors. A class whose `__call__` is a coroutine function (the API backends: their
actors wait on the network) serves `in_flight` batches at once, on one event loop: Ray
Data's actor pool runs that many calls per actor concurrently, a kept pool's host is an
async actor fed by `in_flight` hand-over tasks per actor.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import signal
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from baez_ray import faults, progress
from baez_ray.config import RayConfig
from baez_ray.rundir import log

# Ray options of every actor this package starts (actor pools, kept pools, collect's merge
# actors): an actor that dies is restarted, as often as needed (each restart reloads its
# model; on another node when its own is lost), and the calls it was working on are
# retried on it until they succeed (as Ray Data's own default: while Ray learns that a
# node is gone, each call to an actor of that node fails again and again, "temporarily
# unavailable", and a bounded number of tries runs out within seconds). An actor that
# dies CRASHES_MAX times on a node that is still alive (a batch that kills it every time:
# an out-of-memory kill, a segfault) fails the run instead (`watch`); rerunning the job
# resumes from the committed shards.
ACTOR_FAULT_TOLERANCE = {"max_restarts": -1, "max_task_retries": -1}
CRASHES_MAX = 4
# Ray Data's tasks (reads, light maps, a kept pool's hand-over tasks): retried until they
# succeed when their node is lost (Ray Data's own default, stated here); plain Ray tasks of
# the stages (`remote`): Ray's default of 3 tries after a failure of their worker or node.
TASK_RETRIES = {"ray_data": -1, "tasks": 3}
# groupby / map_groups: a sort-based shuffle in tasks, rebuilt from lineage when a node is lost
SHUFFLE = "sort_shuffle_pull_based"


def _raise_stop(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt('SIGINT' / 'SIGTERM') in the main thread:
    the stages save what they have (collect: a snapshot) and the CLI stops Ray and says how
    to resume. (ray.init installs its own SIGTERM handler, which exits at once: init_ray
    puts this one back.)"""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raise_stop)
        signal.signal(signal.SIGTERM, _raise_stop)


def init_ray(cfg: RayConfig) -> None:
    """Join the cluster in `cfg.address` (`auto`: the one `ray start` made on this machine)
    or in $RAY_ADDRESS (Ray Jobs), else start a private local one (once per process)."""
    import ray

    if ray.is_initialized():
        _data_settings()
        return
    # Ray Data reads a Parquet table's footers on a pool of FooterReader actors, 32 by
    # default, each a new worker process, for every read: our tables are a few parts each
    # (it is read before the workers start: they inherit it on a local cluster)
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    env_address = os.environ.get("RAY_ADDRESS", "")
    if cfg.address or (env_address and not env_address.startswith(("http://", "https://"))):
        # address None: ray.init reads RAY_ADDRESS, which Ray Jobs sets (host:port of the GCS)
        # for a submitted job's driver (`baez-ray submit`), so it joins the cluster it runs on.
        # An http(s) RAY_ADDRESS is a Jobs API URL for `baez-ray submit`, not a cluster to join.
        progress.start_ray(address=cfg.address)
    else:
        # "local": a new cluster of this process. (Without an address ray.init would read the
        # ray_current_cluster file of the last `ray start` on this machine, which outlives a
        # cluster that went away without `ray stop`, and try to join that.)
        kwargs: dict[str, Any] = {"address": "local", "num_cpus": cfg.num_cpus, "include_dashboard": False}
        if cfg.object_store_mb:
            kwargs["object_store_memory"] = cfg.object_store_mb * 2**20
        if cfg.resources:
            kwargs["resources"] = dict(cfg.resources)
        progress.start_ray(**kwargs)
    _data_settings()
    if signal.getsignal(signal.SIGINT) is _raise_stop:  # the CLI's handlers: keep them
        stop_on_signals()


def _data_settings() -> None:
    import ray
    from ray.data.context import ShuffleStrategy

    ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy(SHUFFLE)


def actor_map(ds, cls, kwargs: dict | None = None, *, size: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
              resources: dict[str, float] | None = None, batch_size: int | None = None, batch_format: str = "pyarrow",
              fault_tolerant: bool = True, keep: bool = False, in_flight: int | None = None, all_up: bool = False,
              fn_kwargs: dict | None = None, **options):
    """`ds.map_batches(cls)` on a pool of `size` actors built with `cls(**kwargs)` (lazy);
    each actor reserves `num_cpus`, `num_gpus` and the custom `resources` (a job's
    `model.resources`, ...: e.g. {"accelerator_type:H100": 0.001}); `fault_tolerant`
    (every pool of the package): `ACTOR_FAULT_TOLERANCE`. `keep`: inside
    `kept_pools()`, the actors outlive this Dataset and serve every later call with the
    same class and arguments (see the module docstring). `in_flight`: the batches queued
    on one actor at once (Ray Data's default: 4; an async class runs them concurrently).
    `fn_kwargs`: keyword arguments of every call (not of the pool: a kept pool serves
    calls with different ones). `all_up`: no batch is handed out before
    every actor is built (Ray Data otherwise gives them to the first actor ready while the
    others still load their model); an actor that cannot be built fails the map with its
    own error."""
    import ray

    need = _need(size, num_cpus, num_gpus, resources)
    concurrent = is_async(cls)
    pool = _kept_pool(cls, kwargs, size, num_cpus, num_gpus, resources, fault_tolerant, options) if keep else None
    if pool is not None:
        hand = {"actors": pool.actors, "turn": pool.turn, "kwargs": fn_kwargs or {}}
        if concurrent:  # whole blocks, cut into batches handed over at once: no batch waits for the one before
            return ds.map_batches(_hand_over_block, fn_kwargs={**hand, "rows": batch_size}, batch_size=None,
                                  batch_format="pyarrow", num_cpus=HAND_OVER_CPUS, concurrency=size * (in_flight or 4))
        # a sync host serves one batch at a time (one more waits, ready)
        return ds.map_batches(_hand_over, fn_kwargs=hand, batch_size=batch_size, batch_format=batch_format,
                              num_cpus=HAND_OVER_CPUS, concurrency=2 * size)
    if _kept is not None:
        _make_room(need)  # (a pool too big to keep beside FREE_CPUS runs as a plain Ray Data pool)
    strategy = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=in_flight,
                                          max_concurrent_calls_per_actor=(in_flight or 4) if concurrent else None)
    out = ds.map_batches(
        cls, fn_constructor_kwargs=kwargs or {}, fn_kwargs=fn_kwargs, batch_size=batch_size, batch_format=batch_format,
        compute=strategy, num_cpus=num_cpus, num_gpus=num_gpus or None, resources=resources or None,
        **(ACTOR_FAULT_TOLERANCE if fault_tolerant else {}), **options,
    )
    if all_up:  # the Dataset's own context; a timeout (without one Ray Data does not wait)
        out.context.wait_for_min_actors_s = 10**7
    return out


def start_kept(cls, kwargs: dict | None = None, *, size: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
               resources: dict[str, float] | None = None, fault_tolerant: bool = True, **options) -> bool:
    """Start, without waiting, the kept pool that `actor_map(..., keep=True)` with the same
    arguments will use: its actors start while the job does other work (an API client's
    pool before the first prompt is ready). False outside `kept_pools()` or without room."""
    return _kept_pool(cls, kwargs, size, num_cpus, num_gpus, resources, fault_tolerant, options) is not None


def is_async(cls) -> bool:
    """Whether instances of `cls` are called with `await` (a coroutine `__call__`)."""
    return inspect.iscoroutinefunction(getattr(cls, "__call__", None))


# ---- kept pools ---------------------------------------------------------------------------

HAND_OVER_CPUS = 0.01  # a task that passes a batch to a kept actor and waits for its answer
FREE_CPUS = 1.0  # what kept pools always leave free for the rest of a stage (reads, light maps)

_kept: OrderedDict[str, "_KeptPool"] | None = None


class _Host:
    """A kept actor: holds `cls(**kwargs)` and calls it on each batch it is handed."""

    def __init__(self, cls, kwargs: dict):
        self.name = cls.__name__
        self.fn = cls(**kwargs)

    def __repr__(self) -> str:  # what Ray calls the actor (logs, the GCS, the line of a run stopped for it)
        return f"kept({self.name})"

    def call(self, batch, **kwargs):
        return self.fn(batch, **kwargs)


class _AsyncHost(_Host):
    """A kept actor of an async class: its calls share the actor's event loop."""

    async def call(self, batch, **kwargs):
        return await self.fn(batch, **kwargs)


class _Turn:
    """Whose turn it is among a kept pool's actors (round robin over the batches)."""

    def __init__(self):
        self.n = -1

    def next(self) -> int:
        self.n += 1
        return self.n


@dataclass
class _KeptPool:
    actors: list
    turn: Any
    need: dict[str, float]

    @classmethod
    def start(cls_, cls, kwargs, size, need, num_cpus, num_gpus, resources, fault_tolerant, options) -> "_KeptPool":
        import ray

        opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources or {}), **options}
        if fault_tolerant:  # an actor that dies is restarted (its model reloaded) and the call retried
            opts.update(ACTOR_FAULT_TOLERANCE)
        host = ray.remote(_AsyncHost if is_async(cls) else _Host)
        actors = [host.options(**opts).remote(cls, kwargs) for _ in range(size)]
        turn = ray.remote(_Turn).options(num_cpus=0, max_restarts=-1, max_task_retries=-1, **faults.on_driver_node()).remote()
        return cls_(actors, turn, need)

    def kill(self) -> None:
        import ray

        for a in [*self.actors, self.turn]:
            ray.kill(a)


def _hand_over(batch, actors: list, turn, kwargs: dict):
    """A Ray Data task: the batch to the kept actor whose turn it is; its answer back."""
    import ray

    i = ray.get(turn.next.remote()) % len(actors)
    return ray.get(actors[i].call.remote(batch, **kwargs))


def _hand_over_block(block: pa.Table, actors: list, turn, kwargs: dict, rows: int | None):
    """A Ray Data task (an async kept pool): a block cut into batches of `rows`, all handed
    over at once, to the actors in turn (an actor's window serves them together); their
    answers back in order."""
    import ray

    step = rows or max(1, block.num_rows)
    first = ray.get(turn.next.remote())
    cuts = [block.slice(a, step) for a in range(0, block.num_rows, step)] or [block]
    refs = [actors[(first + j) % len(actors)].call.remote(cut, **kwargs) for j, cut in enumerate(cuts)]
    return pa.concat_tables(ray.get(refs), promote_options="default")


@contextmanager
def kept_pools():
    """A scope (a job) in which `actor_map(..., keep=True)` pools are started once and
    reused; every kept actor is killed when it ends. Nested scopes share the outer one."""
    global _kept
    if _kept is not None:
        yield
        return
    _kept = OrderedDict()
    try:
        yield
    finally:
        pools, _kept = list(_kept.values()), None
        for pool in pools:
            try:
                pool.kill()
            except Exception:  # noqa: BLE001 - Ray already down (a stopped run): nothing left to kill
                pass


def _kept_pool(cls, kwargs, size, num_cpus, num_gpus, resources, fault_tolerant, options) -> "_KeptPool | None":
    """The kept pool of these arguments (started when new; the most recently used is
    evicted last), or None outside `kept_pools()`, for options a pool cannot keep, or
    without room beside the other kept pools."""
    if _kept is None or not set(options) <= {"runtime_env"}:
        return None
    need = _need(size, num_cpus, num_gpus, resources)
    key = _pool_key(cls, kwargs, size, num_cpus, num_gpus, resources, fault_tolerant, options)
    if key not in _kept and not _make_room(need):
        return None
    if key not in _kept:
        _kept[key] = _KeptPool.start(cls, kwargs or {}, size, need, num_cpus, num_gpus, resources, fault_tolerant, options)
    _kept.move_to_end(key)
    return _kept[key]


def _need(size: int, num_cpus: float, num_gpus: float, resources: dict | None) -> dict[str, float]:
    need = {"CPU": size * num_cpus, "GPU": size * (num_gpus or 0.0)}
    need.update({k: size * v for k, v in (resources or {}).items()})
    return need


def _pool_key(cls, kwargs, *rest) -> str:
    """Which pool: the class and every argument (a secret as its hash, never its text)."""

    def plain(o):
        if hasattr(o, "get_secret_value"):
            return "secret:" + hashlib.sha256(o.get_secret_value().encode()).hexdigest()
        return repr(o)

    text = json.dumps([f"{cls.__module__}.{cls.__qualname__}", id(cls), kwargs, *rest], sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()


def _make_room(need: dict[str, float]) -> bool:
    """Evict kept pools, oldest first, until they and `need` leave FREE_CPUS of the
    cluster's CPUs free and fit its other resources; False if `need` alone does not."""
    import ray

    total = ray.cluster_resources()

    def fits() -> bool:
        held: dict[str, float] = {}
        for pool in _kept.values():
            for k, v in pool.need.items():
                held[k] = held.get(k, 0.0) + v
        floor = {"CPU": FREE_CPUS}
        return all(total.get(k, 0.0) - held.get(k, 0.0) - need.get(k, 0.0) >= floor.get(k, 0.0) for k in {*need, "CPU"} if need.get(k) or k == "CPU")

    while _kept and not fits():
        _, pool = _kept.popitem(last=False)
        pool.kill()
    return fits()


def gather(ds, like: pa.Schema | None = None) -> pa.Table:
    """Every row of a Dataset as one table (an empty table without columns when none);
    with `like`, conformed to that schema (`schema.conform`; its empty table when none)."""
    batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    table = pa.concat_tables(batches, promote_options="default") if batches else pa.table({})
    if like is None:
        return table
    from baez_ray import schema

    return schema.conform(table, like) if batches else schema.empty(like)


def resolved(x):
    """`x`, or the object it refers to when it is a Ray ObjectRef (a `fn_kwargs` value put
    once into the object store and read in each task)."""
    import ray

    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


@functools.cache
def remote(fn):
    """`ray.remote(fn)` for a task function, made once per process."""
    import ray

    return ray.remote(fn)


# ---- the watch: lost nodes, restarted actors, actors that cannot be placed -----------------

WATCH_POLL_S = 1.0
STOP_SIGNAL = signal.SIGUSR1  # what the watch sends the main thread to stop the run (Unplaceable)


class _Watch:
    """See `watch`. Polls the GCS (nodes, this job's actors) every WATCH_POLL_S."""

    def __init__(self, run, timeout_s: float):
        self.run, self.timeout = run, timeout_s
        self.seen: dict[str, bool] = {}  # node → alive at the last poll
        self.known: dict[str, faults.Node] = {}  # node → as it was while alive (resources, address)
        self.where: dict[str, tuple[str, str]] = {}  # actor → (node, name) while it was alive
        self.restarts: dict[str, int] | None = None  # actor → restarts at the last poll
        self.waiting: dict[str, float] = {}  # actor → when it was first seen stuck
        self.crashes: dict[str, int] = {}  # actor → restarts while the node it ran on stayed alive
        self.error: BaseException | None = None  # what the main thread is stopped with
        self.counts: dict[str, dict] = {}  # stage → {"lost_nodes": [...], "restarted_actors": n}
        self.redone_seen = progress.redone_total()
        self.lock, self.done = threading.Lock(), threading.Event()
        self.can_stop = threading.current_thread() is threading.main_thread()

    def _stage(self) -> dict:
        return self.counts.setdefault(getattr(self.run, "current_stage", None) or "run", {"lost_nodes": [], "restarted_actors": 0})

    def poll(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        with self.lock:
            cluster, actors = faults.nodes(), faults.job_actors()
            for node in cluster.values():
                if not node.alive and self.seen.get(node.id):
                    self._lost(self.known.get(node.id, node), actors)
                self.seen[node.id] = node.alive
                if node.alive:
                    self.known[node.id] = node
            restarts = {a.id: a.restarts for a in actors}
            if self.restarts is not None:
                self._restarted(actors, cluster)
            for a in actors:
                if a.state == "ALIVE" and a.node:
                    self.where[a.id] = (a.node, a.name)
            self.restarts = restarts
            self._check_stuck(actors, cluster)

    def _restarted(self, actors, cluster) -> None:
        """Count the restarts since the last poll; an actor that keeps dying on a live node
        (not a lost node: its batch kills it) stops the run (CRASHES_MAX)."""
        for a in actors:
            new = a.restarts - self.restarts.get(a.id, 0)
            if new <= 0:
                continue
            self._stage()["restarted_actors"] += new
            node = self.where.get(a.id, ("", ""))[0]
            if node and cluster.get(node) is not None and cluster[node].alive:
                self.crashes[a.id] = self.crashes.get(a.id, 0) + new
                if self.crashes[a.id] >= CRASHES_MAX:
                    self._stop(RuntimeError(f"{a.name} died {self.crashes[a.id]} times on a live node (a batch that kills it: "
                                            "out of memory, a crash?); rerun with --verbose for Ray's account of it"))

    def _lost(self, node, actors) -> None:
        held = [a.name for a in actors if a.state != "DEAD" and self.where.get(a.id, ("", ""))[0] == node.id]
        self._stage()["lost_nodes"].append(faults.short(node.id))
        what = f"{len(held)} of the run's actors ({', '.join(sorted(set(held)))}) restart on the other nodes" if held else "no actor of the run was on it"
        log(f"[{getattr(self.run, 'current_stage', None) or 'run'}] lost node {node.name}: {what}; its tasks are retried")

    def _check_stuck(self, actors, cluster) -> None:
        """Actors that wait for what no alive node has: restarted ones (their node was
        lost), and, once a node was lost, new ones. (An actor waiting at the start of a run
        for a node an autoscaler has yet to start is not stuck.)"""
        now = time.monotonic()
        lost_any = any(n in cluster and not cluster[n].alive for n in self.known)
        stuck = [a for a in faults.stuck(actors, cluster) if a.state == "RESTARTING" or lost_any]
        self.waiting = {a.id: self.waiting.get(a.id, now) for a in stuck}
        for a in stuck:
            if now - self.waiting[a.id] >= self.timeout:
                lost = faults.lost_node(a, self.where.get(a.id, ("", ""))[0], self.known, cluster)
                self._stop(faults.Unplaceable(faults.stuck_line(a, lost, cluster, now - self.waiting[a.id], str(self.run.dir))))

    def _stop(self, error: BaseException) -> None:
        """Raise `error` in the main thread (once)."""
        if self.error is not None:
            return
        self.error = error
        if self.can_stop:
            os.kill(os.getpid(), STOP_SIGNAL)
        else:  # (a job run outside the main thread: nothing can interrupt it; say why it waits)
            log(f"[{getattr(self.run, 'current_stage', None) or 'run'}] {error}")

    def loop(self) -> None:
        while not self.done.wait(WATCH_POLL_S):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - Ray going down (a stopping run): the watch just skips a poll
                pass

    def stage_counts(self, name: str) -> dict:
        """Run.stage's hook: what the cluster cost this stage (nothing when it cost nothing)."""
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - as in loop
            pass
        with self.lock:
            got = self.counts.pop(name, {"lost_nodes": [], "restarted_actors": 0})
        redone, self.redone_seen = progress.redone_total() - self.redone_seen, progress.redone_total()
        out = {k: v for k, v in {**got, "retried_parts": redone}.items() if v}
        return {"faults": out} if out else {}

    def _raise(self, signum, frame) -> None:
        if self.error is not None:
            raise self.error


@contextmanager
def watch(run, timeout_s: float):
    """While a job runs: a line for each lost node (`[collect] lost node 3f2a9c1e
    (10.0.0.7): 3 of the run's actors (...) restart on the other nodes; ...`), per stage the
    nodes lost, the actors Ray restarted and the items of work redone
    (`faults` in the stage's manifest entry, via `run.stage_hooks`), and two stops, raised
    in the main thread (a signal, STOP_SIGNAL): an actor of the run that waits `timeout_s`
    for resources no alive node has (`faults.Unplaceable`, whose message is the one line
    the CLI prints, exit code 75), and an actor that died CRASHES_MAX times on a live node
    (a RuntimeError: exit code 1). Off the main thread the watch can only log them."""
    w = _Watch(run, timeout_s)
    before = signal.signal(STOP_SIGNAL, w._raise) if w.can_stop else None
    run.stage_hooks.append(w.stage_counts)
    thread = threading.Thread(target=w.loop, daemon=True, name="baez-watch")
    thread.start()
    try:
        yield w
    finally:
        w.done.set()
        thread.join(timeout=10)
        run.stage_hooks.remove(w.stage_counts)
        if w.can_stop:
            signal.signal(STOP_SIGNAL, before)
