"""Train/test splits of a feature's activation examples (SPEC §3, §5).

Labellers see the *train* examples, scorers the *test* examples; the two never share an
example. Two examples are the same example when they come from the same corpus context at
the same position (collect), or, without a context id (ingest), when they have the same
tokens and the same top index. Identical duplicates inside a feature's list are dropped.

Splits (ranks are 1-based, as in the SPEC):
* `top`: train = top ranks 1..train_n, test = the next test_n top ranks (defaults 1–5 and
  6–15).
* `deciles`: train = top ranks 1..train_n; test = the decile samples (examples drawn
  across the activation range), taken round-robin from the highest decile down so that
  every decile present is represented, never one that is also a train example.
* `random`: train and test drawn at random (seeded per feature) from all examples.

A feature whose examples cannot fill the test set gets what there is; callers choose
features with enough examples (the benchmark job's `min_examples`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from baez_ray import schema

Split = Literal["top", "deciles", "random"]


def identity(ex: dict) -> tuple:
    if ex.get("context_id") is not None and ex.get("position") is not None:
        return ("ctx", int(ex["context_id"]), int(ex["position"]))
    return ("tok", tuple(ex["token_strs"]), int(ex["top_index"]))


def _dedup(examples: Sequence[dict], exclude: set | None = None) -> list[dict]:
    seen = set(exclude or ())
    out = []
    for e in examples:
        k = identity(e)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


def feature_seed(seed: int, sae_id: str, feature: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}|{sae_id}|{feature}".encode(), digest_size=8).digest(), "little")


def split_examples(examples: Sequence[dict], split: Split = "top", train_n: int = 5, test_n: int = 10,
                   seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) for one feature's examples (EXAMPLE dicts). `seed` should differ per
    feature (see `feature_seed`) for the random split."""
    top = _dedup(sorted((e for e in examples if e["kind"] == "top"), key=lambda e: e["rank"]))
    if split == "top":
        return top[:train_n], top[train_n : train_n + test_n]
    if split == "deciles":
        train = top[:train_n]
        samples = _dedup([e for e in examples if e["kind"] == "sample"], {identity(e) for e in train})
        by_decile: dict[int, list[dict]] = {}
        for e in sorted(samples, key=lambda e: (-(e["decile"] or 0), e["rank"])):
            by_decile.setdefault(e["decile"] or 0, []).append(e)
        test: list[dict] = []
        while len(test) < test_n and any(by_decile.values()):
            for d in sorted(by_decile, reverse=True):
                if by_decile[d] and len(test) < test_n:
                    test.append(by_decile[d].pop(0))
        return train, test
    if split == "random":
        pool = _dedup(sorted(examples, key=lambda e: (e["kind"], e["rank"])))
        order = np.random.default_rng(seed).permutation(len(pool))
        chosen = [pool[i] for i in order]
        return chosen[:train_n], chosen[train_n : train_n + test_n]
    raise ValueError(f"unknown split {split!r} (top, deciles, random)")


def as_top(examples: Sequence[dict]) -> list[dict]:
    """Examples re-ranked as a feature's top examples (kind "top", ranks 0..n-1, by value),
    so that every labeller reads exactly the train set."""
    ordered = sorted(examples, key=lambda e: -e["value"])
    return [{**e, "kind": "top", "rank": i, "decile": None} for i, e in enumerate(ordered)]


def n_distinct_examples(examples: list[dict]) -> int:
    return len({identity(e) for e in examples if e["value"] > 0})


def sample_per_sae(sae_ids: Sequence[str], n: int | None, seed: int) -> list[int]:
    """Positions (ascending) of a seeded sample of at most `n` items per SAE, from items
    whose SAE is `sae_ids[i]` (None: all). One generator seeded with `seed` draws for the
    SAEs in the order of their ids, so a table of one SAE gets the sample it got before
    limits were per SAE."""
    by_sae: dict[str, list[int]] = {}
    for i, s in enumerate(sae_ids):
        by_sae.setdefault(s, []).append(i)
    rng = np.random.default_rng(seed)
    chosen = []
    for s in sorted(by_sae):
        pos = by_sae[s]
        chosen += [pos[j] for j in rng.choice(len(pos), size=n, replace=False)] if n and len(pos) > n else pos
    return sorted(chosen)


