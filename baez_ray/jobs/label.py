"""The `label` job: features (collected here, or a features table given) → route → label
each tier with its method → [score a sample] → labels table and report.

    collect (or `features:`) ─▶ route ─▶ label (stages/label.py: tier 1 cheap, tier 2 the
    frontier method, tier 3 flagged for a human with AV explanations and a draft)
    ─▶ [score: a seeded sample of the labels on held-out examples] ─▶ report

Without routing (`label.route: false`), route only counts each feature's examples (no
embedder; routes/ says tier 0, kind not_routed) and `label.method` labels every feature.
With `label.score`, the sample is planned when the label stage starts and, where the
scorer allows (stages/label_scores.py), scored with the labels as they come; the score
stage scores the rest (the random-label control, embeddings) and writes scores/. The API
clients start before the features are read (`start_llms`).

Resume: each stage that finished is skipped; the label stage resumes inside itself from
its committed shards, and runs again while rows that failed in the LLM backend remain
(`label_needs_rerun`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq

from baez_ray.config import JobSpec
from baez_ray.jobs.collect import features_source
from baez_ray.ray_pool import remote
from baez_ray.report.labels import write_label_report
from baez_ray.rundir import Run, log, write_table
from baez_ray.stages.label import label_stage, select, start_llms
from baez_ray.stages.label_scores import finish_scores, plan_scores
from baez_ray.stages.route import not_routed, route


def run_job(spec: JobSpec, run: Run) -> None:
    import ray

    start_llms(spec.label)
    features_dir = features_source(spec, run)
    if not run.completed("route"):
        with run.stage("route") as info:
            info.update((route if spec.label.route else not_routed)(features_dir, run.table_dir("routes"), spec.route))
    routes, keys, counts = select(pq.read_table(run.table_dir("routes")), spec.label)
    scoring = spec.label.score is not None and not run.completed("score")
    plan = None
    if label_needs_rerun(run):
        with run.stage("label") as info:
            plan = plan_scores(spec.label, spec.seed, run, features_dir, keys) if scoring else None
            info.update(label_stage(spec.label, tuple(spec.saes), spec.route, run, features_dir, routes, keys, scores=plan), **counts)
            if info["backend_failed"]:
                log(f"[label] {info['backend_failed']} features failed in the LLM backend (their error is in labels/); "
                    "run the same command again to retry only those")
    run.manifest["labels_dir"] = str(run.table_dir("labels"))
    run.save()
    if scoring:
        with run.stage("score") as info:
            info.update(score_sample(spec, run, features_dir, keys, plan))
    with run.stage("report") as info:
        # a Ray task: the tables (routes, labels, scores) and their statistics are read in a
        # worker, not in the driver (a task of report.labels: its worker need not import torch)
        info["path"] = str(ray.get(remote(write_label_report).remote(str(run.dir))))
    log(f"report: {run.dir / 'report' / 'index.html'}")


def label_needs_rerun(run: Run) -> bool:
    """The label stage runs when no attempt finished it, and again while some of its rows
    failed in the LLM backend (a rerun retries exactly those)."""
    prev = run.manifest["stages"].get("label") or {}
    return bool(prev.get("backend_failed")) or not run.completed("label")


def score_sample(spec: JobSpec, run: Run, features_dir: Path, keys: dict[int, set], plan=None) -> dict:
    """`label.score`: the sample's scores streamed with the labels, and the rest scored now
    (stages/label_scores.py), on held-out examples (the decile samples no labeller read)."""
    cfg = spec.label.score
    negatives = None
    if cfg.negatives == "corpus":
        from baez_ray.stages.label_scores import saved_sample
        from baez_ray.stages.negatives import corpus_negatives_ref

        sample = plan.keys if plan is not None else saved_sample(spec.label, spec.seed, run, features_dir, keys)
        key_list = list(zip(sample.column("sae_id").to_pylist(), sample.column("feature").to_pylist()))
        negatives = corpus_negatives_ref(run.table_dir("contexts"), spec.model, spec.saes, spec.corpus, spec.collect.window,
                                         spec.collect.batch_size, key_list, cfg.n_negatives, spec.seed)
    steering = run.table_dir("steering")  # the intervention benchmarks' continuations
    shutil.rmtree(steering, ignore_errors=True)
    scores, info = finish_scores(spec.label, spec.seed, run, features_dir, keys, plan, negatives=negatives, model=spec.model,
                                 saes=spec.saes, steering_dir=steering)
    info.update(parts=write_table(scores, run.table_dir("scores")), rows=scores.num_rows, **(plan.counts if plan is not None else {}))
    return info
