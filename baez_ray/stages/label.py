"""The label stage: the routed features of each tier labelled by the tier's method, in
committed shards (SPEC §4).

    routes/ ─select (min_examples, max_features, max_per_tier)─▶ keys per tier
      ─ per tier, per shard of features ─▶ features rows read by a Ray task (`_subset`)
          ─ tier 1: token_freq / small_llm
          ├ tier 2: the frontier method (eleuther_acts_top5)
          ├ tier 3: flagged for a human, with AV explanations and a draft when an AV is
          │         configured (label.tier3: baez | baez_last | nla_direct), else `manual` rows
          └ tier 0: not routed (label.route: false): every feature with label.method
      ─▶ label_shards/ (committed per shard: stages/label_shards.py) ─finish_labels─▶ labels/
                  └─ with a score plan (stages/label_scores.py), a shard's sampled labels
                     are scored as they come, in the same pipeline, committed with it

Resume: a rerun labels only the features without a committed row, plus those whose row
failed in the LLM backend (`backend_failed`); labels/ is then rebuilt from the committed
rows, exactly one per (feature, method).

The driver holds the routes' key columns, the keys per tier and counts. Each shard's
features are read by a Ray task into the object store; the methods that label in the
workers (the LLM methods, token_freq) return a Dataset whose rows the workers write into
the shard (`LabelShards.commit_dataset`); labels/ is written from the shards by a Ray task
(`finish_labels`, with the stage's counts).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from baez_ray import methods, schema
from baez_ray.config import BenchmarkConfig, LabelConfig, RouteConfig, SAEConfig
from baez_ray.ray_pool import remote
from baez_ray.rundir import Run, log, write_table
from baez_ray.schema import NOT_ROUTED_TIER, key_table, read_keyed, rows_of
from baez_ray.stages.label_shards import SHARD_DIR, LabelShards, backend_failed, committed_rows, failed_rows, latest, with_route

SUBSET_BLOCK = 64  # features per Ray Data block of a subset (blocks spread over the actors)
TIERS = (NOT_ROUTED_TIER, 1, 2, 3)  # in the order they are labelled


def label_stage(cfg: LabelConfig, saes: tuple[SAEConfig, ...], route_cfg: RouteConfig, run: Run, features_dir: Path,
                routes: pa.Table, keys: dict[int, set], scores=None) -> dict:
    """Label every selected feature (`keys`: per tier, from `select`), tier by tier, in
    committed shards; resume: only the features without a committed row, and those whose
    row failed in the LLM backend. The labels and answers stay out of the driver: the
    workers write the shards, and `finish_labels` (a Ray task) writes labels/ from them and
    counts it; the driver keeps keys and counts. `scores` (label_scores.ScorePlan): a
    shard's sampled labels are scored as they come. Returns the stage's manifest counts."""
    import ray

    shards = LabelShards(run.table_dir(SHARD_DIR), run.attempt)
    before = shards.state()
    failed = before.filter(before.column("failed"))
    retry = _key_set(failed)
    done = _key_set(before) - retry
    del before, failed
    resumed, retried = sum(len(keys[t] & done) for t in TIERS), sum(len(keys[t] & retry) for t in TIERS)
    if resumed or retried:
        log(f"[label] resuming: {resumed} features labelled by an earlier attempt; {retried} that failed in the LLM backend are retried")
    for t in TIERS:
        todo = sorted(keys[t] - done)
        size = shard_size(len(todo), cfg.shard_features)
        for i in range(0, len(todo), size):
            chunk = set(todo[i : i + size])
            if len(todo) > size:
                log(f"[label] tier {t}: shard {i // size + 1}/{math.ceil(len(todo) / size)} ({len(chunk)} features)")
            scored = scores.scorer_for(chunk) if scores is not None else None
            labels = label_shard(cfg, saes, route_cfg, t, chunk, features_dir, routes, run.table_dir("routes"), stream=scored is not None)
            if isinstance(labels, pa.Table):
                shards.commit(t, labels)
            else:
                shards.commit_dataset(t, labels, _route_rows(routes, chunk), scored=scored)
    every = key_table(sorted(k for t in TIERS for k in keys[t]))
    info = ray.get(remote(finish_labels).remote(str(shards.root), every, str(run.table_dir("labels")), {t: len(keys[t]) for t in TIERS}))
    return {"resumed_features": resumed, "retried_backend_failed": retried, "shards": shards.n, **info}


def start_llms(cfg: LabelConfig) -> None:
    """Start the API clients the stage will ask (explainer, small LLM, scorer) once Ray
    is up, before the job routes: their actors are up when the first prompt is ready."""
    from baez_ray.llm.backends import MissingAPIKeyError, prestart

    for llm in {id(c): c for c in (cfg.explainer, cfg.small_llm, cfg.score.scorer if cfg.score else None) if c is not None}.values():
        try:
            prestart(llm)
        except MissingAPIKeyError:  # said where a prompt first needs the key, as without the head start
            pass


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
        first = rank_within(sae) < cfg.max_features
        routes, sae = routes.filter(pa.array(first)), sae[first]
    tiers = routes.column("tier").to_numpy().astype(np.int64) if routes.num_rows else np.zeros(0, np.int64)
    cap = np.full(len(tiers), np.iinfo(np.int64).max)
    for t, n in (cfg.max_per_tier or {}).items():
        cap[tiers == t] = n
    keep = rank_within(sae * 4 + tiers) < cap
    routes, tiers = routes.filter(pa.array(keep)), tiers[keep]
    keys = {t: set(zip(routes.column("sae_id").filter(pa.array(tiers == t)).to_pylist(), routes.column("feature").filter(pa.array(tiers == t)).to_pylist()))
            for t in TIERS}
    return routes, keys, {"skipped_few_examples": n_skipped, "not_labelled_max_per_tier": int((~keep).sum())}


def rank_within(codes: np.ndarray) -> np.ndarray:
    """Each row's rank (0, 1, …) among the rows of the same code, in row order."""
    order = np.argsort(codes, kind="stable")
    ranks = np.empty(len(codes), dtype=np.int64)
    if len(codes):
        srt = codes[order]
        starts = np.flatnonzero(np.r_[True, srt[1:] != srt[:-1]])
        ranks[order] = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
    return ranks


