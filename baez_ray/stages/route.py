"""route: score every feature's windows with a sentence embedder and put it in a tier
(SPEC §4).

    features/ ──ray.data.read_parquet (only sae_id, layer, feature and the examples' kind,
              rank, value, top_index, token_strs)──▶ map_batches(RouteWorker, actor pool,
              pyarrow batches) ──▶ routes rows (schema.ROUTES) ──▶ routes/

Per batch of features, a RouteWorker
1. takes each feature's top-N examples (kind "top" by rank; a feature without "top"
   examples uses all of its examples by decreasing value);
2. cuts the input and output windows of every example (baez_ray.models.windows) and embeds the
   window texts of the whole batch in ONE `encode` call, identical texts once;
3. C_in and C_out = mean pairwise cosine of a feature's window embeddings
   (baez_ray.models.embedder.grouped_correlation: the O(N·d) identity, optionally weighted by the
   examples' activations); empty windows (an example that ends at its top token has no
   output window) are left out, and N < 2 gives NaN, stored as null;
4. for the features with C_in < τ_in and C_out < τ_out only, cuts the cross windows and
   embeds them in a second `encode` call; C_cross likewise;
5. tier 1 (kind input or output) if C_in ≥ τ_in or C_out ≥ τ_out — when both pass, the
   score further above its threshold names the kind (ties: input); else tier 2 (cross) if
   C_cross ≥ τ_cross; else tier 3 (obscure).

The thresholds are per score, so a `--set route.tau_in=…` changes one test only. c_cross is
null when it was not computed (tier 1).

Without routing (`label.route: false`, `not_routed`): no embedder; each feature gets a
routes row with its `n_examples` (counted as above: its top examples, at most top_n), no
scores, tier 0 and kind `not_routed` (schema.NOT_ROUTED_TIER / NOT_ROUTED_KIND), read from
the examples' kinds only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa

from baez_ray import progress, schema
from baez_ray.config import RouteConfig  # noqa: F401  (the job file's `route` section)
from baez_ray.models.embedder import grouped_correlation
from baez_ray.models.windows import TopExamples
from baez_ray.ray_pool import actor_map, gather
from baez_ray.rundir import write_table


# the columns route reads: the examples struct is projected to these fields, so Parquet
# never decodes acts, token ids or residual vectors
ROUTE_EXAMPLE = pa.struct([schema.EXAMPLE.field(n) for n in ("kind", "rank", "value", "top_index", "token_strs")])
ROUTE_INPUT = pa.schema(
    [schema.FEATURES.field(n) for n in ("sae_id", "layer", "feature")]
    + [pa.field("examples", pa.list_(ROUTE_EXAMPLE), nullable=False)]
)

# ------------------------------------------------------------------ pure per-batch logic
def _group_scores(U: np.ndarray, feat: np.ndarray, weights: np.ndarray | None, n_features: int) -> np.ndarray:
    """Correlation per feature of the embeddings U (rows contiguous per feature, in
    feature order; feature of each row in `feat`). NaN for features with < 2 rows."""
    offsets = np.zeros(n_features + 1, dtype=np.int64)
    np.cumsum(np.bincount(feat, minlength=n_features), out=offsets[1:])
    return grouped_correlation(U, offsets, weights)


def _nonempty(texts: list[str]) -> np.ndarray:
    return np.fromiter((bool(t) for t in texts), dtype=bool, count=len(texts))


def _embed_dedup(encode: Callable[[list[str]], np.ndarray], stats: dict | None):
    """texts → embeddings via one encode call on the distinct texts."""

    def embed(texts: list[str]) -> np.ndarray:
        index: dict[str, int] = {}
        idx = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
        E = encode(list(index))
        if stats is not None:
            stats["windows"] = stats.get("windows", 0) + len(texts)
            stats["encoded"] = stats.get("encoded", 0) + len(index)
            stats["encode_calls"] = stats.get("encode_calls", 0) + 1
        return E[idx]

    return embed


def assign_tiers(c_in: np.ndarray, c_out: np.ndarray, c_cross: np.ndarray, cfg: RouteConfig) -> tuple[np.ndarray, list[str]]:
    """Tier (1, 2, 3) and kind per feature from the three scores (NaN fails every test)."""
    with np.errstate(invalid="ignore"):
        ok_in, ok_out = c_in >= cfg.tau_in, c_out >= cfg.tau_out
        ok_cross = c_cross >= cfg.tau_cross
        margin_in, margin_out = c_in - cfg.tau_in, c_out - cfg.tau_out
    tier = np.where(ok_in | ok_out, 1, np.where(ok_cross, 2, 3)).astype(np.int8)
    kinds = []
    for i in range(len(tier)):
        if tier[i] == 1:
            kinds.append("input" if ok_in[i] and (not ok_out[i] or margin_in[i] >= margin_out[i]) else "output")
        else:
            kinds.append("cross" if tier[i] == 2 else "obscure")
    return tier, kinds


def route_batch(batch: pa.Table, cfg: RouteConfig, encode: Callable[[list[str]], np.ndarray], stats: dict | None = None) -> pa.Table:
    """Features (ROUTE_INPUT columns, or the full FEATURES schema) → routes rows."""
    ex = TopExamples(batch, cfg.top_n)
    F = ex.n_features
    w = np.maximum(ex.value, 0.0) if cfg.weighted else None  # activations as weights
    embed = _embed_dedup(encode, stats)
    w_in, w_out, w_cross = cfg.windows.input, cfg.windows.output, cfg.windows.cross

    # phase 1: input and output windows of every feature, one encode call; empty windows
    # (nothing left after clipping) are left out of the scores
    t_in, t_out = ex.texts(w_in), ex.texts(w_out)
    k_in, k_out = _nonempty(t_in), _nonempty(t_out)
    E = embed([t for t in t_in if t] + [t for t in t_out if t])
    n_in = int(k_in.sum())
    c_in = _group_scores(E[:n_in], ex.feat[k_in], None if w is None else w[k_in], F)
    c_out = _group_scores(E[n_in:], ex.feat[k_out], None if w is None else w[k_out], F)

    # phase 2: cross windows of the features that failed both tests, one encode call
    with np.errstate(invalid="ignore"):
        need = ~((c_in >= cfg.tau_in) | (c_out >= cfg.tau_out))
    c_cross = np.full(F, np.nan)
    rows = np.flatnonzero(need[ex.feat])
    if len(rows):
        t_cross = ex.texts(w_cross, rows)
        k = _nonempty(t_cross)
        rows = rows[k]
        E = embed([t for t in t_cross if t])
        c = _group_scores(E, ex.feat[rows], None if w is None else w[rows], F)
        c_cross[need] = c[need]
    tier, kind = assign_tiers(c_in, c_out, c_cross, cfg)
    return pa.Table.from_arrays(
        [
            batch.column("sae_id"),
            batch.column("layer"),
            batch.column("feature"),
            pa.array(ex.n_examples, pa.int32()),
            _nullable(c_in),
            _nullable(c_out),
            _nullable(c_cross),
            pa.array(tier, pa.int8()),
            pa.array(kind, pa.string()),
        ],
        schema=schema.ROUTES,
    )


def _nullable(x: np.ndarray) -> pa.Array:
    x = np.asarray(x, dtype=np.float32)
    return pa.array(x, pa.float32(), mask=np.isnan(x))


# ------------------------------------------------------------------ Ray Data
class RouteWorker:
    """Ray Data actor holding the embedder: features batch (pyarrow) in, routes rows out."""

    def __init__(self, cfg: dict, threads: int | None = None):
        from baez_ray.models.embedder import Embedder

        self.cfg = RouteConfig.model_validate(cfg)
        # threads: by default counted on the node the actor runs on
        threads = threads or default_threads(self.cfg)
        self.embedder = Embedder(self.cfg.embedder, device=self.cfg.device, batch_size=self.cfg.encode_batch_size, threads=threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = route_batch(batch, self.cfg, self.embedder.encode)
        progress.tick(batch.num_rows)
        return out


def default_threads(cfg: RouteConfig) -> int:
    """`threads`, or this node's usable cores shared among the actors (Ray would give an
    actor with num_cpus < 1 a single thread through OMP_NUM_THREADS)."""
    if cfg.threads:
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // cfg.num_actors)


def read_features(paths: str | Path | Sequence[str | Path]):
    """The features table's Parquet parts as a Ray Dataset of ROUTE_INPUT columns only."""
    import ray

    if isinstance(paths, (str, Path)):
        paths = [paths]
    return ray.data.read_parquet([str(p) for p in paths], schema=ROUTE_INPUT)


