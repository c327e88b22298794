"""The `label` job: features (collected here, or a features table given) → route → label
each tier with its method → labels table and report.

    collect (or `features:`) ─▶ route ─▶ tier 1: token_freq / small_llm
                                       ├▶ tier 2: the frontier method (eleuther_acts_top5)
                                       └▶ tier 3: flagged for a human, with AV explanations
                                                  and a `baez` draft when an AV is configured
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from baez_ray import schema
from baez_ray.config import JobSpec
from baez_ray.run import Run, init_ray, log


def _subset(features_dir: Path, keys: set[tuple[str, int]]):
    ds = ray.data.read_parquet(str(features_dir))
    return ds.filter(lambda r: (r["sae_id"], r["feature"]) in keys)


def _with_route(labels: pa.Table, routes: pa.Table) -> pa.Table:
    """Fill `tier` and `kind` of label rows from the routes table."""
    if labels.num_rows == 0:
        return labels
    where = {(s, f): i for i, (s, f) in enumerate(zip(routes.column("sae_id").to_pylist(), routes.column("feature").to_pylist()))}
    idx = [where[(s, f)] for s, f in zip(labels.column("sae_id").to_pylist(), labels.column("feature").to_pylist())]
    labels = labels.set_column(labels.schema.get_field_index("tier"), "tier", routes.column("tier").take(pa.array(idx)))
    return labels.set_column(labels.schema.get_field_index("kind"), "kind", routes.column("kind").take(pa.array(idx)))


def label_job(spec: JobSpec, run: Run) -> None:
    from baez_ray.labelers.token_freq import token_freq_labels
    from baez_ray.stages.collect import collect_job, write_table
    from baez_ray.stages.label import label_baez, label_with_llm
    from baez_ray.stages.route import route

    cfg = spec.label
    if spec.features:
        features_dir = Path(spec.features)
        if not any(features_dir.glob("*.parquet")):
            raise FileNotFoundError(f"features {features_dir}: no Parquet parts (run collect or ingest first)")
    else:
        collect_job(spec, run)
        features_dir = run.table_dir("features")
    init_ray(spec)

    if not run.completed("route"):
        with run.stage("route") as info:
            info.update(route(features_dir, run.table_dir("routes"), spec.route))
    routes = pq.read_table(run.table_dir("routes"))
    # a feature needs a few examples to be labelled at all (dead or nearly dead features
    # stay in routes/ with their n_examples, and are counted, not labelled)
    live = pc.greater_equal(routes.column("n_examples"), cfg.min_examples)
    n_skipped = routes.num_rows - int(pc.sum(live).as_py() or 0)
    routes = routes.filter(live)
    if cfg.max_features:
        routes = routes.slice(0, cfg.max_features)
    tiers = routes.column("tier").to_numpy()
    keys = {t: {(s, f) for s, f, tt in zip(routes.column("sae_id").to_pylist(), routes.column("feature").to_pylist(), tiers) if tt == t} for t in (1, 2, 3)}

    if not run.completed("label"):
        with run.stage("label") as info:
            parts = []
            if keys[1]:
                log(f"[label] tier 1: {len(keys[1])} features with {cfg.tier1}")
                if cfg.tier1 == "token_freq":
                    feats = pq.read_table(features_dir, filters=[("feature", "in", sorted({f for _, f in keys[1]}))])
                    parts.append(token_freq_labels(feats, routes, tier=1))
                else:
                    parts.append(label_with_llm(_subset(features_dir, keys[1]), "small_llm", cfg.small_llm or cfg.explainer, cfg.max_retries))
            if keys[2]:
                log(f"[label] tier 2: {len(keys[2])} features with {cfg.tier2} ({cfg.explainer.backend}:{cfg.explainer.model})")
                parts.append(label_with_llm(_subset(features_dir, keys[2]), cfg.tier2, cfg.explainer, cfg.max_retries))
            if keys[3]:
                if cfg.av_sidecar:
                    log(f"[label] tier 3: {len(keys[3])} features flagged for manual labelling; AV explanations and a baez draft")
                    parts.append(label_baez(_subset(features_dir, keys[3]), cfg.av_sidecar, cfg.explainer, n_examples=cfg.av_examples,
                                            max_retries=cfg.max_retries, av=cfg.av.model_dump()))
                else:
                    rows = [{"sae_id": s, "layer": int(r), "feature": f, "method": "manual", "label": None, "n_examples": 0,
                             "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 0,
                             "error": "tier 3: flagged for manual labelling (no AV configured)"}
                            for s, f, r in zip(routes.column("sae_id").to_pylist(), routes.column("feature").to_pylist(), routes.column("layer").to_pylist())
                            if (s, f) in keys[3]]
                    parts.append(schema.conform(pa.Table.from_pylist(rows), schema.LABELS))
            labels = _with_route(pa.concat_tables([schema.conform(p, schema.LABELS) for p in parts]) if parts else schema.empty(schema.LABELS), routes)
            info["parts"] = write_table(labels, run.table_dir("labels"))
            info["features"] = labels.num_rows
            info["labelled"] = int(pc.sum(pc.is_valid(labels.column("label"))).as_py() or 0)
            info["failed"] = labels.num_rows - info["labelled"]
            info["by_tier"] = {str(t): len(keys[t]) for t in (1, 2, 3)}
            info["skipped_few_examples"] = n_skipped
            info["cost_usd"] = float(pc.sum(labels.column("cost_usd")).as_py() or 0.0)
            info["input_tokens"] = int(pc.sum(labels.column("input_tokens")).as_py() or 0)
            info["output_tokens"] = int(pc.sum(labels.column("output_tokens")).as_py() or 0)
            n2 = max(1, len(keys[2]))
            tier2 = labels.filter(pc.equal(labels.column("tier"), 2))
            per_feature = (pc.sum(tier2.column("input_tokens")).as_py() or 0) / n2 if tier2.num_rows else None
            if per_feature:
                # tokens the frontier method would have spent on the other tiers too
                info["tokens_saved_estimate"] = int(per_feature * (len(keys[1]) + len(keys[3])))
    run.manifest["labels_dir"] = str(run.table_dir("labels"))
    run.save()
    with run.stage("report") as info:
        from baez_ray.report.labels import write_label_report

        info["path"] = str(write_label_report(run.dir))
    log(f"report: {run.dir / 'report' / 'index.html'}")
