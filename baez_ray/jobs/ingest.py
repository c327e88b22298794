"""The `ingest` job: Neuronpedia bulk exports (one, or several model/source pairs) → the
features table (and rejects/, the lines that could not be used, with their reasons)."""

from __future__ import annotations

from baez_ray.config import JobSpec
from baez_ray.ray_pool import init_ray
from baez_ray.rundir import Run, log
from baez_ray.stages.ingest import ingest, source_files


def run_job(spec: JobSpec, run: Run) -> None:
    if run.completed("ingest"):
        log("[ingest] already done in this run directory: nothing to do")
        return
    with run.stage("ingest") as info:
        files = source_files(spec.ingest)  # a missing or empty export is an error before Ray starts
        init_ray(spec.ray)
        log(f"[ingest] {len(files)} files in {', '.join(sorted({s.path for s in spec.ingest.sources}))}")
        info.update(ingest(spec.ingest, files, run.table_dir("features"), run.table_dir("rejects")))