def route_dataset(features, cfg: RouteConfig):
    """features (a Ray Dataset with ROUTE_INPUT columns, or Parquet path(s)) → Dataset of
    routes rows (schema.ROUTES)."""
    import ray

    ds = features if isinstance(features, ray.data.Dataset) else read_features(features)
    if cfg.num_actors > 1:
        # blocks of one batch each (streaming, no shuffle), so that every actor gets work
        ds = ds.repartition(target_num_rows_per_block=cfg.batch_size)
    return actor_map(ds, RouteWorker, {"cfg": cfg.model_dump(mode="json")}, size=cfg.num_actors, num_cpus=cfg.num_cpus,
                     num_gpus=cfg.num_gpus, resources=cfg.resources, batch_size=cfg.batch_size, zero_copy_batch=True)


def route_table(features, cfg: RouteConfig) -> pa.Table:
    """Run the route stage and gather its rows on the driver (routes are small: 9 columns)."""
    return gather(route_dataset(features, cfg), like=schema.ROUTES)


NOT_ROUTED_INPUT = pa.schema(
    [schema.FEATURES.field(n) for n in ("sae_id", "layer", "feature")]
    + [pa.field("examples", pa.list_(pa.struct([schema.EXAMPLE.field("kind")])), nullable=False)]
)


