"""Ray Jobs: take a job file to a running Ray cluster.

`baez-ray submit JOB.yaml --address URL` validates the job file here (a bad key fails
before anything is uploaded), ships the project directory as the job's `working_dir`
(without virtualenvs, run directories, git data and caches) and runs
`python -m baez_ray.cli run <job file> --set ...` on the cluster as the job's entrypoint.
`status`, `logs` and `stop` take the submission id that `submit` prints.

Inside a Ray job, Ray sets RAY_ADDRESS for the entrypoint, so the driver joins the cluster
it runs on (`baez_ray.ray_pool.init_ray`): leave `ray.address` unset (or `auto`) in job files
meant for `submit`.

Entrypoint resources. The driver only orchestrates: the base model, the AV, the embedder
and vLLM engines run in Ray actors that request their own GPUs (`model.num_gpus`, ...).
So the entrypoint reserves `DRIVER_NUM_CPUS` CPU and no GPU. Reserving
`model.num_gpus` for the driver would hold a GPU the model actor then cannot get (on a
one-GPU node the job would wait forever) and would force the driver onto a GPU node.
`--driver-cpus` / `--driver-gpus` change this for drivers that do work themselves.

Addresses are Ray Jobs (dashboard) URLs, e.g. `http://127.0.0.1:8265` after
`ray dashboard cluster.yaml`; the default is the RAY_ADDRESS environment variable.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baez_ray.config import ConfigError, JobSpec
from baez_ray.jobs import load_job

# runtime_env `excludes` (gitignore syntax, relative to the working dir). Ray also honours
# the project's .gitignore; these hold even where there is none.
DEFAULT_EXCLUDES = [
    ".venv/",
    ".venv-*/",
    "venv/",
    "runs/",
    ".git/",
    "__pycache__/",
    "*.pyc",
    ".pytest_cache/",
    ".mypy_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "cache/",
    ".cache/",
]

# Environment variables forwarded to the job (driver and every worker) when set here.
# API keys are not forwarded by default: runtime_env env vars are shown in the dashboard's
# job info. Set secrets on the cluster nodes, or forward them explicitly with --env NAME.
FORWARD_ENV = ("RAY_AUTH_MODE", "HF_HUB_OFFLINE")

DRIVER_NUM_CPUS = 1.0
DRIVER_NUM_GPUS = 0.0


class SubmitError(RuntimeError):
    """A submission that cannot be made or a cluster that cannot be reached."""


@dataclass
class Submission:
    """Everything sent to the Ray Jobs API for one job file."""

    spec: JobSpec
    working_dir: Path
    job_file: str  # relative to working_dir, POSIX separators
    entrypoint: str
    runtime_env: dict[str, Any]
    entrypoint_num_cpus: float
    entrypoint_num_gpus: float
    metadata: dict[str, str]
    warnings: list[str] = field(default_factory=list)


def project_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: cwd) holding a pyproject.toml,
    or `start` itself when there is none."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pyproject.toml").is_file():
            return d
    return here


def _env_vars(env: list[str] | None) -> dict[str, str]:
    out = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    for item in env or []:
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = v
        elif item in os.environ:
            out[item] = os.environ[item]
        else:
            raise SubmitError(f"--env {item}: not set in this environment (use --env {item}=VALUE)")
    return out


def plan_submission(
    job: str | Path,
    overrides: list[str] | None = None,
    *,
    working_dir: str | Path | None = None,
    out: str | None = None,
    env: list[str] | None = None,
    driver_cpus: float = DRIVER_NUM_CPUS,
    driver_gpus: float = DRIVER_NUM_GPUS,
    verbose: bool = False,
) -> Submission:
    """Validate `job` locally (ConfigError names the key) and build the submission."""
    overrides = list(overrides or [])
    spec = load_job(job, overrides)
    wd = Path(working_dir).resolve() if working_dir else project_root()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {wd}: not a directory")
    job_path = Path(job).resolve()
    try:
        rel = job_path.relative_to(wd).as_posix()
    except ValueError:
        raise SubmitError(
            f"{job}: the job file must be inside the directory shipped to the cluster ({wd}); "
            "move it there or pass --working-dir"
        ) from None

    cmd = ["python", "-m", "baez_ray.cli", "run", rel]
    for item in overrides:
        cmd += ["--set", item]
    if out:
        cmd += ["--out", out]
    if verbose:  # the driver on the cluster shows Ray's and the workers' output too
        cmd.append("--verbose")

    excludes, warnings = _excludes_and_warnings(spec, out)
    runtime_env: dict[str, Any] = {"working_dir": str(wd), "excludes": excludes}
    env_vars = _env_vars(env)
    if env_vars:
        runtime_env["env_vars"] = env_vars

    return Submission(
        spec=spec,
        working_dir=wd,
        job_file=rel,
        entrypoint=shlex.join(cmd),
        runtime_env=runtime_env,
        entrypoint_num_cpus=driver_cpus,
        entrypoint_num_gpus=driver_gpus,
        metadata={"baez_ray_job": spec.job, "baez_ray_name": spec.name, "baez_ray_job_file": rel},
        warnings=warnings,
    )


def _excludes_and_warnings(spec: JobSpec, out: str | None) -> tuple[list[str], list[str]]:
    """What runtime_env leaves out of the shipped tree (a relative run directory), and the
    warnings a user should see before submitting."""
    excludes = list(DEFAULT_EXCLUDES)
    warnings: list[str] = []
    out_dir = out or spec.out
    if not Path(out_dir).is_absolute():
        rel_out = Path(out_dir).as_posix().strip("/")
        if rel_out and rel_out != "." and not rel_out.startswith(".."):
            # a run directory inside the shipped tree would be uploaded by the next submit
            excludes.append(f"/{rel_out}/")
        warnings.append(
            f"run directory '{out_dir}' is relative: on the cluster it lands in the job's temporary "
            "working directory on whichever node runs the driver; use --out or --set out=PATH with "
            "storage every node shares (e.g. an EFS/NFS mount) to keep the results"
        )
    if spec.ray.address not in (None, "auto"):
        warnings.append(
            f"ray.address is '{spec.ray.address}': the driver will connect there, not to the cluster "
            "it was submitted to (leave ray.address unset or 'auto' for submitted jobs)"
        )
    return excludes, warnings


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return address


def client(address: str | None):
    """A JobSubmissionClient for `address` (default RAY_ADDRESS); SubmitError if unreachable."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