def shard_size(n_todo: int, fixed: int | None = None) -> int:
    """Features per committed shard: `label.shard_features`, else about 1/64 of the tier's
    work, within [256, 8192]. Each shard is one Dataset through the labelling method (its
    model is loaded once per run: `ray_pool.kept_pools`; a vLLM engine once per shard), so
    shards trade a Dataset's fixed cost against the work a crash can lose."""
    if fixed:
        return fixed
    return min(8192, max(256, math.ceil(n_todo / 64)))


def label_shard(cfg: LabelConfig, saes: tuple[SAEConfig, ...], route_cfg: RouteConfig, t: int, chunk: set[tuple[str, int]],
                features_dir: Path, routes: pa.Table, routes_dir: Path, stream: bool = False):
    """LABELS rows of the features `chunk` of tier `t` (one shard), by the tier's method: a
    table, or the Ray Dataset of the rows (methods that label in the workers; their
    `tier` and `kind` are filled when the workers write them, `LabelShards.commit_dataset`;
    `stream`: unexecuted where the method can, to be scored as they come)."""
    name = {NOT_ROUTED_TIER: cfg.single_method, 1: cfg.tier1, 2: cfg.tier2, 3: cfg.tier3}[t]
    if t == 3 and not (cfg.av_sidecar or cfg.av_sidecars):
        log(f"[label] tier 3: {len(chunk)} features flagged for manual labelling (no AV configured)")
        return with_route(manual_rows(routes, chunk), routes)
    where = f" ({cfg.explainer.backend}:{cfg.explainer.model})" if t in (NOT_ROUTED_TIER, 2) and "explainer" in methods.get(name).needs else ""
    what = "flagged for manual labelling; AV explanations and a draft by " if t == 3 else "with "
    tier = "not routed" if t == NOT_ROUTED_TIER else f"tier {t}"
    log(f"[label] {tier}: {len(chunk)} features {what}{name}{where}")
    ctx = replace(method_context(name, cfg, saes, route_cfg, routes_dir, routes_dir.parent / "residuals"), stream=stream)
    labels = methods.label_rows(name, _subset(features_dir, chunk), ctx)
    return with_route(schema.conform(labels, schema.LABELS), routes) if isinstance(labels, pa.Table) else labels