def not_routed_batch(batch: pa.Table, top_n: int) -> pa.Table:
    """FEATURES rows (NOT_ROUTED_INPUT) → routes rows without scores: tier 0, kind
    not_routed, n_examples = the feature's top examples (all of its examples when it has
    no top ones), at most `top_n`."""
    import pyarrow.compute as pc

    ex = batch.column("examples").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(ex), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    feat = np.repeat(np.arange(batch.num_rows), lengths)
    is_top = pc.equal(pc.struct_field(pc.list_flatten(ex), "kind"), "top").to_numpy(zero_copy_only=False).astype(bool)
    n_top = np.bincount(feat[is_top], minlength=batch.num_rows)
    n = np.minimum(np.where(n_top > 0, n_top, lengths), top_n).astype(np.int32)
    empty = pa.nulls(batch.num_rows, pa.float32())
    return schema.conform(pa.table({
        "sae_id": batch.column("sae_id"), "layer": batch.column("layer"), "feature": batch.column("feature"),
        "n_examples": pa.array(n, pa.int32()), "c_in": empty, "c_out": empty, "c_cross": empty,
        "tier": pa.array(np.full(batch.num_rows, schema.NOT_ROUTED_TIER, np.int8)),
        "kind": pa.array([schema.NOT_ROUTED_KIND] * batch.num_rows, pa.string())}), schema.ROUTES)


def not_routed(features_dir: str | Path, out_dir: str | Path, cfg: RouteConfig) -> dict:
    """The route stage of an unrouted job: features/ → routes/ rows without scores (tier 0,
    kind not_routed), no embedder. Returns counts for the manifest."""
    import ray

    ds = ray.data.read_parquet(str(features_dir), schema=NOT_ROUTED_INPUT)
    table = gather(ds.map_batches(not_routed_batch, batch_format="pyarrow", fn_kwargs={"top_n": cfg.top_n}), like=schema.ROUTES)
    fired = np.asarray(table.column("n_examples").to_numpy()) > 0
    return {"features": table.num_rows, "never_fired": int((~fired).sum()), "not_routed": int(fired.sum()),
            "parts": write_table(table, Path(out_dir))}


def route(features_dir: str | Path, out_dir: str | Path, cfg: RouteConfig) -> dict:
    """The route stage: features/ Parquet → routes/ Parquet. Returns counts for the manifest."""
    import pyarrow.dataset as pads

    with progress.bar("route", total=pads.dataset(str(features_dir), format="parquet").count_rows(), unit="feature"):
        table = route_table(features_dir, cfg)
    parts = write_table(table, Path(out_dir))
    # a feature that never fired (no example) is a class of its own, not tier 3 / obscure
    fired = np.asarray(table.column("n_examples").to_numpy()) > 0
    tiers = np.asarray(table.column("tier").to_numpy())[fired]
    kinds = np.asarray(table.column("kind").to_pylist(), dtype=object)[fired].tolist()
    return {
        "features": table.num_rows,
        "never_fired": int((~fired).sum()),
        "parts": parts,
        "tier1": int((tiers == 1).sum()),
        "tier2": int((tiers == 2).sum()),
        "tier3": int((tiers == 3).sum()),
        **{f"kind_{k}": kinds.count(k) for k in ("input", "output", "cross", "obscure")},
        "cross_scored": int(table.column("c_cross").is_valid().to_numpy(zero_copy_only=False).sum()) if table.num_rows else 0,
    }
