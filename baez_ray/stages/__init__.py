"""Jobs and their stages. Each job is a function `(spec, run) -> None` that runs its
stages in order; each stage is a Ray Data transform over Parquet tables (see schema.py)."""

from __future__ import annotations


def _collect(spec, run):
    from baez_ray.stages.collect import collect_job

    collect_job(spec, run)


def _ingest(spec, run):
    from baez_ray.stages.ingest import ingest_job

    ingest_job(spec, run)


def _label(spec, run):
    from baez_ray.stages.label_job import label_job

    label_job(spec, run)


def _benchmark(spec, run):
    from baez_ray.stages.benchmark_job import benchmark_job

    benchmark_job(spec, run)


JOBS = {"collect": _collect, "ingest": _ingest, "label": _label, "benchmark": _benchmark}
