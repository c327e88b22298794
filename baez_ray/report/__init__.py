"""Reports: tables → numbers, PNG plots and HTML pieces (one module per stage)."""

from pathlib import Path


def render(run_dir: str | Path) -> Path:
    """Re-render report/index.html of a finished run from its tables (the job kind is read
    from the run's manifest)."""
    import json

    run_dir = Path(run_dir)
    manifest = run_dir / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{run_dir}: no manifest.json (not a run directory)")
    job = json.loads(manifest.read_text()).get("job")
    if job == "benchmark":
        from baez_ray.report.benchmark import write_benchmark_report

        return write_benchmark_report(run_dir)
    if job == "label":
        from baez_ray.report.labels import write_label_report

        return write_label_report(run_dir)
    if job == "collect":
        from baez_ray.report.features import write_features_report

        return write_features_report(run_dir)
    raise ValueError(f"{run_dir}: a '{job}' run has no report")
