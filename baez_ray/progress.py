"""What a run shows on the terminal: a progress bar per stage, counted where the work is
done, and third-party noise hidden unless `--verbose`.

    driver:   with progress.bar("collect", total=n_tokens, unit="tok") as b:   # tqdm bar
                  ...                                  # b.add_total(n): a retry round
              b.rates()                                # start-up and steady rate, worker-side
    workers:  progress.tick(n)                         # n more units done (a no-op without a bar)

Workers report to one small Ray actor (`Counter`, named, created by the first bar of the
driver); a thread of the driver polls it twice a second and moves the bar. The count thus
moves as the actors work, not when their results reach the driver. On a terminal the bar
redraws in place (tqdm); otherwise (a log file, Ray Jobs) it is a line every
`LOG_EVERY_S` seconds and one when the bar closes. One bar is open at a time.

`set_verbose(False)` (the CLI's default) hides Python warnings, Ray's INFO lines and Ray
Data's progress bars and execution logs, worker output (model-loading bars, sae_lens and
transformers warnings, the tracebacks Ray prints before our one `error:` line) and the
transformers / Hugging Face chatter; `init_ray` starts Ray with `start_ray`.
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

from baez_ray.rundir import log

ACTOR_NAME = "baez_ray_progress"
POLL_S = 0.5
LOG_EVERY_S = 10.0

_verbose = False
_worker_counter: tuple = (None, None)  # (Ray session, this process's handle on the driver's Counter)
_driver_counter: tuple = (None, None)  # (Ray session, handle): one Counter per Ray session, kept alive


class Counter:
    """Ray actor: the units done in the open bar, with the times of the first and last
    report (this actor's clock, so worker-side timings whatever the node)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t_open, self.t_first, self.t_last = time.monotonic(), None, None
        self.n, self.n_first, self.taken = 0, 0, 0

    def add(self, n: int) -> None:
        now = time.monotonic()
        if self.t_first is None:
            self.t_first, self.n_first = now, n
        self.t_last, self.n = now, self.n + n

    def take(self) -> tuple[int, dict]:
        """Units reported since the last take, and the timings so far."""
        new, self.taken = self.n - self.taken, self.n
        return new, {"t_open": self.t_open, "t_first": self.t_first, "t_last": self.t_last, "n": self.n, "n_first": self.n_first}


def tick(n: int) -> None:
    """`n` more units of the open bar's work done (called in workers, or the driver)."""
    global _worker_counter
    import ray

    if not n or not ray.is_initialized():
        return
    session = _session()
    if _worker_counter[0] != session:  # (a process that outlived a Ray session: the tests)
        try:
            _worker_counter = (session, ray.get_actor(ACTOR_NAME))
        except ValueError:  # no bar was ever opened in this Ray job
            return
    try:
        _worker_counter[1].add.remote(int(n))
    except Exception:  # noqa: BLE001 - the Counter is gone: a progress tick never fails the work it counts
        _worker_counter = (None, None)


def _session() -> tuple[str, str]:
    """This process's Ray session: its node and job (a new `ray.init` changes them)."""
    import ray

    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ctx.get_job_id()


def _counter():
    """The driver's Counter for this Ray session, made by the first bar. The driver keeps its
    handle: a Counter whose handles were all dropped would die with each bar, and every bar
    would wait for a new actor process to start."""
    global _driver_counter
    import ray

    session = _session()
    if _driver_counter[0] != session:
        _driver_counter = (session, ray.remote(Counter).options(name=ACTOR_NAME, get_if_exists=True, num_cpus=0).remote())
    return _driver_counter[1]


class Bar:
    """A tqdm bar moved by the workers' ticks (see the module docstring)."""

    def __init__(self, name: str, total: int | None, unit: str, initial: int = 0):
        import ray

        self.name, self.stats = name, {}
        self.counter = _counter()
        ray.get(self.counter.reset.remote())
        tty = _terminal_width() > 0  # (a terminal of width 0, e.g. a bare pty, shows no bar: log lines then)
        # off a terminal, the bar is a log line: "[collect] 4.10k/8.33k tok (49%), 1.27k tok/s, 00:09 elapsed, ETA 00:03"
        fmt = None if tty else "{n_fmt}/{total_fmt}{unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, ETA {remaining}"
        self.tqdm = tqdm(total=total, initial=initial, unit=f" {unit}", desc=name, unit_scale=(total or 0) >= 100_000, dynamic_ncols=True,
                         file=sys.stderr if tty else open(os.devnull, "w"), mininterval=POLL_S, bar_format=fmt)
        self.tty, self.last_log = tty, time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True, name=f"progress-{name}")
        self.thread.start()

    def add_total(self, n: int) -> None:
        """More work in the same bar (a retry round)."""
        self.tqdm.total = (self.tqdm.total or 0) + n
        self.tqdm.refresh()

    def _pull(self) -> None:
        import ray

        new, self.stats = ray.get(self.counter.take.remote())
        if new:
            self.tqdm.update(new)
        if not self.tty and time.monotonic() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.monotonic()
            log(f"[{self.name}] {self.tqdm}")

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
        if not self.tty:
            log(f"[{self.name}] {self.tqdm}")
            self.tqdm.fp.close()
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