def method_context(name: str, section: LabelConfig | BenchmarkConfig, saes: tuple[SAEConfig, ...], route_cfg: RouteConfig,
                   routes_dir: Path, residuals_dir: Path | None = None) -> methods.LabelContext:
    """What the method `name` reads besides the features, from the job's `label` or
    `benchmark` section: a label job's AV methods verbalize `av_examples` examples per
    feature, a benchmark's every train example; the AV of each layer (`av_sidecar`,
    `av_sidecars`) and the residuals table of these features (the residuals stage's)."""
    from baez_ray.av.sidecar import sidecars_by_layer

    label_job = isinstance(section, LabelConfig)
    where = "label" if label_job else "benchmark"
    by_layer = sidecars_by_layer(section.av_sidecar, section.av_sidecars, where) if (section.av_sidecar or section.av_sidecars) else {}
    has = residuals_dir is not None and any(Path(residuals_dir).glob("*.parquet"))
    return methods.LabelContext(name=name, explainer=section.explainer, small_llm=section.small_llm if label_job else None,
                                max_retries=section.max_retries, n_examples=section.av_examples if label_job else section.train_examples,
                                av_sidecar=section.av_sidecar, av_sidecars=tuple(sorted(by_layer.items())), av=section.av,
                                saes=tuple(saes), route=route_cfg, routes_dir=routes_dir, residuals_dir=residuals_dir if has else None)


def manual_rows(routes: pa.Table, chunk: set[tuple[str, int]]) -> pa.Table:
    """Tier-3 features flagged for a human, without an AV configured: a row each, no label."""
    rows = routes.take(rows_of(routes, key_table(chunk)))
    n = rows.num_rows
    return schema.conform(pa.table({
        "sae_id": rows.column("sae_id"), "layer": rows.column("layer"), "feature": rows.column("feature"), "method": pa.array(["manual"] * n),
        "n_examples": pa.array(np.zeros(n, np.int32)), "input_tokens": pa.array(np.zeros(n, np.int64)),
        "output_tokens": pa.array(np.zeros(n, np.int64)), "cost_usd": pa.array(np.zeros(n)), "tries": pa.array(np.zeros(n, np.int32)),
        "error": pa.array(["tier 3: flagged for manual labelling (no AV configured)"] * n)}), schema.LABELS)


def _route_rows(routes: pa.Table, chunk: set[tuple[str, int]]) -> pa.Table:
    """(sae_id, feature, tier, kind) of the routes of `chunk`: what its rows' `tier` and
    `kind` are filled from."""
    return routes.select(["sae_id", "feature", "tier", "kind"]).take(rows_of(routes, key_table(chunk)))


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


def finish_labels(root: str, every: pa.Table, labels_dir: str, by_tier: dict[int, int]) -> dict:
    """A Ray task: labels/ from the committed shards in `root` (the latest row of each key,
    those of the selected features `every` (sae_id, feature), by (sae_id, feature,
    method)); returns its `parts` and `label_counts`."""
    labels = latest(committed_rows(Path(root)))
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
    info["by_tier"] = {str(t): by_tier.get(t, 0) for t in TIERS if t or by_tier.get(t)}
    info.update(cost_usd=float(total("cost_usd")), input_tokens=int(total("input_tokens")), output_tokens=int(total("output_tokens")))
    tier2 = labels.filter(pc.equal(labels.column("tier"), 2))
    per_feature = (pc.sum(tier2.column("input_tokens")).as_py() or 0) / max(1, by_tier.get(2, 0)) if tier2.num_rows else None
    if per_feature:
        info["tokens_saved_estimate"] = int(per_feature * (by_tier.get(1, 0) + by_tier.get(3, 0)))
    return info


def _keys(t: pa.Table) -> list[tuple[str, int]]:
    return list(zip(t.column("sae_id").to_pylist(), t.column("feature").to_pylist()))


def _key_set(t: pa.Table) -> set[tuple[str, int]]:
    return set(_keys(t))
