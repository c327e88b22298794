"""The `benchmark` job (SPEC §5): compare labelling methods the way a labelling study does.

    features (collected here, `features:`, or ingested here: `ingest:`) ─▶ sample N features
      with ≥ M examples
      ─▶ split: train/ (what labellers read) and test/ (what scorers read), disjoint
      ─▶ route train/ (kinds for token_freq; tier shares for the report)
    (or, with stratify: tier, ─▶ stratify: route a seeded pool of the eligible features on
     their train examples → routes/, sample N per tier → train/, test/)
      ─▶ [residuals of train/'s examples at the layers an AV reads, when an AV method runs]
      ─▶ label train/ with every method (one stage per method; resume skips finished ones)
      ─▶ score every label on test/ with every benchmark + the random-label control (the
         intervention benchmarks' steered continuations in steering/)
      ─▶ summary (mean and 95% CI per method × benchmark), split-half reliability per
         benchmark × method, paired comparisons of the methods, each pooled and per tier
         (and kind within tier 1); the routing verdict (verdict.py) ─▶ report/index.html
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from baez_ray import methods, schema
from baez_ray.config import JobSpec
from baez_ray.jobs.collect import features_source
from baez_ray.rundir import Run, log, write_table
from baez_ray.stages.label import method_context
from baez_ray.stages.route import route
from baez_ray.stages.split import sample_and_split


def label_method(spec: JobSpec, run: Run, method: str, train_dir: Path, labels_dir: Path) -> dict:
    """Labels of every feature in train/ by one method → labels/<method>.parquet; counts."""
    import ray

    labels = methods.label(method, ray.data.read_parquet(str(train_dir)),
                           method_context(method, spec.benchmark, tuple(spec.saes), spec.route, run.table_dir("routes"),
                                          run.table_dir("residuals")))
    labels = schema.conform(labels, schema.LABELS)
    tmp = labels_dir / f".{method}.parquet.tmp"
    pq.write_table(labels, tmp)
    tmp.rename(labels_dir / f"{method}.parquet")
    labelled = int(labels.column("label").is_valid().to_numpy(zero_copy_only=False).sum())
    return {"labelled": labelled, "failed": labels.num_rows - labelled,
            "input_tokens": int(sum(labels.column("input_tokens").to_pylist())),
            "output_tokens": int(sum(labels.column("output_tokens").to_pylist())),
            "cost_usd": float(sum(labels.column("cost_usd").to_pylist()))}


def train_needs_residuals(spec: JobSpec) -> bool:
    """The residuals stage runs when an AV is configured and a method reads the vectors at
    top examples (baez, baez_last)."""
    b = spec.benchmark
    return bool(b.av_sidecar or b.av_sidecars) and methods.needs_residuals(b.methods)


def train_residuals(spec: JobSpec, run: Run, features_dir: Path, train_dir: Path) -> dict:
    """The residuals of the sampled features' train examples (what the AV methods read),
    at the layers an AV reads; a collected example reads its whole corpus context."""
    from baez_ray.av.sidecar import sidecars_by_layer
    from baez_ray.stages.residuals import contexts_of, for_av

    b = spec.benchmark
    keys = pq.read_table(train_dir, columns=["sae_id", "feature", "layer"])
    return for_av(train_dir, keys, sidecars_by_layer(b.av_sidecar, b.av_sidecars, "benchmark"), b.train_examples,
                  run.table_dir("residuals"), contexts_of(features_dir), spec.model, spec.residuals, run.attempt)


def score_stage(spec: JobSpec, run: Run, labels_dir: Path, test_dir: Path) -> dict:
    """Every label on test/ with every benchmark + the random-label control → scores/."""
    import ray

    from baez_ray.stages.score import score_labels

    b, sc = spec.benchmark, spec.benchmark.score
    labels = pa.concat_tables([pq.read_table(labels_dir / f"{m}.parquet") for m in b.methods])
    # the driver reads the keys; the test examples stream from test/ through the workers
    keys = pq.read_table(test_dir, columns=["sae_id", "feature"])
    tests = ray.data.read_parquet(str(test_dir)).select_columns(["sae_id", "feature", "examples", "pos_tokens", "pos_values"])
    negatives = None
    if sc.negatives == "corpus":
        from baez_ray.stages.negatives import corpus_negatives_ref

        negatives = corpus_negatives_ref(run.table_dir("contexts"), spec.model, spec.saes, spec.corpus, spec.collect.window,
                                     spec.collect.batch_size, sorted(zip(keys.column("sae_id").to_pylist(), keys.column("feature").to_pylist())),
                                     sc.n_negatives, spec.seed)
    steering = run.table_dir("steering")
    shutil.rmtree(steering, ignore_errors=True)  # a rerun of the stage writes it anew
    scores, counts = score_labels(tests, keys, labels, sc, sc.scorer or b.explainer, seed=spec.seed, negatives_table=negatives,
                                  model=spec.model, saes=spec.saes, steering_dir=steering)
    return {**counts, "parts": write_table(scores, run.table_dir("scores")), "rows": scores.num_rows}


def run_job(spec: JobSpec, run: Run) -> None:
    b = spec.benchmark
    features_dir = features_source(spec, run)
    train_dir, test_dir, labels_dir = run.table_dir("train"), run.table_dir("test"), run.table_dir("labels")
    if b.stratify == "tier":
        stratify_stage(spec, run, features_dir)
    else:
        if not run.completed("split"):
            with run.stage("split") as info:
                train, test, counts = sample_and_split(features_dir, b.n_features, b.min_examples, b.split, b.train_examples,
                                                       b.score.test_examples, spec.seed)
                write_table(train, train_dir)
                write_table(test, test_dir)
                info.update(counts)
        if not run.completed("route"):
            with run.stage("route") as info:
                info.update(route(train_dir, run.table_dir("routes"), spec.route))
    if train_needs_residuals(spec) and not run.completed("residuals"):
        with run.stage("residuals") as info:
            info.update(train_residuals(spec, run, features_dir, train_dir))
    labels_dir.mkdir(exist_ok=True)
    for method in b.methods:
        if not run.completed(f"label:{method}"):
            with run.stage(f"label:{method}") as info:
                info.update(label_method(spec, run, method, train_dir, labels_dir))
    if not run.completed("score"):
        with run.stage("score") as info:
            info.update(score_stage(spec, run, labels_dir, test_dir))
    summarise(run)
    with run.stage("report") as info:
        from baez_ray.report.benchmark import write_benchmark_report

        info["path"] = str(write_benchmark_report(run.dir))
    log(f"report: {run.dir / 'report' / 'index.html'}")


def stratify_stage(spec: JobSpec, run: Run, features_dir: Path) -> None:
    """`benchmark.stratify: tier`: a seeded pool of the eligible features routed on their
    train examples → routes/, then n_features per tier and SAE → train/, test/
    (stages/stratify.py)."""
    from baez_ray.stages.stratify import stratified_sample

    b = spec.benchmark
    if run.completed("stratify"):
        return
    with run.stage("stratify") as info:
        train, test, routes, counts = stratified_sample(features_dir, b.n_features, b.min_examples, b.split, b.train_examples,
                                                        b.score.test_examples, spec.seed, spec.route, b.stratify_max_routed)
        write_table(routes, run.table_dir("routes"))
        write_table(train, run.table_dir("train"))
        write_table(test, run.table_dir("test"))
        info.update(counts)
        for line in counts["short"]:
            log(f"[stratify] {line}")


def summarise(run: Run) -> None:
    """summary.parquet (mean, 95% CI, failure rate per method × benchmark), reliability.parquet
    (split-half reliability per benchmark × method), comparisons.parquet (every method
    against the control and each other: paired difference, CI, p, Holm), and their copies
    in the manifest (metrics.py documents the statistics)."""
    from baez_ray.metrics import aggregate, comparison_table, reliability_table

    scores = pq.read_table(run.table_dir("scores"))
    summary = aggregate(scores, seed=run.spec.seed)
    reliability = reliability_table(scores, seed=run.spec.seed)
    comparisons = comparison_table(scores, reliability, seed=run.spec.seed)
    for name, df in (("summary", summary), ("reliability", reliability), ("comparisons", comparisons)):
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), run.dir / f"{name}.parquet")
    run.manifest["summary"] = summary.round(4).to_dict(orient="records")
    for name, df in (("reliability", reliability), ("comparisons", comparisons)):  # NaN → null, numpy bools → JSON
        run.manifest[name] = json.loads(df.round(4).to_json(orient="records"))
    summarise_tiers(run, scores.to_pandas(), reliability)
    run.save()


def summarise_tiers(run: Run, scores, reliability) -> None:
    """summary_by_tier.parquet, reliability_by_tier.parquet, comparisons_by_tier.parquet (the
    statistics per stratum: pooled, tier 1, its kinds, tier 2, tier 3) and verdict.parquet
    (the routing verdict, also in the manifest); verdict.py documents them."""
    from baez_ray.verdict import run_tables

    tables = run_tables(run.dir, run.manifest, scores=scores, reliability=reliability, seed=run.spec.seed)
    for name, df in tables.items():
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), run.dir / f"{name}.parquet")
    if "verdict" in tables:
        run.manifest["verdict"] = json.loads(tables["verdict"].round(6).to_json(orient="records"))
