"""The `label` job: features (collected here, or a features table given) → route → label
each tier with its method → labels table and report.

    collect (or `features:`) ─▶ route ─▶ tier 1: token_freq / small_llm
                                       ├▶ tier 2: the frontier method (eleuther_acts_top5)
                                       └▶ tier 3: flagged for a human, with AV explanations
                                                  and a draft when an AV is configured
                                                  (label.tier3: baez | baez_last | nla_direct)

Resume: the label stage works through each tier in shards of features and commits every
shard (a Parquet part, then its marker) to `label_shards/` as soon as it is labelled. A
rerun of the same command labels only the features without a committed row, plus those
whose row failed in the LLM backend (`backend_failed`); `labels/` is then rebuilt from the
committed rows, exactly one per (feature, method).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from baez_ray import schema
from baez_ray.config import JobSpec
from baez_ray.run import Run, init_ray, log, write_json_atomic, write_parquet_atomic

SUBSET_BLOCK = 64  # features per Ray Data block of a subset (blocks spread over the actors)


def _subset(features_dir: Path, keys: set[tuple[str, int]]):
    """The FEATURES rows of `keys` as a Ray Dataset. Read on the driver with a filter on
    `feature` (Parquet row-group statistics skip the rest of a big table: a shard of
    features does not scan the whole table), in blocks of SUBSET_BLOCK rows."""
    feats = sorted({f for _, f in keys})
    table = pq.read_table(features_dir, filters=[("feature", "in", feats)]) if feats else schema.empty(schema.FEATURES)
    mask = [(s, f) in keys for s, f in zip(table.column("sae_id").to_pylist(), table.column("feature").to_pylist())]
    table = table.filter(pa.array(mask, pa.bool_())).combine_chunks()
    blocks = [table.slice(i, SUBSET_BLOCK) for i in range(0, table.num_rows, SUBSET_BLOCK)] or [table]
    return ray.data.from_arrow(blocks)


# ---- resume inside the label stage --------------------------------------------------------

SHARD_DIR = "label_shards"


def shard_size(n_todo: int, fixed: int | None = None) -> int:
    """Features per committed shard: `label.shard_features`, else about 1/64 of the tier's
    work, within [256, 8192]. Each shard is one pass through the labelling method (its
    actors start once per shard), so shards trade start-up cost against the work a crash
    can lose."""
    if fixed:
        return fixed
    return min(8192, max(256, math.ceil(n_todo / 64)))


def backend_failed(labels: pa.Table) -> np.ndarray:
    """Rows whose last try failed in the LLM backend (after the backend's own retries: an
    outage, a rate limit, a dropped connection): no label and no answer at all. A rerun
    retries exactly these. An answer that came back but could not be parsed (raw set),
    a tier-3 row for a human or a row without AV evidence (tries 0) is final."""
    if labels.num_rows == 0:
        return np.zeros(0, bool)
    no_label = pc.is_null(labels.column("label")).to_numpy(zero_copy_only=False)
    no_raw = pc.is_null(labels.column("raw")).to_numpy(zero_copy_only=False)
    tried = pc.greater(labels.column("tries"), 0).to_numpy(zero_copy_only=False)
    return no_label & no_raw & tried


class LabelShards:
    """Committed shards of the label stage in `<run>/label_shards/`: per shard of features
    a Parquet part of LABELS rows `aAAAAA-tT-NNNNN.parquet` (attempt, tier, shard) and then
    its commit marker `….done`, each written to a temp name and renamed. A part without
    its marker (the run died in between) does not count and is removed."""

    def __init__(self, root: Path, attempt: int):
        self.root, self.attempt, self.n = root, attempt, 0
        root.mkdir(parents=True, exist_ok=True)
        for f in root.iterdir():
            if f.name.startswith(".") or (f.suffix == ".parquet" and not f.with_suffix(".done").exists()):
                f.unlink()
        self.n = len(list(root.glob(f"a{attempt:05d}-*.done")))

    def committed(self) -> pa.Table:
        """Every committed row, the latest per (sae_id, feature, method): a feature
        relabelled by a later attempt (a backend failure retried) replaces its old row."""
        parts = [pq.read_table(m.with_suffix(".parquet")) for m in sorted(self.root.glob("*.done"))]
        table = pa.concat_tables([schema.conform(t, schema.LABELS) for t in parts]) if parts else schema.empty(schema.LABELS)
        last: dict[tuple, int] = {}
        for i, k in enumerate(zip(*(table.column(c).to_pylist() for c in ("sae_id", "feature", "method")))):
            last[k] = i
        return table.take(pa.array(sorted(last.values()), pa.int64())) if len(last) < table.num_rows else table

    def commit(self, tier: int, labels: pa.Table) -> None:
        name = f"a{self.attempt:05d}-t{tier}-{self.n:05d}"
        write_parquet_atomic(labels, self.root / f"{name}.parquet")
        write_json_atomic({"attempt": self.attempt, "tier": tier, "rows": labels.num_rows,
                           "backend_failed": int(backend_failed(labels).sum())}, self.root / f"{name}.done")
        self.n += 1


def _keys(t: pa.Table) -> list[tuple[str, int]]:
    return list(zip(t.column("sae_id").to_pylist(), t.column("feature").to_pylist()))


def _with_route(labels: pa.Table, routes: pa.Table) -> pa.Table:
    """Fill `tier` and `kind` of label rows from the routes table."""
    if labels.num_rows == 0:
        return labels
    where = {(s, f): i for i, (s, f) in enumerate(zip(routes.column("sae_id").to_pylist(), routes.column("feature").to_pylist()))}
    idx = [where[(s, f)] for s, f in zip(labels.column("sae_id").to_pylist(), labels.column("feature").to_pylist())]
    labels = labels.set_column(labels.schema.get_field_index("tier"), "tier", routes.column("tier").take(pa.array(idx)))
    return labels.set_column(labels.schema.get_field_index("kind"), "kind", routes.column("kind").take(pa.array(idx)))


def features_source(spec: JobSpec, run: Run) -> Path:
    """The features table a label or benchmark job reads: `features:` when given, else
    collected in this run (collect resumes or skips when done). Starts Ray."""
    from baez_ray.stages.collect import collect_job

    if spec.features:
        features_dir = Path(spec.features)
        if not any(features_dir.glob("*.parquet")):
            raise FileNotFoundError(f"features {features_dir}: no Parquet parts (run collect or ingest first)")
    else:
        collect_job(spec, run)
        features_dir = run.table_dir("features")
    init_ray(spec)
    return features_dir


def label_job(spec: JobSpec, run: Run) -> None:
    from baez_ray.labelers.token_freq import token_freq_labels
    from baez_ray.stages.collect import write_table
    from baez_ray.stages.label import label_baez, label_nla_direct, label_with_llm
    from baez_ray.stages.route import route

    cfg = spec.label
    features_dir = features_source(spec, run)

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
    n_capped = 0
    if cfg.max_per_tier:
        seen: dict[int, int] = {}
        keep = []
        for t in routes.column("tier").to_pylist():
            seen[t] = seen.get(t, 0) + 1
            keep.append(cfg.max_per_tier.get(t) is None or seen[t] <= cfg.max_per_tier[t])
        n_capped = keep.count(False)
        routes = routes.filter(pa.array(keep, pa.bool_()))
    tiers = routes.column("tier").to_numpy()
    keys = {t: {(s, f) for s, f, tt in zip(routes.column("sae_id").to_pylist(), routes.column("feature").to_pylist(), tiers) if tt == t} for t in (1, 2, 3)}

    def label_tier(t: int, chunk: set[tuple[str, int]]) -> pa.Table:
        """LABELS rows of the features `chunk` of tier `t` (one shard)."""
        parts = []
        if t == 1:
            log(f"[label] tier 1: {len(chunk)} features with {cfg.tier1}")
            if cfg.tier1 == "token_freq":
                feats = pq.read_table(features_dir, filters=[("feature", "in", sorted({f for _, f in chunk}))])
                feats = feats.filter(pa.array([k in chunk for k in _keys(feats)], pa.bool_()))  # other SAEs' rows
                parts.append(token_freq_labels(feats, routes, tier=1))
            else:
                parts.append(label_with_llm(_subset(features_dir, chunk), "small_llm", cfg.small_llm or cfg.explainer, cfg.max_retries))
        if t == 2:
            log(f"[label] tier 2: {len(chunk)} features with {cfg.tier2} ({cfg.explainer.backend}:{cfg.explainer.model})")
            parts.append(label_with_llm(_subset(features_dir, chunk), cfg.tier2, cfg.explainer, cfg.max_retries))
        if t == 3:
            if cfg.av_sidecar and cfg.tier3 == "nla_direct":
                if spec.sae is None:
                    raise ValueError("label.tier3 nla_direct reads the SAE's decoder rows: the job needs the sae section")
                log(f"[label] tier 3: {len(chunk)} features flagged for manual labelling; an nla_direct draft (AV on the decoder row)")
                parts.append(label_nla_direct(_subset(features_dir, chunk), cfg.av_sidecar, spec.sae, cfg.explainer,
                                              max_retries=cfg.max_retries, av=cfg.av.model_dump()))
            elif cfg.av_sidecar:
                log(f"[label] tier 3: {len(chunk)} features flagged for manual labelling; AV explanations and a {cfg.tier3} draft")
                parts.append(label_baez(_subset(features_dir, chunk), cfg.av_sidecar, cfg.explainer, last_only=cfg.tier3 == "baez_last",
                                        n_examples=cfg.av_examples, max_retries=cfg.max_retries, av=cfg.av.model_dump()))
            else:
                rows = [{"sae_id": s, "layer": int(r), "feature": f, "method": "manual", "label": None, "n_examples": 0,
                         "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 0,
                         "error": "tier 3: flagged for manual labelling (no AV configured)"}
                        for s, f, r in zip(routes.column("sae_id").to_pylist(), routes.column("feature").to_pylist(), routes.column("layer").to_pylist())
                        if (s, f) in chunk]
                parts.append(schema.conform(pa.Table.from_pylist(rows), schema.LABELS))
        return _with_route(pa.concat_tables([schema.conform(p, schema.LABELS) for p in parts]) if parts else schema.empty(schema.LABELS), routes)

    prev = run.manifest["stages"].get("label") or {}
    if not run.completed("label") or prev.get("backend_failed"):
        with run.stage("label") as info:
            # resume: label only the features without a committed row, and those whose
            # committed row failed in the LLM backend; commit every shard as it is done
            shards = LabelShards(run.table_dir(SHARD_DIR), run.attempt)
            before = shards.committed()
            failed = before.filter(pa.array(backend_failed(before), pa.bool_()))
            done = set(_keys(before)) - set(_keys(failed))
            retry = set(_keys(failed))
            info["resumed_features"] = sum(len(keys[t] & done) for t in (1, 2, 3))
            info["retried_backend_failed"] = sum(len(keys[t] & retry) for t in (1, 2, 3))
            if info["resumed_features"] or info["retried_backend_failed"]:
                log(f"[label] resuming: {info['resumed_features']} features labelled by an earlier attempt; "
                    f"{info['retried_backend_failed']} that failed in the LLM backend are retried")
            n_shards = 0
            for t in (1, 2, 3):
                todo = sorted(keys[t] - done)
                size = shard_size(len(todo), cfg.shard_features)
                for i in range(0, len(todo), size):
                    chunk = set(todo[i : i + size])
                    if len(todo) > size:
                        log(f"[label] tier {t}: shard {i // size + 1}/{math.ceil(len(todo) / size)} ({len(chunk)} features)")
                    shards.commit(t, label_tier(t, chunk))
                    n_shards += 1
            info["shards"] = n_shards
            every = {k for t in (1, 2, 3) for k in keys[t]}
            labels = shards.committed()
            labels = labels.filter(pa.array([k in every for k in _keys(labels)], pa.bool_()))
            labels = labels.take(pc.sort_indices(labels, sort_keys=[("sae_id", "ascending"), ("feature", "ascending"), ("method", "ascending")]))
            info["parts"] = write_table(labels, run.table_dir("labels"))
            info["features"] = labels.num_rows
            info["labelled"] = int(pc.sum(pc.is_valid(labels.column("label"))).as_py() or 0)
            info["failed"] = labels.num_rows - info["labelled"]
            # rows whose LLM request failed after the backend's retries: the same command
            # run again retries exactly these (and nothing else)
            info["backend_failed"] = int(backend_failed(labels).sum())
            if info["backend_failed"]:
                log(f"[label] {info['backend_failed']} features failed in the LLM backend (their error is in labels/); "
                    "run the same command again to retry only those")
            info["by_tier"] = {str(t): len(keys[t]) for t in (1, 2, 3)}
            info["skipped_few_examples"] = n_skipped
            info["not_labelled_max_per_tier"] = n_capped
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
    if spec.score is not None and not run.completed("score"):
        from baez_ray.stages.score import score_label_run

        with run.stage("score") as info:
            info.update(score_label_run(spec, run, features_dir))
    with run.stage("report") as info:
        from baez_ray.report.labels import write_label_report

        info["path"] = str(write_label_report(run.dir))
    log(f"report: {run.dir / 'report' / 'index.html'}")
