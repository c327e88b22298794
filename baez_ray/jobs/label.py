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

The driver orchestrates (issue #12): it holds the routes' key columns, the keys per tier
and counts. Each shard's features are read by a Ray task into the object store
(`_subset`), the methods that label in the workers (the LLM methods, token_freq) return a
Dataset whose rows the workers write into the shard (`LabelShards.commit_dataset`),
labels/ is written from the shards by a Ray task (`finish_labels`, with the stage's
counts), and the report is rendered by a Ray task (`report.labels.write_label_report`).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from baez_ray import methods, schema
from baez_ray.config import JobSpec, LabelConfig, LabelScoreConfig
from baez_ray.jobs.collect import features_source
from baez_ray.ray_pool import remote
from baez_ray.report.labels import write_label_report
from baez_ray.rundir import Run, log, write_json_atomic, write_parquet_atomic, write_table
from baez_ray.schema import key_table, read_keyed, rows_of
from baez_ray.stages.route import route

SUBSET_BLOCK = 64  # features per Ray Data block of a subset (blocks spread over the actors)


def _read_subset(features_dir: str, keys: pa.Table, n_blocks: int):
    """A Ray task: the FEATURES rows of `keys` (sae_id, feature), read with a filter on
    `feature` (Parquet row-group statistics skip the rest of a big table), as `n_blocks`
    blocks of SUBSET_BLOCK rows (empty blocks when rows are missing)."""
    table = (read_keyed(features_dir, keys) if keys.num_rows else schema.empty(schema.FEATURES)).combine_chunks()
    blocks = [table.slice(i * SUBSET_BLOCK, SUBSET_BLOCK) for i in range(n_blocks)]
    return blocks[0] if n_blocks == 1 else tuple(blocks)


def _subset(features_dir: Path, keys: set[tuple[str, int]]):
    """The FEATURES rows of `keys` as a Ray Dataset in blocks of SUBSET_BLOCK rows, read by
    a Ray task (`_read_subset`) into the object store: the driver holds only the keys and
    the blocks' references, never the examples."""
    import ray

    n_blocks = max(1, math.ceil(len(keys) / SUBSET_BLOCK))
    refs = remote(_read_subset).options(num_returns=n_blocks).remote(str(features_dir), key_table(sorted(keys)), n_blocks)
    return ray.data.from_arrow_refs([refs] if n_blocks == 1 else list(refs))


# ---- resume inside the label stage --------------------------------------------------------

SHARD_DIR = "label_shards"


def shard_size(n_todo: int, fixed: int | None = None) -> int:
    """Features per committed shard: `label.shard_features`, else about 1/64 of the tier's
    work, within [256, 8192]. Each shard is one Dataset through the labelling method (its
    model is loaded once per run: `ray_pool.kept_pools`; a vLLM engine once per shard), so
    shards trade a Dataset's fixed cost against the work a crash can lose."""
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


def failed_rows(labels: pa.Table) -> np.ndarray:
    """Rows that were tried and got no label: the failures a report and the exit code show."""
    if labels.num_rows == 0:
        return np.zeros(0, bool)
    no_label = pc.is_null(labels.column("label")).to_numpy(zero_copy_only=False)
    return no_label & pc.greater(labels.column("tries"), 0).to_numpy(zero_copy_only=False)


def _write_rows(batch: pa.Table, out_dir: str, routes: pa.Table) -> pa.Table:
    """A map_batches function: LABELS rows of a shard → a Parquet file in `out_dir` (named
    by the batch's keys: a retried batch rewrites its own file), their `tier` and `kind`
    from `routes`; returns its counts (rows, backend_failed), one row."""
    import hashlib

    import ray

    routes = ray.get(routes) if isinstance(routes, ray.ObjectRef) else routes
    if batch.num_rows:
        batch = _with_route(schema.conform(batch, schema.LABELS), routes)
        digest = hashlib.sha1()
        for c in ("sae_id", "feature", "method"):
            digest.update(repr(batch.column(c).to_pylist()).encode())
        write_parquet_atomic(batch, Path(out_dir) / f"part-{digest.hexdigest()[:20]}.parquet")
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64()),
                     "backend_failed": pa.array([int(backend_failed(batch).sum()) if batch.num_rows else 0], pa.int64())})


