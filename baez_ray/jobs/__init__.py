"""Jobs: the order of stages, resume, manifest counts; nothing else.

    collect    contexts ─▶ collect ─▶ features report
    ingest     Neuronpedia export ─▶ features
    label      features (collected or given) ─▶ route ─▶ label by tier ─▶ [score a sample] ─▶ report
    benchmark  features ─▶ split ─▶ route ─▶ label with every method ─▶ score ─▶ summary ─▶ report

`load_job` reads and validates a job file, checking the method names against the registry
(`baez_ray.methods`); `execute` runs a job in its run directory.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from baez_ray.config import ConfigError, JobSpec, parse_job
from baez_ray.rundir import Run, log


def load_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """A job file, validated: its schema (config.py) and its method names (the registry)."""
    from baez_ray.methods import check_job_methods

    spec = parse_job(path, overrides)
    problems = check_job_methods(spec)
    if problems:
        raise ConfigError("\n".join([f"{path}: invalid job file"] + [f"  key '{k}': {msg}" for k, msg in problems]))
    return spec


def execute(spec: JobSpec, out: str | Path | None = None) -> Run:
    """Run a job to completion and return its Run. A model that several of its stages or
    rounds call is loaded once (`ray_pool.kept_pools`)."""
    from baez_ray.ray_pool import kept_pools

    run = Run(spec, out)
    log(f"run {spec.name} ({spec.job}) → {run.dir}")
    with kept_pools():
        import_module(f"baez_ray.jobs.{spec.job}").run_job(spec, run)
    run.finish()
    log(f"run finished: {run.dir}")
    return run


def failures(manifest: dict) -> tuple[list[str], bool]:
    """What failed in a run that finished (empty: every row succeeded): label rows without
    a label after their tries (LLM failures, unparsed answers), scorer prompts that failed,
    a scoring stage that scored nothing; and whether rerunning the same command retries
    some of them (label rows that failed in the LLM backend). The CLI exits EXIT_PARTIAL
    when there is any."""
    out, retryable = [], False
    for name, info in manifest.get("stages", {}).items():
        if name == "label" and info.get("llm_failed"):
            n_backend = info.get("backend_failed", 0)
            out.append(f"label: {info['llm_failed']} of {info.get('features', 0)} features got no label "
                       f"({n_backend} failed in the LLM backend, {info['llm_failed'] - n_backend} answers could not be parsed)")
            retryable |= n_backend > 0
        elif name.startswith("label:") and info.get("failed"):
            out.append(f"{name}: {info['failed']} features got no label")
        elif name == "score":
            if info.get("failed_prompts"):
                out.append(f"score: {info['failed_prompts']} of {info.get('prompts', 0)} scorer prompts failed")
            if not info.get("rows"):
                out.append("score: no label was scored")
    return out, retryable