def _n_distinct(batch: pa.Table) -> pa.Table:
    """FEATURES rows → (sae_id, feature, n_distinct): their distinct activating examples."""
    n = [n_distinct_examples(exs) for exs in batch.column("examples").to_pylist()]
    return pa.table({"sae_id": batch.column("sae_id"), "feature": batch.column("feature"), "n_distinct": pa.array(n, pa.int32())})


def eligible_features(features_dir: Path, min_examples: int) -> tuple[pa.Table, int]:
    """((sae_id, feature) of the features with at least `min_examples` (≥ 2) distinct
    activating examples, in (sae_id, feature) order; the bound used). The examples are
    counted in the workers: the driver reads (sae_id, feature, n_distinct)."""
    import ray

    from baez_ray.ray_pool import gather

    counts = gather(ray.data.read_parquet(str(features_dir)).select_columns(["sae_id", "feature", "examples"]).map_batches(
        _n_distinct, batch_format="pyarrow"))
    need = max(min_examples, 2)
    eligible = counts.filter(pc.greater_equal(counts.column("n_distinct"), need)) if counts.num_rows else counts
    if eligible.num_rows < 2:
        raise ValueError(f"{features_dir}: only {eligible.num_rows} features have >= {need} activating examples; "
                         "collect over more tokens or lower benchmark.min_examples")
    return eligible.select(["sae_id", "feature"]).sort_by([("sae_id", "ascending"), ("feature", "ascending")]), need