def _latest(table: pa.Table) -> pa.Table:
    """The last row of each (sae_id, feature, method) of `table` (parts in commit order): a
    pyarrow group-by, no Python dict."""
    keys = table.select(["sae_id", "feature", "method"]).append_column("row", pa.array(np.arange(table.num_rows)))
    last = keys.group_by(["sae_id", "feature", "method"]).aggregate([("row", "max")]).column("row_max")
    return table.take(pa.array(np.sort(last.to_numpy()), pa.int64())) if len(last) < table.num_rows else table


class LabelShards:
    """Committed shards of the label stage in `<run>/label_shards/`: per shard of features
    a Parquet part of LABELS rows `aAAAAA-tT-NNNNN.parquet` (attempt, tier, shard; a file,
    or a folder of the files the workers wrote) and then its commit marker `….done`, each
    written to a temp name and renamed. A part without its marker (the run died in
    between) does not count and is removed. What counts is the latest committed row per
    (sae_id, feature, method) (`_latest`): a feature relabelled by a later attempt (a
    backend failure retried) replaces its old row."""

    def __init__(self, root: Path, attempt: int):
        self.root, self.attempt, self.n = root, attempt, 0
        root.mkdir(parents=True, exist_ok=True)
        for f in root.iterdir():
            if f.name.startswith(".") or (f.suffix == ".parquet" and not f.with_suffix(".done").exists()):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        self.n = len(list(root.glob(f"a{attempt:05d}-*.done")))

    def state(self) -> pa.Table:
        """(sae_id, feature, failed) of every committed (latest) row, read by a Ray task: the
        driver gets the keys and a flag, no label or answer."""
        import ray

        return ray.get(remote(_shard_state).remote(str(self.root)))

    def _name(self, tier: int) -> str:
        return f"a{self.attempt:05d}-t{tier}-{self.n:05d}"

    def commit(self, tier: int, labels: pa.Table) -> None:
        name = self._name(tier)
        write_parquet_atomic(labels, self.root / f"{name}.parquet")
        self._mark(name, tier, labels.num_rows, int(backend_failed(labels).sum()))

    def commit_dataset(self, tier: int, ds, routes: pa.Table) -> None:
        """Commit a Ray Dataset of LABELS rows: the workers write its files into a temp
        folder (`_write_rows`, with `tier` and `kind` from `routes`), renamed to the part
        once all are written; the driver reads back the counts only."""
        import ray

        from baez_ray.ray_pool import gather

        name = self._name(tier)
        tmp = self.root / f".{name}.parquet.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        counts = gather(ds.map_batches(_write_rows, batch_format="pyarrow", fn_kwargs={"out_dir": str(tmp), "routes": ray.put(routes)}))
        if not any(tmp.glob("part-*.parquet")):  # no row: an empty part, as a table's commit would write
            write_parquet_atomic(schema.empty(schema.LABELS), tmp / "part-empty.parquet")
        tmp.rename(self.root / f"{name}.parquet")
        total = lambda c: int(pc.sum(counts.column(c)).as_py() or 0) if counts.num_rows else 0  # noqa: E731
        self._mark(name, tier, total("rows"), total("backend_failed"))

    def _mark(self, name: str, tier: int, rows: int, failed: int) -> None:
        write_json_atomic({"attempt": self.attempt, "tier": tier, "rows": rows, "backend_failed": failed}, self.root / f"{name}.done")
        self.n += 1


def committed_rows(root: Path, columns: list[str] | None = None) -> pa.Table:
    """The rows of every committed part of `root`, in commit order (not deduplicated)."""
    parts = [pq.read_table(m.with_suffix(".parquet"), columns=columns) for m in sorted(Path(root).glob("*.done"))]
    like = schema.LABELS if columns is None else pa.schema([schema.LABELS.field(c) for c in columns])
    return pa.concat_tables([schema.conform(t, like) for t in parts]) if parts else schema.empty(like)


def _shard_state(root: str) -> pa.Table:
    """A Ray task: (sae_id, feature, failed: the row failed in the LLM backend) of the
    latest committed row of each (sae_id, feature, method)."""
    rows = _latest(committed_rows(Path(root), ["sae_id", "feature", "method", "label", "raw", "tries"]))
    return pa.table({"sae_id": rows.column("sae_id"), "feature": rows.column("feature"),
                     "failed": pa.array(backend_failed(rows), pa.bool_())})


