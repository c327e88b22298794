"""The `ingest` job: Neuronpedia bulk exports (one, or several model/source pairs) → the
features table (and rejects/, the lines that could not be used, with their reasons). A
label or benchmark job with an `ingest:` section runs the same stage first
(`ingest_features`). Token strings become ids later, in the residuals stage, which has
the model's tokenizer (an ingest job has no model)."""

from __future__ import annotations

from pathlib import Path

from baez_ray.config import JobSpec
from baez_ray.ray_pool import init_ray
from baez_ray.rundir import Run, log
from baez_ray.stages.ingest import ingest, source_files


def run_job(spec: JobSpec, run: Run) -> None:
    if run.completed("ingest"):
        log("[ingest] already done in this run directory: nothing to do")
        return
    ingest_features(spec, run)


def ingest_features(spec: JobSpec, run: Run) -> Path:
    """The stage `ingest` (skipped when an earlier attempt finished it): the `ingest:`
    section's exports → features/ and rejects/ of this run; returns the features folder.
    A label or benchmark job with an `ingest:` section reads its features from here."""
    if not run.completed("ingest"):
        with run.stage("ingest") as info:
            files = source_files(spec.ingest)  # a missing or empty export is an error before Ray starts
            init_ray(spec.ray)
            log(f"[ingest] {len(files)} files in {', '.join(sorted({s.path for s in spec.ingest.sources}))}")
            info.update(ingest(spec.ingest, files, run.table_dir("features"), run.table_dir("rejects")))
    return run.table_dir("features")
