"""stratify: the benchmark's sample per tier (SPEC §4, `benchmark.stratify: tier`). The
protocol's own test needs each feature's tier before it is sampled, so a seeded pool of
the eligible features is routed first, then `n_features` are sampled per tier.

    features/ ─▶ eligible (sae_id, feature) (split.eligible_features: ≥ min_examples)
      ─▶ a seeded order of each SAE's eligible features (`seeded_order`)
      ─▶ rounds, for the SAEs with a tier still short: the next slice of the order
           ─▶ ray.data.read_parquet (split's example fields only, filtered on feature)
           ─▶ map_batches(train_examples): each feature's TRAIN split, as its top examples
           ─▶ route.route_dataset ─▶ routes rows (gathered: 9 small columns)
      ─▶ per SAE and tier: the first n_features features of that tier in the seeded order
      ─▶ split.split_features of the chosen features ─▶ train, test; routes of the pool

What routing reads: the train split of each feature (split.split_examples with the job's
split, train/test sizes and seed, re-ranked as top examples by split.as_top): exactly the
examples that train/ holds and the labellers read, and of those the ones route reads
(route.top_n by rank; kind, rank, value, top_index and token strings). A test example never
takes part, so the scorers' examples do not choose which features are benchmarked, nor
token_freq's kind.

The bound (`max_routed`, per SAE): rounds of doubling size. Round 1 routes 12·n features of
each SAE (four times what three equal tiers would need); each next round routes as many
again as are routed so far, only for the SAEs with a tier short of n, until every tier has
n features, the SAE's eligible features run out, or `max_routed` of them are routed. A
262,144-feature SAE with n = 40 and the default bound 4,096 routes at most 480 + 480 + 960
+ 1,920 + 256 features (1.6 % of it), whatever the dictionary's size; a tier rarer than
about n / max_routed comes out short, and the counts say by how much.

The chosen features of a tier are the first n of the tier in the seeded order, i.e. a
seeded uniform sample of the tier's eligible features (the rounds decide only how far the
order is read): the same seed chooses the same features, and train and test are split as
in an unstratified run, disjoint. The routed pool is itself a uniform sample of the
eligible features, so its tier shares estimate the dictionary's (the routing verdict's
projection uses them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from baez_ray import progress, schema
from baez_ray.config import RouteConfig
from baez_ray.ray_pool import gather
from baez_ray.stages.route import ROUTE_EXAMPLE, ROUTE_INPUT, route_dataset
from baez_ray.stages.split import as_top, eligible_features, feature_seed, split_examples, split_features

TIERS = (1, 2, 3)
FIRST_ROUND_PER_TIER = 4  # round 1 routes this many times n per tier
# the fields split.split_examples and split.as_top read: Parquet decodes nothing else
SPLIT_EXAMPLE = pa.struct([schema.EXAMPLE.field(n) for n in ("kind", "rank", "decile", "context_id", "position", "value", "top_index",
                                                             "token_strs")])
SPLIT_INPUT = pa.schema([schema.FEATURES.field(n) for n in ("sae_id", "layer", "feature")]
                        + [pa.field("examples", pa.list_(SPLIT_EXAMPLE), nullable=False)])


def seeded_order(eligible: pa.Table, seed: int) -> dict[str, list[int]]:
    """SAE id → its eligible features in a seeded random order (one generator seeded with
    `seed` permutes the SAEs' features in the order of their ids)."""
    by_sae: dict[str, list[int]] = {}
    for s, f in zip(eligible.column("sae_id").to_pylist(), eligible.column("feature").to_pylist()):
        by_sae.setdefault(s, []).append(f)
    rng = np.random.default_rng(seed)
    return {s: [by_sae[s][i] for i in rng.permutation(len(by_sae[s]))] for s in sorted(by_sae)}


def train_examples(batch: pa.Table, keys: set, how: str, train_n: int, test_n: int, seed: int) -> pa.Table:
    """SPLIT_INPUT rows → ROUTE_INPUT rows of the features in `keys` ((sae_id, feature)
    pairs): each feature's train split (split.split_examples, seeded per feature as
    split.split_features does), re-ranked as its top examples."""
    rows = []
    for r in batch.to_pylist():
        if (r["sae_id"], r["feature"]) not in keys:
            continue
        train, _ = split_examples(r["examples"], how, train_n, test_n, seed=feature_seed(seed, r["sae_id"], r["feature"]))
        examples = [{k: e[k] for k in ROUTE_EXAMPLE.names} for e in as_top(train)]
        rows.append({"sae_id": r["sae_id"], "layer": r["layer"], "feature": r["feature"], "examples": examples})
    return pa.Table.from_pylist(rows, schema=ROUTE_INPUT)


def route_train(features_dir: Path, keys: list[tuple[str, int]], how: str, train_n: int, test_n: int, seed: int,
                cfg: RouteConfig) -> pa.Table:
    """Routes rows (schema.ROUTES) of the features `keys`, routed on their train examples
    in the workers (the driver gathers the routes rows only)."""
    import ray
    from ray.data.expressions import col

    feats = sorted({f for _, f in keys})
    # the filter on `feature` goes down to Arrow's Parquet reader (row-group statistics skip the rest)
    ds = ray.data.read_parquet(str(features_dir), schema=SPLIT_INPUT).filter(expr=col("feature").is_in(feats))
    ds = ds.map_batches(train_examples, batch_format="pyarrow", fn_kwargs={
        "keys": set(keys), "how": how, "train_n": train_n, "test_n": test_n, "seed": seed})
    return gather(route_dataset(ds, cfg), like=schema.ROUTES)


def tier_of(routes: pa.Table) -> dict[tuple[str, int], int]:
    """(sae_id, feature) → tier of the routed features that fired (n_examples > 0)."""
    cols = [routes.column(c).to_pylist() for c in ("sae_id", "feature", "tier", "n_examples")]
    return {(s, f): t for s, f, t, n in zip(*cols) if n > 0}


def choose(order: dict[str, list[int]], tiers: dict[tuple[str, int], int], n: int) -> dict[str, dict[int, list[int]]]:
    """SAE id → tier → its first `n` routed features in the seeded order."""
    out: dict[str, dict[int, list[int]]] = {}
    for s, feats in order.items():
        per = out[s] = {t: [] for t in TIERS}
        for f in feats:
            t = tiers.get((s, f))
            if t is not None and len(per[t]) < n:
                per[t].append(f)
    return out


def next_round(order: dict[str, list[int]], routed: dict[str, int], chosen: dict[str, dict[int, list[int]]], n: int,
               max_routed: int) -> dict[str, list[int]]:
    """SAE id → the features to route next: for each SAE with a tier short of n and
    features left under the bound, the next slice of its order (12·n in round 1, then as
    many as are routed so far)."""
    out = {}
    for s, feats in order.items():
        done = routed.get(s, 0)
        short = done == 0 or any(len(chosen.get(s, {}).get(t, [])) < n for t in TIERS)
        size = FIRST_ROUND_PER_TIER * len(TIERS) * n if done == 0 else done
        stop = min(len(feats), max_routed, done + size)
        if short and stop > done:
            out[s] = feats[done:stop]
    return out


def stratified_sample(features_dir: Path, n: int, min_examples: int, how: str, train_n: int, test_n: int, seed: int,
                      cfg: RouteConfig, max_routed: int) -> tuple[pa.Table, pa.Table, pa.Table, dict]:
    """(train table, test table, routes of the routed pool, counts): `n` features per tier
    and SAE, sampled as the module docstring says."""
    eligible, need = eligible_features(features_dir, min_examples)
    order = seeded_order(eligible, seed)
    routed: dict[str, int] = {}
    parts: list[pa.Table] = []
    chosen: dict[str, dict[int, list[int]]] = {}
    rounds = 0
    while todo := next_round(order, routed, chosen, n, max_routed):
        keys = [(s, f) for s, feats in todo.items() for f in feats]
        with progress.bar(f"stratify: route round {rounds + 1}", total=len(keys), unit="feature"):
            parts.append(route_train(features_dir, keys, how, train_n, test_n, seed, cfg))
        for s, feats in todo.items():
            routed[s] = routed.get(s, 0) + len(feats)
        rounds += 1
        chosen = choose(order, tier_of(pa.concat_tables(parts)), n)
    routes = pa.concat_tables(parts).sort_by([("sae_id", "ascending"), ("feature", "ascending")])
    keys = pa.table({"sae_id": [s for s, per in chosen.items() for t in TIERS for _ in per[t]],
                     "feature": pa.array([f for per in chosen.values() for t in TIERS for f in per[t]], pa.int64())})
    if keys.num_rows < 2:
        raise ValueError(f"{features_dir}: only {keys.num_rows} routed features could be sampled per tier")
    train, test = split_features(schema.read_keyed(features_dir, keys), how, train_n, test_n, seed)
    return train, test, routes, stratify_counts(eligible, routes, chosen, routed, rounds, n, need, how, max_routed)


def stratify_counts(eligible: pa.Table, routes: pa.Table, chosen: dict, routed: dict, rounds: int, n: int, need: int, how: str,
                    max_routed: int) -> dict:
    """The stage's manifest counts: eligible, routed, rounds, and per tier the features
    routed and sampled (summed over SAEs), with a line per tier that came out short."""
    tiers = np.asarray(routes.column("tier").to_numpy())[np.asarray(routes.column("n_examples").to_numpy()) > 0]
    out = {"eligible": eligible.num_rows, "routed": int(sum(routed.values())), "rounds": rounds, "per_tier": n,
           "sampled": int(sum(len(per[t]) for per in chosen.values() for t in TIERS)), "min_examples": need, "split": how,
           "stratify": "tier", "max_routed": max_routed}
    short = []
    for t in TIERS:
        out[f"routed_tier{t}"] = int((tiers == t).sum())
        out[f"sampled_tier{t}"] = int(sum(len(per[t]) for per in chosen.values()))
        short += [f"{s}: tier {t} has {len(per[t])} of {n} ({routed.get(s, 0):,} of the SAE's eligible features routed)"
                  for s, per in chosen.items() if len(per[t]) < n]
    out["short"] = short
    return out
