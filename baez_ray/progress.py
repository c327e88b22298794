"""What a run shows on the terminal: a progress bar per stage, counted where the work is
done, a line for work redone after a lost node, and third-party noise hidden unless
`--verbose`.

    driver:   with progress.bar("collect", total=n_tokens, unit="tok") as b:   # a bar, or lines
                  ...                                  # b.add_total(n): a retry round
              b.rates()                                # start-up and steady rate, worker-side
    workers:  progress.tick(n)                         # n more units done (a no-op without a bar)
              progress.started("part 3")               # an item of work (or a stateful actor) begins

Workers report to one small Ray actor (`Counter`, named, made when Ray starts, on the
driver's node: no worker node's loss takes it), and a thread of the driver polls it twice
a second and moves the bar. The count thus moves as the actors work, not when their
results reach the driver. On a terminal the bar redraws in place (tqdm); otherwise (a log
file, Ray Jobs, or tqdm told to stay quiet: TQDM_DISABLE) it is a line with the counts
every `LOG_EVERY_S` seconds and one when the bar closes, written by this module whatever
tqdm's settings. One bar is open at a time.

Redone work. An item `started` again by another process, whose first process's node is
lost, is work a lost node cost: the bar logs one line for it,
`[collect] lost node 3f2a9c1e at 12,288/16,384 tok: part 3 redone on 9bd10c44`, and
counts it (`Bar.redone`; `redone_total()` over the run).

`set_verbose(False)` (the CLI's default) hides Python warnings, Ray's INFO lines and Ray
Data's progress bars and execution logs, worker output (model-loading bars, sae_lens and
transformers warnings, Ray's task-retry messages, the tracebacks Ray prints before our one
`error:` line) and the transformers / Hugging Face chatter; `init_ray` starts Ray with
`start_ray`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager

from tqdm import tqdm

from baez_ray import faults
from baez_ray.rundir import log

ACTOR_NAME = "baez_ray_progress"
POLL_S = 0.5
LOG_EVERY_S = 10.0

_verbose = False
_worker_counter: tuple = (None, None)  # (Ray session, this process's handle on the driver's Counter)
_driver_counter: tuple = (None, None)  # (Ray session, handle): one Counter per Ray session, kept alive
_redone = 0  # lines logged for work redone after a lost node, this process


class Counter:
    """Ray actor: the units done in the open bar, with the times of the first and last
    report (this actor's clock, so worker-side timings whatever the node); and who started
    each item of work, to tell the driver of an item started again by another process."""

    def __init__(self):
        self.reset()
        self.items: dict[str, tuple] = {}  # item → (node, pid) of its last start
        self.events: list[tuple] = []

    def reset(self) -> None:
        self.t_open, self.t_first, self.t_last = time.monotonic(), None, None
        self.n, self.n_first, self.taken = 0, 0, 0

    def forget(self) -> None:
        """A new run in this Ray session: items of the last one are not this one's."""
        self.items, self.events = {}, []

    def add(self, n: int) -> None:
        now = time.monotonic()
        if self.t_first is None:
            self.t_first, self.n_first = now, n
        self.t_last, self.n = now, self.n + n

    def started(self, item: str, node: str, pid: int, verb: str, detail: str, units: int) -> None:
        last = self.items.get(item)
        self.items[item] = (node, pid)
        if last is not None and last != (node, pid):
            self.events.append((item, last[0], node, verb, detail, units))

    def take(self) -> tuple[int, dict, list]:
        """Units reported since the last take, the timings so far, and the items started
        again since the last take: (item, old node, new node, verb, detail, units)."""
        new, self.taken = self.n - self.taken, self.n
        events, self.events = self.events, []
        return new, {"t_open": self.t_open, "t_first": self.t_first, "t_last": self.t_last, "n": self.n, "n_first": self.n_first}, events


def _worker_handle():
    """This process's handle on the run's Counter (None: none in this Ray job)."""
    global _worker_counter
    import ray

    session = _session()
    if _worker_counter[0] != session:  # (a process that outlived a Ray session: the tests)
        try:
            _worker_counter = (session, ray.get_actor(ACTOR_NAME))
        except ValueError:  # no Counter in this Ray job (Ray started outside `start_ray`, no bar yet)
            return None
    return _worker_counter[1]


def tick(n: int) -> None:
    """`n` more units of the open bar's work done (called in workers, or the driver)."""
    global _worker_counter
    import ray

    if not n or not ray.is_initialized():
        return
    handle = _worker_handle()
    try:
        if handle is not None:
            handle.add.remote(int(n))
    except Exception:  # noqa: BLE001 - the Counter is gone: a progress tick never fails the work it counts
        _worker_counter = (None, None)


def started(item: str, units: int = 0, verb: str = "redone", detail: str = "") -> None:
    """An item of work (`part 3`, of `units` of the bar's units), or a stateful actor
    (`merge actor 1`), begins in this process. Started again elsewhere after its node was
    lost, the bar says `<item> <verb> on <node><detail>`, and its total grows by `units`
    (the item's work is counted again)."""
    global _worker_counter
    import os

    import ray

    if not ray.is_initialized():
        return
    handle = _worker_handle()
    try:
        if handle is not None:
            handle.started.remote(item, ray.get_runtime_context().get_node_id(), os.getpid(), verb, detail, int(units))
    except Exception:  # noqa: BLE001 - as in tick
        _worker_counter = (None, None)


def _session() -> tuple[str, str]:
    """This process's Ray session: its node and job (a new `ray.init` changes them)."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_job_id()


def _counter():
    """The driver's Counter for this Ray session (made by `start_ray`, or by the first bar).
    The driver keeps its handle: a Counter whose handles were all dropped would die with
    each bar, and every bar would wait for a new actor process to start. It lives on the
    driver's node and is restarted if it dies (a restarted one counts on from zero)."""
    global _driver_counter
    import ray

    session = _session()
    if _driver_counter[0] != session:
        opts = dict(name=ACTOR_NAME, get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1, **faults.on_driver_node())
        _driver_counter = (session, ray.remote(Counter).options(**opts).remote())
    return _driver_counter[1]


def new_run() -> None:
    """A job starts: what the last job of this Ray session started is forgotten."""
    import ray

    if ray.is_initialized():
        ray.get(_counter().forget.remote())


def redone_total() -> int:
    """Lines logged (items of work redone after a lost node) so far in this process."""
    return _redone


LINE = "{n_fmt}/{total_fmt}{unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, ETA {remaining}"


class Bar:
    """A bar moved by the workers' ticks (see the module docstring): tqdm on a terminal,
    else our own periodic line (`LINE`)."""

    def __init__(self, name: str, total: int | None, unit: str, initial: int = 0):
        import ray

        self.name, self.stats, self.redone = name, {}, 0
        self.total, self.n, self.initial, self.unit = total, initial, initial, unit
        self.counter = _counter()
        ray.get(self.counter.reset.remote())
        self.t0 = self.last_log = time.monotonic()
        self.tqdm = None
        if _terminal_width() > 0:  # (a terminal of width 0, e.g. a bare pty, shows no bar: lines then)
            bar = tqdm(total=total, initial=initial, unit=f" {unit}", desc=name, unit_scale=(total or 0) >= 100_000,
                       dynamic_ncols=True, file=sys.stderr, mininterval=POLL_S)
            if bar.disable:  # TQDM_DISABLE: lines, as off a terminal
                bar.close()
            else:
                self.tqdm = bar
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True, name=f"progress-{name}")
        self.thread.start()

    def add_total(self, n: int) -> None:
        """More work in the same bar (a retry round)."""
        self.total = (self.total or 0) + n
        if self.tqdm is not None:
            self.tqdm.total = self.total
            self.tqdm.refresh()

    def line(self) -> str:
        """`4.10k/8.33k tok (49%), 1.27k tok/s, 00:09 elapsed, ETA 00:03`: real counts,
        whatever tqdm is told by the environment."""
        elapsed = time.monotonic() - self.t0
        total = self.total if self.total and self.total >= self.n else None
        return tqdm.format_meter(self.n, total, elapsed, unit=f" {self.unit}", unit_scale=(self.total or 0) >= 100_000,
                                 bar_format=LINE if total else "{n_fmt}{unit}, {rate_fmt}, {elapsed} elapsed", initial=self.initial)

    def _pull(self) -> None:
        import ray

        new, self.stats, events = ray.get(self.counter.take.remote())
        if new:
            self.n += new
            if self.tqdm is not None:
                self.tqdm.update(new)
        if events:
            self._redone(events)
        if self.tqdm is None and time.monotonic() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.monotonic()
            log(f"[{self.name}] {self.line()}")

    def _redone(self, events: list[tuple]) -> None:
        """A line per item started again after its node was lost (the others: a retry on
        the same node, a process restarted by Ray after an OOM kill, are not counted here)."""
        global _redone
        cluster = faults.nodes()
        for item, old, new, verb, detail, units in events:
            if old in cluster and not cluster[old].alive:
                self.redone += 1
                _redone += 1
                total = f"/{self.total:,}" if self.total else ""
                log(f"[{self.name}] lost node {faults.short(old)} at {self.n:,}{total} {self.unit}: {item} {verb} on {faults.short(new)}{detail}")
                if units and self.total:
                    self.add_total(units)

    def _poll(self) -> None:
        while not self.stop.wait(POLL_S):
            try:
                self._pull()
            except Exception:  # noqa: BLE001 - Ray going down under a stopping run: the bar just stops
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        try:
            self._pull()
        except Exception:  # noqa: BLE001 - as in _poll
            pass
        if self.tqdm is None:
            log(f"[{self.name}] {self.line()}")
        else:
            self.tqdm.close()

    def rates(self) -> dict:
        """`startup_s` (bar opened → first report) and `steady_per_s` (units per second
        between the first and the last report), from the workers' reports: they do not
        depend on when results reach the driver."""
        s = self.stats
        if not s or s.get("t_first") is None:
            return {"startup_s": None, "steady_per_s": None}
        span = s["t_last"] - s["t_first"]
        steady = (s["n"] - s["n_first"]) / span if span > 0 else s["n"] / max(s["t_last"] - s["t_open"], 1e-9)
        return {"startup_s": round(s["t_first"] - s["t_open"], 3), "steady_per_s": round(steady, 1)}


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns if sys.stderr.isatty() else 0
    except (OSError, ValueError, AttributeError):  # stderr replaced by an object without a descriptor
        return 0