def split_features(table: pa.Table, how: str, train_n: int, test_n: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """FEATURES rows → (train table, test table), in (sae_id, feature) order: each
    feature's examples split by `split_examples` (seeded per feature by `feature_seed`),
    the train examples re-ranked as its top examples (`as_top`)."""
    rows = sorted(table.to_pylist(), key=lambda r: (r["sae_id"], r["feature"]))
    train_rows, test_rows = [], []
    for r in rows:
        train, test = split_examples(r["examples"], how, train_n, test_n, seed=feature_seed(seed, r["sae_id"], r["feature"]))
        train_rows.append({**r, "examples": as_top(train)})
        test_rows.append({**r, "examples": test})
    train_t = schema.conform(pa.Table.from_pylist(train_rows, schema=table.schema), schema.FEATURES)
    test_t = schema.conform(pa.Table.from_pylist(test_rows, schema=table.schema), schema.FEATURES)
    return train_t, test_t


def sample_and_split(features_dir: Path, n_features: int, min_examples: int, how: str, train_n: int, test_n: int,
                     seed: int) -> tuple[pa.Table, pa.Table, dict]:
    """(train table, test table, counts): `n_features` features per SAE with at least
    `min_examples` distinct activating examples, sampled with `seed` (`sample_per_sae`, over
    the eligible features in (sae_id, feature) order), their examples split into train and
    test (`split_features`). The driver reads (sae_id, feature, n_distinct), then the
    sampled features only."""
    eligible, need = eligible_features(features_dir, min_examples)
    chosen = eligible.take(pa.array(sample_per_sae(eligible.column("sae_id").to_pylist(), n_features, seed), pa.int64()))
    train_t, test_t = split_features(schema.read_keyed(features_dir, chosen), how, train_n, test_n, seed)
    return train_t, test_t, {"eligible": eligible.num_rows, "sampled": train_t.num_rows, "min_examples": need, "split": how}


def _held_out(batch: pa.Table, keys, test_n: int, counts_only: bool) -> pa.Table:
    """FEATURES rows → the held-out test examples of those in `keys` (the decile samples
    that are not among the feature's top examples: every labelling method reads top
    examples only): rows (sae_id, feature, examples), or with `counts_only` their number
    (sae_id, feature, n_test)."""
    from baez_ray.ray_pool import resolved

    keys = resolved(keys)
    idx = pa.table({"sae_id": batch.column("sae_id"), "feature": batch.column("feature"), "_row": pa.array(range(batch.num_rows), pa.int64())})
    hit = idx.join(keys.select(["sae_id", "feature"]), ["sae_id", "feature"], join_type="inner").sort_by("_row")
    tests = [held_out_tests(exs, test_n) for exs in batch.column("examples").take(hit.column("_row")).to_pylist()]
    out = {"sae_id": hit.column("sae_id"), "feature": hit.column("feature")}
    if counts_only:
        return pa.table({**out, "n_test": pa.array([len(t) for t in tests], pa.int32())})
    logits = {c: batch.column(c).take(hit.column("_row")) for c in ("pos_tokens", "pos_values") if c in batch.column_names}
    return pa.table({**out, "examples": pa.array(tests, pa.list_(schema.EXAMPLE)), **logits})


def held_out_sample(labels: pa.Table, features_dir: Path, test_n: int, min_test: int, sample: int | None, seed: int) -> tuple[pa.Table, dict]:
    """The features `label.score` scores: a seeded sample of the labelled ones (`sample`
    per SAE) among those with `min_test` of the `test_n` held-out examples (`_held_out`), counted
    in the workers: the driver reads only (sae_id, feature, n_test). Returns (their keys: a
    table (sae_id, feature) in key order, counts)."""
    labelled = labels.filter(pc.is_valid(labels.column("label"))).select(["sae_id", "feature"])
    return sample_held_out(labelled, features_dir, test_n, min_test, sample, seed)


def sample_held_out(candidates: pa.Table, features_dir: Path, test_n: int, min_test: int, sample: int | None,
                    seed: int) -> tuple[pa.Table, dict]:
    """A seeded sample of `sample` features per SAE (None: all) among the `candidates`
    (sae_id, feature) with `min_test` of the `test_n` held-out examples, counted in the
    workers. Returns (their keys in key order, counts)."""
    import ray

    from baez_ray.ray_pool import gather

    candidates = candidates.select(["sae_id", "feature"]).group_by(["sae_id", "feature"]).aggregate([])
    feats = ray.data.read_parquet(str(features_dir)).select_columns(["sae_id", "feature", "examples"])
    n_test = gather(feats.map_batches(_held_out, batch_format="pyarrow",
                                      fn_kwargs={"keys": ray.put(candidates), "test_n": test_n, "counts_only": True}),
                    like=pa.schema([("sae_id", pa.string()), ("feature", pa.int64()), ("n_test", pa.int32())]))
    ok = pc.greater_equal(n_test.column("n_test"), min_test)
    # a feature that fired in few contexts has all of them among its top examples
    too_few = n_test.num_rows - int(pc.sum(ok).as_py() or 0)
    eligible = n_test.filter(ok).select(["sae_id", "feature"]).sort_by([("sae_id", "ascending"), ("feature", "ascending")])
    keys = eligible.take(pa.array(sample_per_sae(eligible.column("sae_id").to_pylist(), sample, seed), pa.int64()))
    return keys, {"labelled_features_too_few_test_examples": too_few, "eligible": eligible.num_rows}


def held_out_tests(examples: list[dict], test_n: int) -> list[dict]:
    """A feature's held-out test examples (its decile samples that are not among its top
    examples; `test_n` of them), without residual vectors."""
    n_top = sum(1 for e in examples if e["kind"] == "top")
    return [{**e, "residual": None} for e in split_examples(examples, "deciles", train_n=n_top, test_n=test_n)[1]]


def held_out_examples(features_dir: Path, keys: pa.Table, test_n: int):
    """A Dataset of the held-out test examples (`_held_out`) of the features `keys`, split
    out of features/ in the workers: rows (sae_id, feature, examples, pos_tokens,
    pos_values: the promoted tokens logit_embedding reads)."""
    import ray

    cols = ["sae_id", "feature", "examples", "pos_tokens", "pos_values"]
    return ray.data.read_parquet(str(features_dir)).select_columns(cols).map_batches(
        _held_out, batch_format="pyarrow", fn_kwargs={"keys": ray.put(keys), "test_n": test_n, "counts_only": False})
