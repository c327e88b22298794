"""The `label` job: features (collected here, or a features table given) → route → label
each tier with its method → [score a sample] → labels table and report.

    collect (or `features:`, or `ingest:`) ─▶ route ─▶ [residuals of the tier-3 features an
    AV drafts: stages/residuals.py] ─▶ label (stages/label.py: tier 1 cheap, tier 2 the
    frontier method, tier 3 flagged for a human with AV explanations and a draft)
    ─▶ [score: a seeded sample of the labels on held-out examples] ─▶ report

Without routing (`label.route: false`), route only counts each feature's examples (no
embedder; routes/ says tier 0, kind not_routed) and `label.method` labels every feature.
With `label.score`, the sample is planned when the label stage starts and, where the
scorer allows (stages/label_scores.py), scored with the labels as they come; the score
stage scores the rest (the random-label control, embeddings) and writes scores/. The API
clients start as soon as Ray is up, before the features are routed (`start_llms`).

Resume: each stage that finished is skipped; the label stage resumes inside itself from
its committed shards, and runs again while rows that failed in the LLM backend remain
(`label_needs_rerun`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq

from baez_ray import methods
from baez_ray.config import JobSpec
from baez_ray.jobs.collect import features_source
from baez_ray.ray_pool import remote
from baez_ray.report.labels import write_label_report
from baez_ray.rundir import Run, log, write_table
from baez_ray.schema import NOT_ROUTED_TIER
from baez_ray.stages.label import label_stage, select, start_llms
from baez_ray.stages.label_scores import finish_scores, plan_scores
from baez_ray.stages.route import not_routed, route


def run_job(spec: JobSpec, run: Run) -> None:
    import ray

    features_dir = features_source(spec, run)  # starts Ray (after a collect, when the job collects)
    start_llms(spec.label)
    if not run.completed("route"):
        with run.stage("route") as info:
            info.update((route if spec.label.route else not_routed)(features_dir, run.table_dir("routes"), spec.route))
    routes, keys, counts = select(pq.read_table(run.table_dir("routes")), spec.label)
    if av_needs_residuals(spec) and not run.completed("residuals"):
        with run.stage("residuals") as info:
            info.update(av_residuals(spec, run, features_dir, routes, keys[av_tier(spec)]))
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


def av_tier(spec: JobSpec) -> int:
    """The tier whose method may read an AV: tier 3, or every feature without routing."""
    return 3 if spec.label.route else NOT_ROUTED_TIER


def av_needs_residuals(spec: JobSpec) -> bool:
    """The residuals stage runs when that tier has an AV and its method reads the vectors
    at top examples (baez, baez_last; nla_direct reads decoder rows)."""
    cfg = spec.label
    name = cfg.tier3 if cfg.route else cfg.single_method
    return bool(cfg.av_sidecar or cfg.av_sidecars) and methods.needs_residuals([name])


def av_residuals(spec: JobSpec, run: Run, features_dir: Path, routes, todo: set) -> dict:
    """The residuals of the features the AV will draft (tier 3 after routing and
    max_per_tier), at the layers an AV reads: never the whole dictionary."""
    from baez_ray.av.sidecar import sidecars_by_layer
    from baez_ray.schema import key_table, rows_of
    from baez_ray.stages.residuals import contexts_of, for_av

    keys = routes.select(["sae_id", "feature", "layer"]).take(rows_of(routes, key_table(sorted(todo))))
    layers = sidecars_by_layer(spec.label.av_sidecar, spec.label.av_sidecars, "label")
    cfg = spec.label
    n = methods.examples_read(cfg.tier3 if cfg.route else cfg.single_method, cfg.av_examples)  # baez_kN reads N
    return for_av(features_dir, keys, layers, n, run.table_dir("residuals"), contexts_of(features_dir),
                  spec.model, spec.residuals, run.attempt)


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
