"""The `benchmark` job (SPEC §5): compare labelling methods the way a labelling study does.

    features (collected here, or `features:`) ─▶ sample N features with ≥ M examples
      ─▶ split: train/ (what labellers read) and test/ (what scorers read), disjoint
      ─▶ route train/ (kinds for token_freq; tier shares for the report)
      ─▶ label train/ with every method (one stage per method; resume skips finished ones)
      ─▶ score every label on test/ with every benchmark + the random-label control
      ─▶ summary (mean and 95% CI per method × benchmark) ─▶ report/index.html
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from baez_ray import schema, splits
from baez_ray.config import JobSpec
from baez_ray.run import Run, log


def n_distinct_examples(examples: list[dict]) -> int:
    return len({splits.identity(e) for e in examples if e["value"] > 0})


def sample_and_split(features_dir: Path, spec: JobSpec) -> tuple[pa.Table, pa.Table, dict]:
    """(train table, test table, counts): N features with at least M distinct activating
    examples, sampled with the job's seed, their examples split into train and test."""
    b, sc = spec.benchmark, spec.score
    table = pq.read_table(features_dir)
    rows = table.to_pylist()
    need = max(b.min_examples, 2)
    eligible = [i for i, r in enumerate(rows) if n_distinct_examples(r["examples"]) >= need]
    if len(eligible) < 2:
        raise ValueError(f"{features_dir}: only {len(eligible)} features have >= {need} activating examples; "
                         "collect over more tokens or lower benchmark.min_examples")
    rng = np.random.default_rng(spec.seed)
    chosen = sorted(rng.choice(eligible, size=min(b.n_features, len(eligible)), replace=False).tolist())
    train_rows, test_rows = [], []
    for i in chosen:
        r = rows[i]
        train, test = splits.split_examples(r["examples"], sc.split, sc.train_examples, sc.test_examples,
                                            seed=splits.feature_seed(spec.seed, r["sae_id"], r["feature"]))
        train_rows.append({**r, "examples": splits.as_top(train)})
        test_rows.append({**r, "examples": test})
    train_t = schema.conform(pa.Table.from_pylist(train_rows, schema=table.schema), schema.FEATURES)
    test_t = schema.conform(pa.Table.from_pylist(test_rows, schema=table.schema), schema.FEATURES)
    return train_t, test_t, {"eligible": len(eligible), "sampled": len(chosen), "min_examples": need, "split": sc.split}


def label_method(method: str, train_dir: Path, routes_dir: Path, spec: JobSpec) -> pa.Table:
    """Labels of every feature in train/ by one method (LABELS rows)."""
    from baez_ray.stages import label as lab

    b, sc = spec.benchmark, spec.score
    if method == "token_freq":
        from baez_ray.labelers.token_freq import token_freq_labels

        return token_freq_labels(pq.read_table(train_dir), pq.read_table(routes_dir), tier=None)
    ds = ray.data.read_parquet(str(train_dir))
    if method in ("baez", "baez_last", "nla_direct"):
        if not b.av_sidecar:
            raise ValueError(f"method {method} needs benchmark.av_sidecar (an activation verbalizer)")
        if method == "nla_direct":
            return lab.label_nla_direct(ds, b.av_sidecar, spec.sae, b.explainer, av=b.av.model_dump())
        return lab.label_baez(ds, b.av_sidecar, b.explainer, last_only=method == "baez_last", n_examples=sc.train_examples,
                              max_retries=spec.label.max_retries if spec.label else 2, av=b.av.model_dump())
    return lab.label_with_llm(ds, method, b.explainer)


def benchmark_job(spec: JobSpec, run: Run) -> None:
    from baez_ray.config import ScoreConfig
    from baez_ray.stages.collect import write_table
    from baez_ray.stages.label_job import features_source
    from baez_ray.stages.route import route
    from baez_ray.stages.score import score_labels

    if spec.score is None:  # scoring defaults
        spec = spec.model_copy(update={"score": ScoreConfig()})
    b, sc = spec.benchmark, spec.score
    features_dir = features_source(spec, run)
    train_dir, test_dir = run.table_dir("train"), run.table_dir("test")

    if not run.completed("split"):
        with run.stage("split") as info:
            train, test, counts = sample_and_split(features_dir, spec)
            write_table(train, train_dir)
            write_table(test, test_dir)
            info.update(counts)
    if not run.completed("route"):
        with run.stage("route") as info:
            info.update(route(train_dir, run.table_dir("routes"), spec.route))

    labels_dir = run.table_dir("labels")
    labels_dir.mkdir(exist_ok=True)
    for method in b.methods:
        stage = f"label:{method}"
        if run.completed(stage):
            continue
        with run.stage(stage) as info:
            labels = label_method(method, train_dir, run.table_dir("routes"), spec)
            labels = schema.conform(labels, schema.LABELS)
            tmp = labels_dir / f".{method}.parquet.tmp"
            pq.write_table(labels, tmp)
            tmp.rename(labels_dir / f"{method}.parquet")
            info["labelled"] = int(labels.column("label").is_valid().to_numpy(zero_copy_only=False).sum())
            info["failed"] = labels.num_rows - info["labelled"]
            info["input_tokens"] = int(sum(labels.column("input_tokens").to_pylist()))
            info["output_tokens"] = int(sum(labels.column("output_tokens").to_pylist()))
            info["cost_usd"] = float(sum(labels.column("cost_usd").to_pylist()))

    if not run.completed("score"):
        with run.stage("score") as info:
            labels = pa.concat_tables([pq.read_table(labels_dir / f"{m}.parquet") for m in b.methods])
            tests = {(r["sae_id"], r["feature"]): r["examples"] for r in pq.read_table(test_dir, columns=["sae_id", "feature", "examples"]).to_pylist()}
            scorer = sc.scorer or b.explainer
            negatives = None
            if sc.negatives == "corpus":
                from baez_ray.stages.negatives import corpus_negatives

                negatives = corpus_negatives(spec, run, sorted(tests), sc.n_negatives, spec.seed)
            scores, counts = score_labels(tests, labels, sc, scorer, seed=spec.seed, negatives=negatives)
            info.update(counts)
            info["parts"] = write_table(scores, run.table_dir("scores"))
            info["rows"] = scores.num_rows
    summarise(run)
    with run.stage("report") as info:
        from baez_ray.report.benchmark import write_benchmark_report

        info["path"] = str(write_benchmark_report(run.dir))
    log(f"report: {run.dir / 'report' / 'index.html'}")


def summarise(run: Run) -> None:
    """summary.parquet (mean, 95% CI, failure rate per method × benchmark) and its copy in
    the manifest."""
    from baez_ray.metrics import aggregate

    scores = pq.read_table(run.table_dir("scores"))
    summary = aggregate(scores, seed=run.spec.seed)
    pq.write_table(pa.Table.from_pandas(summary, preserve_index=False), run.dir / "summary.parquet")
    run.manifest["summary"] = summary.round(4).to_dict(orient="records")
    run.save()