def submit(sub: Submission, address: str | None, submission_id: str | None = None) -> str:
    """Upload the working dir and start the job; returns the submission id."""
    c = client(address)
    try:
        return c.submit_job(
            entrypoint=sub.entrypoint,
            runtime_env=sub.runtime_env,
            metadata=sub.metadata,
            submission_id=submission_id,
            entrypoint_num_cpus=sub.entrypoint_num_cpus,
            entrypoint_num_gpus=sub.entrypoint_num_gpus,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"submission to {resolve_address(address)} failed: {e}") from None


async def _tail(c, submission_id: str) -> None:
    async for chunk in c.tail_job_logs(submission_id):
        print(chunk, end="", flush=True)


def follow(c, submission_id: str) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    import time

    asyncio.run(_tail(c, submission_id))
    while True:  # the log stream closes a moment before the status turns terminal
        status = c.get_job_status(submission_id)
        if status.is_terminal():
            return str(status)
        time.sleep(0.5)


def job_info(address: str | None, submission_id: str):
    c = client(address)
    try:
        return c, c.get_job_info(submission_id)
    except RuntimeError as e:
        raise SubmitError(f"{submission_id}: {e}") from None


def format_info(info) -> str:
    from datetime import datetime

    def ts(ms):
        return datetime.fromtimestamp(ms / 1000).isoformat(timespec="seconds") if ms else "-"

    lines = [
        f"submission_id: {info.submission_id}",
        f"status: {info.status}",
        f"message: {info.message or ''}",
        f"entrypoint: {info.entrypoint}",
        f"start_time: {ts(info.start_time)}",
        f"end_time: {ts(info.end_time)}",
    ]
    if getattr(info, "driver_exit_code", None) is not None:
        lines.append(f"driver_exit_code: {info.driver_exit_code}")
    if getattr(info, "error_type", None):
        lines.append(f"error_type: {info.error_type}")
    return "\n".join(lines)


# ---- CLI handlers (argparse namespaces from baez_ray.cli) ---------------------------------


def cmd_submit(args) -> int:
    try:
        sub = plan_submission(
            args.job, args.overrides, working_dir=args.working_dir, out=args.out, env=args.env,
            driver_cpus=args.driver_cpus, driver_gpus=args.driver_gpus, verbose=args.verbose,
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in sub.warnings:
        print(f"warning: {w}", file=sys.stderr)
    sid = submit(sub, args.address, args.submission_id)
    print(sid, flush=True)
    if args.no_wait:
        print(f"submitted: follow with `baez-ray logs {sid} --follow`", file=sys.stderr)
        return 0
    c = client(args.address)
    try:
        status = follow(c, sid)
    except KeyboardInterrupt:
        print(f"\nstill running on the cluster: `baez-ray stop {sid}` stops it", file=sys.stderr)
        return 130
    print(f"{sid}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    _, info = job_info(args.address, args.id)
    print(format_info(info))
    return 0


def cmd_logs(args) -> int:
    c, _ = job_info(args.address, args.id)  # 'no such job' as an error, not an empty log
    if args.follow:
        try:
            follow(c, args.id)
        except KeyboardInterrupt:
            return 130
    else:
        print(c.get_job_logs(args.id), end="")
    return 0


def cmd_stop(args) -> int:
    c, info = job_info(args.address, args.id)
    if info.status.is_terminal():
        print(f"{args.id}: already {info.status}")
        return 0
    c.stop_job(args.id)
    print(f"{args.id}: stop requested")
    return 0