def _keys(t: pa.Table) -> list[tuple[str, int]]:
    return list(zip(t.column("sae_id").to_pylist(), t.column("feature").to_pylist()))


def _with_route(labels: pa.Table, routes: pa.Table) -> pa.Table:
    """Fill `tier` and `kind` of label rows from the routes table (a join on the keys)."""
    if labels.num_rows == 0:
        return labels
    rows = pa.table({"sae_id": labels.column("sae_id"), "feature": labels.column("feature"), "row": pa.array(np.arange(labels.num_rows))})
    found = rows.join(routes.select(["sae_id", "feature", "tier", "kind"]), ["sae_id", "feature"], join_type="left outer").sort_by("row")
    labels = labels.set_column(labels.schema.get_field_index("tier"), "tier", found.column("tier"))
    return labels.set_column(labels.schema.get_field_index("kind"), "kind", found.column("kind"))


def _rank_within(codes: np.ndarray) -> np.ndarray:
    """Each row's rank (0, 1, …) among the rows of the same code, in row order."""
    order = np.argsort(codes, kind="stable")
    ranks = np.empty(len(codes), dtype=np.int64)
    if len(codes):
        srt = codes[order]
        starts = np.flatnonzero(np.r_[True, srt[1:] != srt[:-1]])
        ranks[order] = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    return ranks


def select(routes: pa.Table, cfg: LabelConfig) -> tuple[pa.Table, dict[int, set], dict]:
    """The routed features to label: those with `min_examples`; of each SAE the first
    `max_features` by feature index, and of those at most `max_per_tier[t]` of tier t.
    Returns (their routes in (sae_id, feature) order, keys per tier, counts). Ranks and
    caps are numpy over the columns; only the keys per tier are Python objects."""
    # a feature needs a few examples to be labelled at all (dead or nearly dead features
    # stay in routes/ with their n_examples, and are counted, not labelled)
    live = pc.greater_equal(routes.column("n_examples"), cfg.min_examples)
    n_skipped = routes.num_rows - int(pc.sum(live).as_py() or 0)
    routes = routes.filter(live)
    routes = routes.take(pc.sort_indices(routes, sort_keys=[("sae_id", "ascending"), ("feature", "ascending")]))
    sae = pc.dictionary_encode(routes.column("sae_id")).combine_chunks().indices.to_numpy().astype(np.int64) if routes.num_rows else np.zeros(0, np.int64)
    if cfg.max_features:
        first = _rank_within(sae) < cfg.max_features
        routes, sae = routes.filter(pa.array(first)), sae[first]
    tiers = routes.column("tier").to_numpy().astype(np.int64) if routes.num_rows else np.zeros(0, np.int64)
    cap = np.full(len(tiers), np.iinfo(np.int64).max)
    for t, n in (cfg.max_per_tier or {}).items():
        cap[tiers == t] = n
    keep = _rank_within(sae * 4 + tiers) < cap
    routes, tiers = routes.filter(pa.array(keep)), tiers[keep]
    keys = {t: set(zip(routes.column("sae_id").filter(pa.array(tiers == t)).to_pylist(), routes.column("feature").filter(pa.array(tiers == t)).to_pylist()))
            for t in (1, 2, 3)}
    return routes, keys, {"skipped_few_examples": n_skipped, "not_labelled_max_per_tier": int((~keep).sum())}


def method_context(spec: JobSpec, name: str, routes_dir: Path) -> methods.LabelContext:
    cfg = spec.label
    return methods.LabelContext(name=name, explainer=cfg.explainer, small_llm=cfg.small_llm, max_retries=cfg.max_retries,
                                n_examples=cfg.av_examples, av_sidecar=cfg.av_sidecar, av=cfg.av, saes=tuple(spec.saes),
                                route=spec.route, routes_dir=routes_dir)


def manual_rows(routes: pa.Table, chunk: set[tuple[str, int]]) -> pa.Table:
    """Tier-3 features flagged for a human, without an AV configured: a row each, no label."""
    rows = routes.take(rows_of(routes, key_table(chunk)))
    n = rows.num_rows
    return schema.conform(pa.table({
        "sae_id": rows.column("sae_id"), "layer": rows.column("layer"), "feature": rows.column("feature"), "method": pa.array(["manual"] * n),
        "n_examples": pa.array(np.zeros(n, np.int32)), "input_tokens": pa.array(np.zeros(n, np.int64)),
        "output_tokens": pa.array(np.zeros(n, np.int64)), "cost_usd": pa.array(np.zeros(n)), "tries": pa.array(np.zeros(n, np.int32)),
        "error": pa.array(["tier 3: flagged for manual labelling (no AV configured)"] * n)}), schema.LABELS)


