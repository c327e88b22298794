"""Helper of the bench scripts (not a bench): results files.

A bench's run is recorded in `bench/results/<bench>-<machine>.json`, one file per bench
and machine, the run appended to its `runs` (the format of docs/benchmarks.md, "Results
files"): date, commit, command, conditions and the bench's JSON result. `bench/capacity.py`
plans from these files.

`machine()`: `h100`, `h200`, ... for a CUDA device (its name), `cpu<N>` (N cores) without.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def machine(device_name: str | None = None) -> str:
    """A short name of this machine: the GPU model (`h200`) when `device_name` (a CUDA
    device's name) is given, else `cpu<cores>`."""
    if device_name and device_name != "cpu":
        m = re.search(r"\b([A-Z]+\d+[A-Z]*)\b", device_name.replace("NVIDIA", ""))
        return (m.group(1) if m else re.sub(r"\W+", "-", device_name)).lower()
    return f"cpu{os.cpu_count()}"


def describe(device_name: str | None = None) -> str:
    if device_name and device_name != "cpu":
        return f"one {device_name}"
    import platform

    return f"{os.cpu_count()}-core {platform.machine()} machine, no GPU ({platform.processor() or platform.system()})"


def commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def append_run(bench: str, script: str, result: dict, conditions: str, device_name: str | None = None,
               notes: str | None = None, path: Path | None = None, command: str | None = None) -> Path:
    """Append one run to `bench/results/<bench>-<machine>.json` (created when missing)."""
    name = machine(device_name)
    path = path or RESULTS / f"{bench}-{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {
        "bench": bench, "machine": name, "machine_description": describe(device_name), "script": script, "runs": []}
    run = {"date": datetime.date.today().isoformat(), "commit": commit(),
           "command": command or " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]]),
           "conditions": conditions, "result": result}
    if notes:
        run["notes"] = notes
    data["runs"].append(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
