"""Committed shards of the label stage: what makes it resumable.

    label stage ─ per shard of features ─▶ <run>/label_shards/aAAAAA-tT-NNNNN.parquet  (LABELS rows)
                                          then its commit marker  aAAAAA-tT-NNNNN.done
    rerun ─▶ state(): the latest committed row of each (sae_id, feature, method)
           ─▶ features without a row, and rows that failed in the LLM backend, are labelled again
    end   ─▶ committed_rows + latest ─▶ labels/ (exactly one row per (feature, method))

A part without its marker (the run died in between) does not count and is removed. Rows
are written by the workers when a method labels in them (`commit_dataset`: the driver
reads back counts only), or from a table (`commit`).

Scores streamed with the labels (stages/label_scores.py): a shard whose labels were scored
as they came has a second part, `scores/aAAAAA-tT-NNNNN.parquet` (SCORES rows), written
before the marker that commits both (`committed_scores`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from baez_ray import schema
from baez_ray.ray_pool import gather, remote, resolved
from baez_ray.rundir import write_json_atomic, write_parquet_atomic

SHARD_DIR = "label_shards"

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


def with_route(labels: pa.Table, routes: pa.Table) -> pa.Table:
    """Fill `tier` and `kind` of label rows from the routes table (a join on the keys)."""
    if labels.num_rows == 0:
        return labels
    rows = pa.table({"sae_id": labels.column("sae_id"), "feature": labels.column("feature"), "row": pa.array(np.arange(labels.num_rows))})
    found = rows.join(routes.select(["sae_id", "feature", "tier", "kind"]), ["sae_id", "feature"], join_type="left outer").sort_by("row")
    labels = labels.set_column(labels.schema.get_field_index("tier"), "tier", found.column("tier"))
    return labels.set_column(labels.schema.get_field_index("kind"), "kind", found.column("kind"))


def _write_rows(batch: pa.Table, out_dir: str, routes: pa.Table, pass_on: bool = False) -> pa.Table:
    """A map_batches function: LABELS rows of a shard → a Parquet file in `out_dir` (named
    by the batch's keys: a retried batch rewrites its own file), their `tier` and `kind`
    from `routes`; returns its counts (rows, backend_failed), one row (`pass_on`: the rows
    written, for the next step of the pipeline)."""
    routes = resolved(routes)
    if batch.num_rows:
        batch = with_route(schema.conform(batch, schema.LABELS), routes)
        digest = hashlib.sha1()
        for c in ("sae_id", "feature", "method"):
            digest.update(repr(batch.column(c).to_pylist()).encode())
        write_parquet_atomic(batch, Path(out_dir) / f"part-{digest.hexdigest()[:20]}.parquet")
    if pass_on:
        return batch if batch.num_rows else schema.empty(schema.LABELS)
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64()),
                     "backend_failed": pa.array([int(backend_failed(batch).sum()) if batch.num_rows else 0], pa.int64())})


def latest(table: pa.Table) -> pa.Table:
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
    (sae_id, feature, method) (`latest`): a feature relabelled by a later attempt (a
    backend failure retried) replaces its old row."""

    def __init__(self, root: Path, attempt: int):
        self.root, self.attempt, self.n = root, attempt, 0
        self.scores = root / "scores"
        self.scores.mkdir(parents=True, exist_ok=True)
        for f in [*root.iterdir(), *self.scores.iterdir()]:
            if f.name.startswith(".") or (f.suffix == ".parquet" and not (root / f.name).with_suffix(".done").exists()):
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

    def commit_dataset(self, tier: int, ds, routes: pa.Table, scored: Callable | None = None) -> None:
        """Commit a Ray Dataset of LABELS rows: the workers write its files into a temp
        folder (`_write_rows`, with `tier` and `kind` from `routes`), renamed to the part
        once all are written; the driver reads back the counts only. `scored(labels, out)`:
        the rows, as the workers write them, go on (a lazy Dataset) to `scored`, which runs
        the pipeline and writes the shard's SCORES part to `out` and returns its counts;
        one marker commits both parts."""
        import ray

        name = self._name(tier)
        tmp = self.root / f".{name}.parquet.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        kw = {"out_dir": str(tmp), "routes": ray.put(routes)}
        extra = {}
        if scored is None:
            counts = gather(ds.map_batches(_write_rows, batch_format="pyarrow", fn_kwargs=kw))
            total = lambda c: int(pc.sum(counts.column(c)).as_py() or 0) if counts.num_rows else 0  # noqa: E731
            rows, failed = total("rows"), total("backend_failed")
        else:
            extra["scored"] = scored(ds.map_batches(_write_rows, batch_format="pyarrow", fn_kwargs={**kw, "pass_on": True}),
                                     self.scores / f"{name}.parquet")
            rows, failed = ray.get(remote(_part_counts).remote(str(tmp)))
        if not any(tmp.glob("part-*.parquet")):  # no row: an empty part, as a table's commit would write
            write_parquet_atomic(schema.empty(schema.LABELS), tmp / "part-empty.parquet")
        tmp.rename(self.root / f"{name}.parquet")
        self._mark(name, tier, rows, failed, **extra)

    def _mark(self, name: str, tier: int, rows: int, failed: int, **extra) -> None:
        write_json_atomic({"attempt": self.attempt, "tier": tier, "rows": rows, "backend_failed": failed, **extra},
                          self.root / f"{name}.done")
        self.n += 1


def committed_rows(root: Path, columns: list[str] | None = None) -> pa.Table:
    """The rows of every committed part of `root`, in commit order (not deduplicated)."""
    parts = [pq.read_table(m.with_suffix(".parquet"), columns=columns) for m in sorted(Path(root).glob("*.done"))]
    like = schema.LABELS if columns is None else pa.schema([schema.LABELS.field(c) for c in columns])
    return pa.concat_tables([schema.conform(t, like) for t in parts]) if parts else schema.empty(like)


def committed_scores(root: Path) -> tuple[pa.Table, dict]:
    """The SCORES rows streamed with the committed shards of `root` (the latest of each
    (sae_id, feature, method, benchmark), in commit order), and the sum of their shards'
    scorer counts."""
    markers = sorted(Path(root).glob("*.done"))
    parts = [pq.read_table(Path(root) / "scores" / m.with_suffix(".parquet").name) for m in markers
             if (Path(root) / "scores" / m.with_suffix(".parquet").name).exists()]
    counts: dict = {}
    for m in markers:
        for k, v in (json.loads(m.read_text()).get("scored") or {}).items():
            counts[k] = counts.get(k, 0) + v
    if not parts:
        return schema.empty(schema.SCORES), counts
    table = pa.concat_tables([schema.conform(t, schema.SCORES) for t in parts])
    keys = table.select(["sae_id", "feature", "method", "benchmark"]).append_column("row", pa.array(np.arange(table.num_rows)))
    last = keys.group_by(["sae_id", "feature", "method", "benchmark"]).aggregate([("row", "max")]).column("row_max")
    return table.take(pa.array(np.sort(last.to_numpy()), pa.int64())), counts


def _part_counts(part_dir: str) -> tuple[int, int]:
    """A Ray task: (rows, backend_failed) of the LABELS files the workers wrote in `part_dir`."""
    files = sorted(Path(part_dir).glob("part-*.parquet"))
    if not files:
        return 0, 0
    rows = pa.concat_tables([pq.read_table(f, columns=["label", "raw", "tries"]) for f in files])
    return rows.num_rows, int(backend_failed(rows).sum())


def _shard_state(root: str) -> pa.Table:
    """A Ray task: (sae_id, feature, failed: the row failed in the LLM backend) of the
    latest committed row of each (sae_id, feature, method)."""
    rows = latest(committed_rows(Path(root), ["sae_id", "feature", "method", "label", "raw", "tries"]))
    return pa.table({"sae_id": rows.column("sae_id"), "feature": rows.column("feature"),
                     "failed": pa.array(backend_failed(rows), pa.bool_())})
