"""Run directories: manifests, atomic writes, Parquet parts, resume markers.

A run directory holds the resolved job file, one folder per table (Parquet parts), a
`manifest.json` and, for jobs that make one, `report/`. The manifest records what is
needed to reproduce and account for the run: the job spec, package versions, git commit,
seeds, per-stage timings and counts. It never holds secrets: the job spec has none (API
keys come from the environment only) and environment variables are not recorded.

Resume. A run directory is resumable at any point: `Run(spec, out)` on a directory that
holds a run of the same spec counts one more attempt, a stage the manifest records as
finished is skipped (`completed`), and the long stages commit their work inside the stage
in shards (collect: a snapshot of the merge state with the contexts parts it covers;
label: one Parquet part per shard of features), each made visible by an atomic rename of
its commit marker, written last (`write_json_atomic`), so a run killed with SIGKILL
anywhere redoes at most the shards in flight. Ray actors that die are restarted by Ray and
their batch retried (`ray_pool.ACTOR_FAULT_TOLERANCE`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from baez_ray.config import JobSpec

PACKAGES = ["baez_ray", "ray", "torch", "transformers", "sae-lens", "sentence-transformers", "pyarrow", "anthropic", "vllm"]


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path) -> None:
    """Make `tmp` visible as `final` atomically (fsync, rename, fsync the directory): a
    reader sees either nothing or the whole file, whenever the process is killed."""
    fsync_path(tmp)
    os.replace(tmp, final)
    try:
        fsync_path(final.parent)
    except OSError:  # some filesystems do not fsync directories
        pass


def write_json_atomic(obj: Any, path: Path) -> None:
    """A commit marker or small state file: written to a temp name, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    commit(tmp, path)


def write_parquet_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    commit(tmp, path)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


class Run:
    """A run directory and its manifest. Stages report into it with `stage()`."""

    def __init__(self, spec: JobSpec, out: str | Path | None = None):
        self.spec = spec
        self.dir = Path(out) if out else Path(spec.out) / spec.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.dir / "manifest.json"
        previous = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else {}
        spec_json = json.loads(json.dumps(spec.model_dump(mode="json")))
        if previous and previous.get("spec") != spec_json:
            raise ValueError(
                f"{self.dir}: holds a run of a different job spec; resume with the same job file "
                "and --set values, or choose another --out"
            )
        self.manifest: dict[str, Any] = {
            "job": spec.job,
            "name": spec.name,
            "spec": spec_json,
            "seed": spec.seed,
            "versions": package_versions(),
            "git_commit": git_commit(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "status": "running",
            "attempts": previous.get("attempts", 0) + 1,
            "stages": previous.get("stages", {}),
        }
        self.current_stage: str | None = None
        # called at the end of every stage with its name; what they return joins its counts
        # (`ray_pool.watch`: what a lost node cost the stage)
        self.stage_hooks: list = []
        (self.dir / "job.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        self.save()

    @property
    def attempt(self) -> int:
        """1 for the first run in this directory, +1 for every rerun (resume)."""
        return int(self.manifest["attempts"])

    def table_dir(self, name: str) -> Path:
        return self.dir / name

    def save(self) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2, default=str))
        os.replace(tmp, self.manifest_path)

    def completed(self, name: str) -> bool:
        """True when an earlier attempt of this run finished stage `name` (resume skips it;
        a line says so)."""
        info = self.manifest["stages"].get(name)
        done = bool(info) and "error" not in info and "seconds" in info
        if done:
            log(f"[{name}] done in an earlier run ({info['seconds']:.1f}s{_counts(info, ', ')}), skipped")
        return done

    @contextmanager
    def stage(self, name: str):
        """Time a stage; the body fills the yielded dict with its counts."""
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        log(f"[{name}] started")
        self.current_stage = name
        try:
            yield info
        except BaseException as e:
            info["error"] = f"{type(e).__name__}: {e}"
            info["seconds"] = round(time.perf_counter() - t0, 3)
            self._end_stage(name, info)
            # stopped (resumable): a signal, or an actor the cluster cannot place (faults.Unplaceable)
            self.manifest["status"] = "stopped" if isinstance(e, KeyboardInterrupt) or getattr(e, "resumable", False) else "failed"
            self.save()
            raise
        info["seconds"] = round(time.perf_counter() - t0, 3)
        self._end_stage(name, info)
        self.save()
        log(f"[{name}] done in {info['seconds']:.1f}s{_counts(info, ' ')}")

    def _end_stage(self, name: str, info: dict) -> None:
        for hook in list(self.stage_hooks):
            info.update(hook(name))
        self.manifest["stages"][name] = info
        self.current_stage = None

    def finish(self) -> None:
        self.manifest["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.manifest["status"] = "done"
        self.save()


def _counts(info: dict, sep: str) -> str:
    """A stage's scalar counts as `k=v` pairs, for its log lines."""
    pairs = [f"{k}={v}" for k, v in info.items() if k != "seconds" and not isinstance(v, (dict, list))]
    return sep + " ".join(pairs) if pairs else ""


def log(msg: str) -> None:
    """A line on stderr, with the time; above an open progress bar, which it leaves intact."""
    from tqdm import tqdm

    tqdm.write(f"{datetime.now().strftime('%H:%M:%S')} {msg}", file=sys.stderr)
    sys.stderr.flush()


def write_table(table, out_dir: Path, rows_per_file: int = 4096) -> int:
    """Write `table` as part-*.parquet files (each written to a temp name, then renamed)."""
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    n_parts = 0
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        tmp = out_dir / f".part-{i:05d}.parquet.tmp"
        pq.write_table(table.slice(start, rows_per_file), tmp)
        tmp.rename(out_dir / f"part-{i:05d}.parquet")
        n_parts += 1
    return n_parts