def label_shard(spec: JobSpec, t: int, chunk: set[tuple[str, int]], features_dir: Path, routes: pa.Table, routes_dir: Path):
    """LABELS rows of the features `chunk` of tier `t` (one shard), by the tier's method: a
    table, or the Ray Dataset of the rows (methods that label in the workers; their
    `tier` and `kind` are filled when the workers write them, `LabelShards.commit_dataset`)."""
    cfg = spec.label
    name = {1: cfg.tier1, 2: cfg.tier2, 3: cfg.tier3}[t]
    if t == 3 and not cfg.av_sidecar:
        log(f"[label] tier 3: {len(chunk)} features flagged for manual labelling (no AV configured)")
        return _with_route(manual_rows(routes, chunk), routes)
    where = f" ({cfg.explainer.backend}:{cfg.explainer.model})" if t == 2 else ""
    what = "flagged for manual labelling; AV explanations and a draft by " if t == 3 else "with "
    log(f"[label] tier {t}: {len(chunk)} features {what}{name}{where}")
    labels = methods.label_rows(name, _subset(features_dir, chunk), method_context(spec, name, routes_dir))
    return _with_route(schema.conform(labels, schema.LABELS), routes) if isinstance(labels, pa.Table) else labels


def _route_rows(routes: pa.Table, chunk: set[tuple[str, int]]) -> pa.Table:
    """(sae_id, feature, tier, kind) of the routes of `chunk`: what its rows' `tier` and
    `kind` are filled from."""
    return routes.select(["sae_id", "feature", "tier", "kind"]).take(rows_of(routes, key_table(chunk)))


def _key_set(t: pa.Table) -> set[tuple[str, int]]:
    return set(_keys(t))


def label_stage(spec: JobSpec, run: Run, features_dir: Path, routes: pa.Table, keys: dict[int, set]) -> dict:
    """Label every selected feature, tier by tier, in committed shards; resume: only the
    features without a committed row, and those whose row failed in the LLM backend.
    The labels and answers stay out of the driver: the workers write the shards, and
    `finish_labels` (a Ray task) writes labels/ from them and counts it; the driver keeps
    keys and counts. Returns the stage's manifest counts."""
    import ray

    shards = LabelShards(run.table_dir(SHARD_DIR), run.attempt)
    before = shards.state()
    failed = before.filter(before.column("failed"))
    done = _key_set(before) - _key_set(failed)
    retry = _key_set(failed)
    del before, failed
    resumed, retried = sum(len(keys[t] & done) for t in (1, 2, 3)), sum(len(keys[t] & retry) for t in (1, 2, 3))
    if resumed or retried:
        log(f"[label] resuming: {resumed} features labelled by an earlier attempt; {retried} that failed in the LLM backend are retried")
    for t in (1, 2, 3):
        todo = sorted(keys[t] - done)
        size = shard_size(len(todo), spec.label.shard_features)
        for i in range(0, len(todo), size):
            chunk = set(todo[i : i + size])
            if len(todo) > size:
                log(f"[label] tier {t}: shard {i // size + 1}/{math.ceil(len(todo) / size)} ({len(chunk)} features)")
            labels = label_shard(spec, t, chunk, features_dir, routes, run.table_dir("routes"))
            if isinstance(labels, pa.Table):
                shards.commit(t, labels)
            else:
                shards.commit_dataset(t, labels, _route_rows(routes, chunk))
    every = key_table(sorted(k for t in (1, 2, 3) for k in keys[t]))
    info = ray.get(remote(finish_labels).remote(str(shards.root), every, str(run.table_dir("labels")), {t: len(keys[t]) for t in (1, 2, 3)}))
    return {"resumed_features": resumed, "retried_backend_failed": retried, "shards": shards.n, **info}


