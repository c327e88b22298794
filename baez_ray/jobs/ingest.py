"""The `ingest` job: a Neuronpedia bulk export → the features table (and rejects/, the
lines that could not be used, with their reasons)."""

from __future__ import annotations

from pathlib import Path

from baez_ray.config import JobSpec
from baez_ray.ray_pool import init_ray
from baez_ray.rundir import Run, log
from baez_ray.stages.ingest import export_files, ingest


def run_job(spec: JobSpec, run: Run) -> None:
    if run.completed("ingest"):
        log("[ingest] already done in this run directory: nothing to do")
        return
    with run.stage("ingest") as info:
        root = Path(spec.ingest.path).expanduser().resolve()
        files = export_files(root)  # a missing or empty export is an error before Ray starts
        init_ray(spec.ray)
        log(f"[ingest] {len(files)} files in {root}")
        info.update(ingest(spec.ingest, files, run.table_dir("features"), run.table_dir("rejects")))
