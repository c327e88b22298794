"""Helper of the bench scripts (not a bench): the memory and the processes of a run.

`TreeMemory(pid)` samples, every `interval` seconds, every process in the tree under `pid`
(the process itself and all its descendants: for a Ray driver that started a local
cluster, that is GCS, raylet, the dashboard agents, log monitor and every worker process)
and keeps, with the wall-clock time of each sample:

* the peak of the summed private memory (USS: pages no other process maps; RSS counts the
  pages of shared libraries and of Ray's object store, which Ray caps, in every process
  that maps them) and of the summed RSS;
* every distinct process seen, by name (a Ray worker's title: `ray::CollectWorker`,
  `ray::IDLE`, ...), and the most processes alive at once.

`peak(t0, t1)` gives the peaks over the samples taken between two wall-clock times (a
stage inside a longer-lived process). `cpu_by_name(t0, t1)`: the CPU seconds (user +
system) each kind of process used between two wall-clock times (who competes with the
model's forward for the cores).
"""

from __future__ import annotations

import os
import threading
import time

import psutil


def _name(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmd:
        return p.name()
    first = cmd[0].split("/")[-1]
    if first.startswith("ray::"):  # ray::Class or ray::Class.method (the task it runs)
        return cmd[0].split()[0].split(".")[0]
    if first.startswith("python") and len(cmd) > 1:  # python -m x / python script.py
        arg = cmd[2] if cmd[1] == "-m" and len(cmd) > 2 else cmd[1]
        return "python " + arg.split("/")[-1]
    return first


NICE = 19  # the sampler thread's niceness: the lowest (CFS weight 15; Ray's worker processes run at niceness 15, weight 36)


class TreeMemory:
    def __init__(self, pid: int, interval: float = 0.5):
        self.root, self.interval = pid, interval
        self.samples: list[tuple[float, float, float, int]] = []  # (time, uss MB, rss MB, processes)
        self.seen: dict[int, str] = {}
        self.peak_by_name: dict[str, float] = {}
        self.cpu: list[tuple[float, int, float]] = []  # (time, pid, its CPU seconds so far)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _procs(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        uss = rss = 0.0
        n = 0
        by_name: dict[str, float] = {}
        for p in self._procs():
            try:
                mem = p.memory_full_info()
                t = p.cpu_times()
                self.cpu.append((time.time(), p.pid, t.user + t.system))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            n += 1
            # a Ray worker's title changes (ray::IDLE, then the actor's class): keep the last
            name = _name(p)
            if name == "?":  # gone between listing and naming
                name = self.seen.get(p.pid, name)
            self.seen[p.pid] = name
            uss, rss = uss + mem.uss / 2**20, rss + mem.rss / 2**20
            by_name[name] = by_name.get(name, 0.0) + mem.uss / 2**20
        if n:
            self.samples.append((time.time(), uss, rss, n))
            for k, v in by_name.items():
                self.peak_by_name[k] = max(self.peak_by_name.get(k, 0.0), v)

    def _loop(self) -> None:
        # reading a process's USS walks its page tables (~20 ms of CPU for a 1 GB process):
        # the sampler thread runs at a low priority so that it takes little from the
        # processes it measures (a run of 13 processes would otherwise pay 13 times what a
        # one-process peer pays)
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()

    def peak(self, t0: float = 0.0, t1: float = float("inf")) -> dict:
        """Peaks (MB) of the summed USS and RSS and the most processes at once, over the
        samples taken in [t0, t1]."""
        s = [x for x in self.samples if t0 <= x[0] <= t1] or self.samples[-1:]
        return {"uss_mb": round(max(x[1] for x in s), 1) if s else None,
                "rss_mb": round(max(x[2] for x in s), 1) if s else None,
                "max_processes": max(x[3] for x in s) if s else 0, "samples": len(s)}

    def cpu_by_name(self, t0: float = 0.0, t1: float = float("inf")) -> dict[str, float]:
        """CPU seconds used in [t0, t1] by each kind of process (summed over its PIDs; a
        process started inside the window counts from 0)."""
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        for t, pid, sec in self.cpu:
            if t < t0:
                first[pid] = sec
            elif t <= t1:
                last[pid] = sec
        out: dict[str, float] = {}
        for pid, sec in last.items():
            name = self.seen.get(pid, "?")
            out[name] = out.get(name, 0.0) + sec - first.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}

    def processes(self) -> dict[str, int]:
        """Every distinct process seen, counted by name."""
        out: dict[str, int] = {}
        for name in self.seen.values():
            out[name] = out.get(name, 0) + 1
        return dict(sorted(out.items()))


def _side_by_side_child(index: int, target, args: tuple, loaded, start, results) -> None:
    def ready() -> None:
        loaded.put(index)
        start.wait()

    results.put((index, target(*args, ready=ready)))


def side_by_side(target, arg_tuples: list[tuple], timeout: float = 1800.0) -> list:
    """`target(*args, ready=...)` in one fresh process per args tuple (spawned), all
    started together: each calls `ready()` once loaded (model, weights) and waits there
    until every process has; returns their results in the order of `arg_tuples`. The
    layout of a job's several actors, without Ray."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    loaded, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_side_by_side_child, args=(i, target, a, loaded, start, results))
             for i, a in enumerate(arg_tuples)]
    for p in procs:
        p.start()
    for _ in procs:
        loaded.get(timeout=timeout)
    start.set()
    out = dict(results.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join()
    return [out[i] for i in range(len(procs))]