def finish_labels(root: str, every: pa.Table, labels_dir: str, by_tier: dict[int, int]) -> dict:
    """A Ray task: labels/ from the committed shards in `root` (the latest row of each key,
    those of the selected features `every` (sae_id, feature), by (sae_id, feature,
    method)); returns its `parts` and `label_counts`."""
    labels = _latest(committed_rows(Path(root)))
    labels = labels.take(rows_of(labels, every))
    labels = labels.take(pc.sort_indices(labels, sort_keys=[("sae_id", "ascending"), ("feature", "ascending"), ("method", "ascending")]))
    return {"parts": write_table(labels, Path(labels_dir)), **label_counts(labels, by_tier)}


def label_counts(labels: pa.Table, by_tier: dict[int, int]) -> dict:
    """The label stage's manifest counts: rows, failures, tokens, cost, the estimate of
    tokens the frontier method would have spent on the other tiers too (`by_tier`: the
    number of selected features of each tier)."""
    total = lambda c: pc.sum(labels.column(c)).as_py() or 0  # noqa: E731
    info = {"features": labels.num_rows, "labelled": int(pc.sum(pc.is_valid(labels.column("label"))).as_py() or 0)}
    # rows without a label that no LLM was asked for: tier 3 flagged for a human (no AV), or
    # at a layer the AV does not read (the row says why); not failures
    untried = pc.and_(pc.is_null(labels.column("label")), pc.equal(labels.column("tries"), 0))
    info["not_tried"] = int(pc.sum(untried).as_py() or 0) if labels.num_rows else 0
    # rows whose LLM request failed after the backend's retries: the same command run
    # again retries exactly these (and nothing else)
    info["backend_failed"] = int(backend_failed(labels).sum())
    # rows that were tried and got no label (backend failures and unparsed answers); a
    # tier-3 row flagged for a human, or without AV evidence, was not tried (tries 0)
    info["llm_failed"] = int(failed_rows(labels).sum())
    info["by_tier"] = {str(t): by_tier[t] for t in (1, 2, 3)}
    info.update(cost_usd=float(total("cost_usd")), input_tokens=int(total("input_tokens")), output_tokens=int(total("output_tokens")))
    tier2 = labels.filter(pc.equal(labels.column("tier"), 2))
    per_feature = (pc.sum(tier2.column("input_tokens")).as_py() or 0) / max(1, by_tier[2]) if tier2.num_rows else None
    if per_feature:
        info["tokens_saved_estimate"] = int(per_feature * (by_tier[1] + by_tier[3]))
    return info


def _held_out(batch: pa.Table, keys, test_n: int, counts_only: bool) -> pa.Table:
    """FEATURES rows → the held-out test examples of those in `keys` (the decile samples
    that are not among the feature's top examples: every labelling method reads top
    examples only): rows (sae_id, feature, examples), or with `counts_only` their number
    (sae_id, feature, n_test)."""
    import ray

    from baez_ray.stages.split import split_examples

    keys = ray.get(keys) if isinstance(keys, ray.ObjectRef) else keys
    idx = pa.table({"sae_id": batch.column("sae_id"), "feature": batch.column("feature"), "_row": pa.array(range(batch.num_rows), pa.int64())})
    hit = idx.join(keys.select(["sae_id", "feature"]), ["sae_id", "feature"], join_type="inner").sort_by("_row")
    tests = []
    for exs in batch.column("examples").take(hit.column("_row")).to_pylist():
        n_top = sum(1 for e in exs if e["kind"] == "top")
        tests.append([{**e, "residual": None} for e in split_examples(exs, "deciles", train_n=n_top, test_n=test_n)[1]])
    out = {"sae_id": hit.column("sae_id"), "feature": hit.column("feature")}
    if counts_only:
        return pa.table({**out, "n_test": pa.array([len(t) for t in tests], pa.int32())})
    return pa.table({**out, "examples": pa.array(tests, pa.list_(schema.EXAMPLE))})


