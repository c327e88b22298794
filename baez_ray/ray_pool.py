"""The Ray session and the one way this package runs work in an actor pool.

* `init_ray(ray_cfg)`: join the cluster in `ray.address` (or $RAY_ADDRESS), or start a
  local one, once per process.
* `actor_map(ds, cls, ...)`: `ds.map_batches(cls, ...)` on a pool of `size` actors, each
  holding a model or a client; with `fault_tolerant=True` an actor that dies (OOM kill,
  segfault, preempted node) is restarted and its batch retried (`ACTOR_FAULT_TOLERANCE`).
* `gather(ds)`: a (small) Dataset's rows as one Arrow table, for the driver.

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
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from baez_ray import progress
from baez_ray.config import RayConfig

# Ray options of every actor pool that holds a model or a client (collect, the transformers
# and anthropic backends): an actor that dies is restarted, as often as needed (each
# restart reloads its model), and the batch it was working on is retried on it up to 3
# times; a batch that kills its actor 4 times fails the stage with Ray's error instead of
# looping forever (rerunning the job resumes from the committed shards).
ACTOR_FAULT_TOLERANCE = {"max_restarts": -1, "max_task_retries": 3}


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
    """Join the cluster in `cfg.address` (or $RAY_ADDRESS), or start a local one (once per process)."""
    import ray

    if ray.is_initialized():
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
        kwargs: dict[str, Any] = {"num_cpus": cfg.num_cpus, "include_dashboard": False}
        if cfg.object_store_mb:
            kwargs["object_store_memory"] = cfg.object_store_mb * 2**20
        if cfg.resources:
            kwargs["resources"] = dict(cfg.resources)
        progress.start_ray(**kwargs)
    if signal.getsignal(signal.SIGINT) is _raise_stop:  # the CLI's handlers: keep them
        stop_on_signals()


def actor_map(ds, cls, kwargs: dict | None = None, *, size: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
              resources: dict[str, float] | None = None, batch_size: int | None = None, batch_format: str = "pyarrow",
              fault_tolerant: bool = False, keep: bool = False, in_flight: int | None = None, all_up: bool = False,
              fn_kwargs: dict | None = None, **options):
    """`ds.map_batches(cls)` on a pool of `size` actors built with `cls(**kwargs)` (lazy);
    each actor reserves `num_cpus`, `num_gpus` and the custom `resources` (a job's
    `model.resources`, ...: e.g. {"accelerator_type:H100": 0.001}). `keep`: inside
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
               resources: dict[str, float] | None = None, fault_tolerant: bool = False, **options) -> bool:
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
        self.fn = cls(**kwargs)

    def call(self, batch, **kwargs):
        return self.fn(batch, **kwargs)


class _AsyncHost:
    """A kept actor of an async class: its calls share the actor's event loop."""

    def __init__(self, cls, kwargs: dict):
        self.fn = cls(**kwargs)

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
        return cls_(actors, ray.remote(_Turn).options(num_cpus=0).remote(), need)

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