@contextmanager
def bar(name: str, total: int | None, unit: str, initial: int = 0):
    """A progress bar for one stage (Ray must be initialised)."""
    b = Bar(name, total, unit, initial)
    try:
        yield b
    finally:
        b.close()


# ---- what the terminal shows -----------------------------------------------------------

NOISY_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONWARNINGS": "ignore"}


def set_verbose(verbose: bool) -> None:
    """Show (`verbose`) or hide third-party warnings and logs for this process and the Ray
    workers it starts (they inherit the environment)."""
    global _verbose
    _verbose = verbose
    if verbose:
        return
    warnings.simplefilter("ignore")
    for k, v in NOISY_ENV.items():
        os.environ.setdefault(k, v)
    for name in ("sae_lens", "transformers", "huggingface_hub", "sentence_transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> bool:
    return _verbose


def start_ray(**init_kwargs) -> None:
    """`ray.init` for the chosen verbosity: worker output to the driver and Ray's INFO lines
    only with `--verbose`. Quiet, the C++ core of the driver logs fatal errors only, and
    says so on stderr as it starts (hence stderr closed during `ray.init`: its errors are
    raised, not printed)."""
    import ray

    if _verbose:
        _loud_ray_errors()
        ray.init(log_to_driver=True, **init_kwargs)
    else:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
            ray.init(log_to_driver=False, logging_level=logging.WARNING, **init_kwargs)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    _quiet_ray_data()
    if not _verbose:
        _quiet_ray_errors()
    _counter()  # before any actor starts: a stateful actor's first start is on record


def _quiet_errors(data, ignore_prefix: bool) -> None:
    """What the driver's error listener prints, quiet: nothing (Ray's session logs keep it)."""


def _quiet_ray_errors() -> None:
    """The driver prints the errors the GCS pushes to its job (a task retried: "There are 2
    retries remaining", a raylet that died, a worker killed) on stdout, with `log_to_driver`
    off too: quiet, a run's own lines say what a lost node cost instead. (Ray's listener
    thread looks the printer up by name each time: replacing it is enough.)"""
    import ray._private.worker as ray_worker

    global _ray_printer
    if hasattr(ray_worker, "print_to_stdstream") and ray_worker.print_to_stdstream is not _quiet_errors:
        _ray_printer, ray_worker.print_to_stdstream = ray_worker.print_to_stdstream, _quiet_errors


def _loud_ray_errors() -> None:
    """`--verbose` after a quiet session in this process: Ray's own printer back."""
    import ray._private.worker as ray_worker

    if _ray_printer is not None:
        ray_worker.print_to_stdstream = _ray_printer


_ray_printer = None


def _quiet_ray_data() -> None:
    """After `ray.init`: Ray Data's own progress bars (blocks and rows, not our units) and
    its execution log lines on the console only with `--verbose` (its log file keeps them)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = _verbose and sys.stderr.isatty()
    ctx.print_on_execution_start = _verbose
    if not _verbose:
        warnings.simplefilter("ignore")  # again: importing ray put its own filters first
        for h in logging.getLogger("ray.data").handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.CRITICAL)