def held_out_sample(labels: pa.Table, features_dir: Path, cfg: LabelScoreConfig, seed: int) -> tuple[pa.Table, dict]:
    """The features `label.score` scores: a seeded sample of the labelled ones (`cfg.sample`
    per SAE) among those with `min_test_examples` held-out examples (`_held_out`), counted
    in the workers: the driver reads only (sae_id, feature, n_test). Returns (their keys: a
    table (sae_id, feature) in key order, counts)."""
    import ray

    from baez_ray.ray_pool import gather
    from baez_ray.stages.split import sample_per_sae

    labelled = labels.filter(pc.is_valid(labels.column("label"))).select(["sae_id", "feature"])
    labelled = labelled.group_by(["sae_id", "feature"]).aggregate([])
    feats = ray.data.read_parquet(str(features_dir)).select_columns(["sae_id", "feature", "examples"])
    n_test = gather(feats.map_batches(_held_out, batch_format="pyarrow",
                                      fn_kwargs={"keys": ray.put(labelled), "test_n": cfg.test_examples, "counts_only": True}),
                    like=pa.schema([("sae_id", pa.string()), ("feature", pa.int64()), ("n_test", pa.int32())]))
    ok = pc.greater_equal(n_test.column("n_test"), cfg.min_test_examples)
    # a feature that fired in few contexts has all of them among its top examples
    too_few = n_test.num_rows - int(pc.sum(ok).as_py() or 0)
    eligible = n_test.filter(ok).select(["sae_id", "feature"]).sort_by([("sae_id", "ascending"), ("feature", "ascending")])
    keys = eligible.take(pa.array(sample_per_sae(eligible.column("sae_id").to_pylist(), cfg.sample, seed), pa.int64()))
    return keys, {"labelled_features_too_few_test_examples": too_few, "eligible": eligible.num_rows}


def score_sample(spec: JobSpec, run: Run, features_dir: Path) -> dict:
    """`label.score`: score the held-out sample (`held_out_sample`) of the labels; the
    test examples are split out of features/ in the workers."""
    import ray

    from baez_ray.stages.score import score_labels

    cfg = spec.label.score
    # the columns the sample and the subjects read: never the answers (raw), errors or evidence
    labels = pq.read_table(run.table_dir("labels"), columns=["sae_id", "layer", "feature", "method", "label"])
    keys, counts = held_out_sample(labels, features_dir, cfg, spec.seed)
    tests = ray.data.read_parquet(str(features_dir)).select_columns(["sae_id", "feature", "examples"]).map_batches(
        _held_out, batch_format="pyarrow", fn_kwargs={"keys": ray.put(keys), "test_n": cfg.test_examples, "counts_only": False})
    negatives = None
    if cfg.negatives == "corpus":
        from baez_ray.stages.negatives import corpus_negatives_ref

        negatives = corpus_negatives_ref(run.table_dir("contexts"), spec.model, spec.saes, spec.corpus, spec.collect.window,
                                     spec.collect.batch_size, _keys(keys), cfg.n_negatives, spec.seed)
    scores, info = score_labels(tests, keys, labels, cfg, cfg.scorer or spec.label.explainer, seed=spec.seed, negatives_table=negatives)
    info.update(parts=write_table(scores, run.table_dir("scores")), rows=scores.num_rows, **counts)
    return info


def run_job(spec: JobSpec, run: Run) -> None:
    import ray

    features_dir = features_source(spec, run)
    if not run.completed("route"):
        with run.stage("route") as info:
            info.update(route(features_dir, run.table_dir("routes"), spec.route))
    routes, keys, counts = select(pq.read_table(run.table_dir("routes")), spec.label)
    prev = run.manifest["stages"].get("label") or {}
    if prev.get("backend_failed") or not run.completed("label"):  # (completed() says it skips)
        with run.stage("label") as info:
            stage = label_stage(spec, run, features_dir, routes, keys)
            info.update({k: stage[k] for k in ("resumed_features", "retried_backend_failed", "shards", "parts")})
            info.update({k: v for k, v in stage.items() if k not in info}, **counts)
            if info["backend_failed"]:
                log(f"[label] {info['backend_failed']} features failed in the LLM backend (their error is in labels/); "
                    "run the same command again to retry only those")
    run.manifest["labels_dir"] = str(run.table_dir("labels"))
    run.save()
    if spec.label.score is not None and not run.completed("score"):
        with run.stage("score") as info:
            info.update(score_sample(spec, run, features_dir))
    with run.stage("report") as info:
        # a Ray task: the tables (routes, labels, scores) and their statistics are read in a
        # worker, not in the driver (a task of report.labels: its worker need not import torch)
        info["path"] = str(ray.get(remote(write_label_report).remote(str(run.dir))))
    log(f"report: {run.dir / 'report' / 'index.html'}")
