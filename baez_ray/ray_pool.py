"""The Ray session and the one way this package runs work in an actor pool.

* `init_ray(ray_cfg)`: join the cluster in `ray.address` (or $RAY_ADDRESS), or start a
  local one, once per process.
* `actor_map(ds, cls, ...)`: `ds.map_batches(cls, ...)` on a pool of `size` actors, each
  holding a model or a client; with `fault_tolerant=True` an actor that dies (OOM kill,
  segfault, preempted node) is restarted and its batch retried (`ACTOR_FAULT_TOLERANCE`).
* `gather(ds)`: a (small) Dataset's rows as one Arrow table, for the driver.
"""

from __future__ import annotations

import os
import signal
import threading
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
              fault_tolerant: bool = False, **options):
    """`ds.map_batches(cls)` on a pool of `size` actors built with `cls(**kwargs)` (lazy);
    each actor reserves `num_cpus`, `num_gpus` and the custom `resources` (a job's
    `model.resources`, ...: e.g. {"accelerator_type:H100": 0.001})."""
    import ray

    return ds.map_batches(
        cls, fn_constructor_kwargs=kwargs or {}, batch_size=batch_size, batch_format=batch_format,
        compute=ray.data.ActorPoolStrategy(size=size), num_cpus=num_cpus, num_gpus=num_gpus or None, resources=resources or None,
        **(ACTOR_FAULT_TOLERANCE if fault_tolerant else {}), **options,
    )


def gather(ds) -> pa.Table:
    """Every row of a Dataset as one table (an empty table without columns when none)."""
    batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(batches, promote_options="default") if batches else pa.table({})
