"""The `collect` job: corpus → contexts → features (top-k and decile examples, firing
counts) → logit lens (each feature's top promoted and suppressed tokens) → the features
report. Label and benchmark jobs run the same steps when they are not given a features
table (`features_source`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from baez_ray.config import JobSpec
from baez_ray.ray_pool import init_ray
from baez_ray.rundir import Run
from baez_ray.stages.collect import collect
from baez_ray.stages.logit_lens import logit_lens
from baez_ray.stages.merge import STATE_DIR


def collect_features(spec: JobSpec, run: Run) -> Path:
    """The stages `contexts` and `collect` (each skipped when an earlier attempt finished
    it; collect resumes from its snapshot); returns the features table's folder."""
    from baez_ray.data.corpus import write_contexts
    from baez_ray.models.lm import load_tokenizer

    tokenizer = load_tokenizer(spec.model)
    contexts_dir = run.table_dir("contexts")
    state_root = run.dir / STATE_DIR
    if not run.completed("contexts"):
        # an earlier attempt may have died while writing: start the table (and any merge
        # state, which belongs to the contexts written before) over
        shutil.rmtree(contexts_dir, ignore_errors=True)
        shutil.rmtree(state_root, ignore_errors=True)
        with run.stage("contexts") as info:
            # parts of a few batches each: Ray Data hands one part to an actor at a time, so
            # small parts spread the work over the actors and stream results to the merge
            info["contexts"] = write_contexts(spec.corpus, tokenizer, contexts_dir, rows_per_file=8 * spec.collect.batch_size)
            info["tokens"] = info["contexts"] * spec.corpus.context_len
    if not run.completed("collect"):
        init_ray(spec.ray)
        with run.stage("collect") as info:
            info.update(collect(contexts_dir, state_root, run.table_dir("features"), spec.model, spec.saes, spec.collect,
                                spec.seed, tokenizer, run.manifest["stages"]["contexts"]["tokens"]))
        shutil.rmtree(state_root, ignore_errors=True)  # the features table is committed now
    if spec.collect.logit_lens.enabled and not run.completed("logit_lens"):
        init_ray(spec.ray)
        with run.stage("logit_lens") as info:
            info.update(logit_lens(run.table_dir("features"), spec.model, spec.saes, spec.collect.logit_lens))
    return run.table_dir("features")


def features_report(run: Run, name: str) -> None:
    from baez_ray.report.features import write_features_report

    with run.stage("features_report") as info:
        info["path"] = str(write_features_report(run.dir, name=name))


def features_source(spec: JobSpec, run: Run) -> Path:
    """The features table a label or benchmark job reads: `features:` when given, else
    ingested in this run from the `ingest:` section's exports, else collected in this run
    (with the features page beside the job's report). Starts Ray."""
    if spec.features:
        features_dir = Path(spec.features)
        if not any(features_dir.glob("*.parquet")):
            raise FileNotFoundError(f"features {features_dir}: no Parquet parts (run collect or ingest first)")
    elif spec.ingest is not None:
        from baez_ray.jobs.ingest import ingest_features

        features_dir = ingest_features(spec, run)
    else:
        features_dir = collect_features(spec, run)
        features_report(run, "features.html")
    init_ray(spec.ray)
    return features_dir


def run_job(spec: JobSpec, run: Run) -> None:
    collect_features(spec, run)
    features_report(run, "index.html")
