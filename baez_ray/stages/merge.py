"""The merge side of collect (`stages/collect.py` has the path of the data): the merge
actors, each owning a contiguous range of the global feature index, merge the candidate
rows the workers push them (`Merger`), snapshot their state for resume (`Snapshots`) and
write their rows of the features table; the driver holds their handles and counters
(`MergePool`) and runs the snapshot rounds (`Checkpoints`).

A lost node. A merge actor logs every call it merges (its rows, before merging them) to
its folder of the run directory (shared storage on a cluster), fsync'd, in one log per
snapshot generation (`Snapshots`: `log-GGGGGG-*.arrows`, Arrow IPC streams). Ray restarts
a merge actor whose node was lost on another node (`ray_pool.ACTOR_FAULT_TOLERANCE`): it
restores its last snapshot, replays the log of the calls merged since then, and Ray then
retries the calls it had not answered. Every call it ever answered is thus merged again
exactly as before (a call both logged and retried gives rows that are duplicates of a
(feature, context), dropped, and counts of a part it has, ignored), so its state is that
of the actor that was lost: the features table is that of an uninterrupted run. A rerun
after a crash restores and replays the same way (`MergeActor.load`).

This module imports neither torch nor transformers (nor the worker side of collect): a
merge actor's process starts without them, and the token texts of its windows come from
the driver's tokenizer (`MergePool.write_features`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from baez_ray import progress, schema
from baez_ray.config import CollectConfig
from baez_ray.ray_pool import ACTOR_FAULT_TOLERANCE
from baez_ray.rundir import fsync_path, log, write_json_atomic

EMPTY_SAMPLE = 2.0  # reservoir keys live in [0, 1)


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """0-based rank of each row within runs of equal `groups` values (rows already sorted)."""
    n = len(groups)
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def _select(table: pa.Table, k: int, largest: bool) -> pa.Table:
    """Per feature keep the k best rows by key (ties: smaller context id); drop duplicates of
    the same (feature, context) (a retried batch emits its rows again)."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table,
        sort_keys=[("feature", "ascending"), ("key", "descending" if largest else "ascending"), ("context_id", "ascending")],
    )
    table = table.take(order)
    feat = table.column("feature").to_numpy()
    ctx = table.column("context_id").to_numpy()
    dup = np.r_[False, (feat[1:] == feat[:-1]) & (ctx[1:] == ctx[:-1])]
    if dup.any():
        table = table.filter(pa.array(~dup))
        feat = feat[~dup]
    return table.filter(pa.array(_rank_within(feat) < k))


class Merger:
    """The merge of the candidate rows of one feature range [lo, lo+F) (all of it for one
    merge actor; the class is used directly by tests and benches), in bounded memory.

    Rows are buffered and compacted (sorted, each feature's top-k and reservoir kept,
    duplicates of a (feature, context) dropped) once the buffer passes `buffer_bytes`
    (`collect.merge_buffer_mb`) or `buffer_rows`: the state is O(F·(k+R)) windows plus the
    buffer, whatever the corpus length. Each compaction refreshes the thresholds sent back
    to the workers (`thresholds`): a feature's current k-th best value (a lower bound of
    its final one) and R-th smallest reservoir key (an upper bound of its final one).

    Counts are kept per contexts part (the `context_id` of count rows, see CollectWorker):
    a part's firing and token counts are added once, when its every context has been
    counted, and a part reported again (a retried task) is ignored. `done` is then the set
    of parts fully merged, and `save` / `load` a snapshot that covers exactly them. Top and
    sample rows of parts still in flight may be in a snapshot too: they are true candidates,
    and the same row sent again by a rerun is dropped as a duplicate of its (feature,
    context), so resuming from a snapshot gives the same table as an uninterrupted run."""

    def __init__(self, n_features: int, cfg: CollectConfig, buffer_rows: int | None = None,
                 part_sizes: dict[int, int] | None = None, lo: int = 0, buffer_bytes: int | None = None):
        self.F, self.cfg, self.lo = n_features, cfg, lo
        self.counts = np.zeros(n_features, dtype=np.int64)
        self.n_tokens = 0
        self.top: list[pa.Table] = []
        self.smp: list[pa.Table] = []
        self.buffered = self.buffered_bytes = 0
        self.buffer_rows = buffer_rows
        self.buffer_bytes = buffer_bytes if buffer_bytes is not None else (None if buffer_rows else cfg.merge_buffer_mb * 2**20)
        self.rows_in = 0
        self.part_sizes = part_sizes or {}  # part → contexts in it
        self.done: set[int] = set()
        self.pending: dict[int, list] = {}  # part → [contexts counted, [(features, counts)]]
        self.thr_top = np.zeros(n_features, np.float32)
        self.thr_smp = np.full(n_features, EMPTY_SAMPLE, np.float64)
        self.thr_gen = 0

    def add(self, batch: pa.Table) -> int:
        """Merge one batch of candidate rows; returns the number of parts it completed."""
        kind = batch.column("kind")
        cnt = batch.filter(pc.equal(kind, "count"))
        completed = 0
        if cnt.num_rows:
            part = cnt.column("context_id").to_numpy()
            feat = cnt.column("feature").to_numpy()
            c = cnt.column("count").to_numpy()
            for p in np.unique(part):
                sel = part == p
                completed += self._count(int(p), feat[sel], c[sel])
        top, smp = batch.filter(pc.equal(kind, "top")), batch.filter(pc.equal(kind, "sample"))
        self.top.append(top)
        self.smp.append(smp)
        self.buffered += top.num_rows + smp.num_rows
        self.buffered_bytes += top.nbytes + smp.nbytes
        self.rows_in += top.num_rows + smp.num_rows
        if (self.buffer_rows is not None and self.buffered > self.buffer_rows) or (
                self.buffer_bytes is not None and self.buffered_bytes > self.buffer_bytes):
            self.compact()
        return completed

    def _count(self, part: int, feat: np.ndarray, c: np.ndarray) -> int:
        if part < 0:  # not tracked by part (a worker called directly)
            self._apply(feat, c)
            return 0
        if part in self.done:  # reported again by a retried task: counted already
            return 0
        entry = self.pending.setdefault(part, [0, []])
        entry[0] += int(c[feat == -2].sum())
        entry[1].append((feat, c))
        if entry[0] < self.part_sizes.get(part, 0):
            return 0
        for f, cc in entry[1]:
            self._apply(f, cc)
        del self.pending[part]
        self.done.add(part)
        return 1

    def _apply(self, feat: np.ndarray, c: np.ndarray) -> None:
        self.n_tokens += int(c[feat == -1].sum())
        np.add.at(self.counts, feat[feat >= 0] - self.lo, c[feat >= 0])

    def compact(self) -> None:
        empty = schema.empty(schema.CANDIDATES)
        self.top = [_select(pa.concat_tables(self.top or [empty]), self.cfg.top_k, largest=True)]
        self.smp = [_select(pa.concat_tables(self.smp or [empty]), self.cfg.reservoir, largest=False)]
        self.buffered = self.buffered_bytes = 0
        for table, k, thr in ((self.top[0], self.cfg.top_k, self.thr_top), (self.smp[0], self.cfg.reservoir, self.thr_smp)):
            f = table.column("feature").to_numpy()
            at = _rank_within(f) == k - 1  # the k-th best row of each feature that has k rows
            thr[f[at] - self.lo] = table.column("key").to_numpy()[at]
        self.thr_gen += 1

    def thresholds(self, known: int):
        """(generation, k-th best values, R-th smallest keys) when newer than `known`."""
        return None if known == self.thr_gen else (self.thr_gen, self.thr_top, self.thr_smp)

    def token_ids(self) -> np.ndarray:
        """The distinct token ids of the windows held (buffered rows included)."""
        cols = [t.column("tokens").combine_chunks().flatten() for t in self.top + self.smp if t.num_rows]
        return np.unique(np.concatenate([np.zeros(0, np.int64)] + [c.to_numpy(zero_copy_only=False).astype(np.int64) for c in cols]))

    def save(self, path: Path) -> dict:
        """Write the merge state of the parts in `done` into the new directory `path`;
        returns what the commit marker records besides the directory."""
        self.compact()
        path.mkdir(parents=True)
        pq.write_table(self.top[0], path / "top.parquet")
        pq.write_table(self.smp[0], path / "sample.parquet")
        np.save(path / "counts.npy", self.counts)
        return {"n_features": self.F, "lo": self.lo, "n_tokens": self.n_tokens, "rows_in": self.rows_in}

    def load(self, path: Path, info: dict, done: set[int]) -> None:
        self.top = [schema.conform(pq.read_table(path / "top.parquet"), schema.CANDIDATES)]
        self.smp = [schema.conform(pq.read_table(path / "sample.parquet"), schema.CANDIDATES)]
        counts = np.load(path / "counts.npy")
        if counts.shape != (self.F,):
            raise ValueError(f"{path}: counts of {counts.shape[0]} features, expected {self.F}")
        self.counts = counts
        self.n_tokens, self.rows_in = int(info["n_tokens"]), int(info["rows_in"])
        self.done, self.pending = set(done), {}
        self.compact()

    def features_tables(self, dictionaries: list[tuple[str, int, int]], model_id: str, token_text, chunk: int = 4096):
        """The FEATURES rows of this range, `chunk` features at a time (memory: one chunk's
        rows besides the state): `dictionaries` is (sae id, layer, features) of every SAE of
        the job, in the order of their features in the merge (SAE i's feature f is merge
        feature f + the features of the SAEs before it); non-firing features have no
        examples."""
        self.compact()
        sizes = [n for _, _, n in dictionaries]
        if self.lo + self.F > sum(sizes):
            raise ValueError(f"collect: {sum(sizes)} features in the SAEs named, features up to {self.lo + self.F} merged")
        top, smp = self.top[0], self.smp[0]
        tf_all, sf_all = top.column("feature").to_numpy(), smp.column("feature").to_numpy()
        for f0 in range(self.lo, self.lo + self.F, chunk):
            f1 = min(self.lo + self.F, f0 + chunk)
            t0, t1 = np.searchsorted(tf_all, [f0, f1])
            s0, s1 = np.searchsorted(sf_all, [f0, f1])
            yield self._features_chunk(top.slice(t0, t1 - t0), smp.slice(s0, s1 - s0), f0, f1, dictionaries, model_id, token_text)

    def features_table(self, dictionaries: list[tuple[str, int, int]], model_id: str, token_text) -> pa.Table:
        """The whole range's FEATURES rows as one table (small runs, tests)."""
        return pa.concat_tables(list(self.features_tables(dictionaries, model_id, token_text)))

    def _features_chunk(self, top, smp, f0: int, f1: int, dictionaries, model_id: str, token_text) -> pa.Table:
        F = f1 - f0
        max_act = np.zeros(F, np.float32)
        tf = top.column("feature").to_numpy() - f0
        first = np.r_[True, tf[1:] != tf[:-1]] if len(tf) else np.zeros(0, bool)
        max_act[tf[first]] = top.column("value").to_numpy()[first]
        top_rank = _rank_within(tf)
        # a residual is emitted when an example enters a worker's top-n; keep it only where
        # the example is still in the global top-n
        res = top.column("residual").combine_chunks()
        drop = pa.array(top_rank >= self.cfg.residual_top_n)
        top = top.set_column(top.schema.get_field_index("residual"), "residual", pc.if_else(drop, pa.nulls(len(res), res.type), res))
        smp, sf, dec, smp_rank = _decile_samples(smp, top, max_act, self.cfg.samples_per_decile, f0)
        feat, examples = _examples(top, smp, np.r_[tf, sf - f0].astype(np.int64), np.r_[top_rank, smp_rank], dec, token_text)
        per_feature = np.bincount(feat, minlength=F)
        offsets = np.zeros(F + 1, np.int32)
        np.cumsum(per_feature, out=offsets[1:])
        sizes = np.array([n for _, _, n in dictionaries], np.int64)
        starts = np.r_[0, np.cumsum(sizes)[:-1]]
        glob = np.arange(f0, f1, dtype=np.int64)
        which = np.searchsorted(starts, glob, side="right") - 1  # the SAE of each feature
        table = pa.table(
            {
                "sae_id": pa.array(np.array([i for i, _, _ in dictionaries], dtype=object)[which], pa.string()),
                "model_id": pa.array([model_id] * F),
                "layer": pa.array(np.array([layer for _, layer, _ in dictionaries], np.int32)[which]),
                "feature": pa.array(glob - starts[which]),
                "n_tokens": pa.array(np.full(F, self.n_tokens, np.int64)),
                "n_firing": pa.array(self.counts[f0 - self.lo : f1 - self.lo]),
                "max_activation": pa.array(max_act),
                "examples": pa.ListArray.from_arrays(pa.array(offsets), examples),
            }
        )
        return schema.conform(table, schema.FEATURES)


def _decile_samples(smp: pa.Table, top: pa.Table, max_act: np.ndarray, per_decile: int, first: int = 0):
    """Decile samples: drop contexts already among the feature's top examples, bin the
    reservoir by ceil(10·value/max), keep the first `per_decile` keys per bin (`max_act`:
    of the features first, first+1, ...). Returns (rows, their features, deciles, ranks
    within each feature)."""
    if not (smp.num_rows and per_decile):
        return smp.slice(0, 0), np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64)
    tf = top.column("feature").to_numpy()
    sf = smp.column("feature").to_numpy()
    sc = smp.column("context_id").to_numpy()
    span = int(max(sc.max(), top.column("context_id").to_numpy().max() if top.num_rows else 0)) + 1
    in_top = np.isin(sf * span + sc, tf * span + top.column("context_id").to_numpy())
    smp = smp.filter(pa.array(~in_top))
    sf = smp.column("feature").to_numpy()
    sv = smp.column("value").to_numpy()
    dec = np.clip(np.ceil(10 * sv / np.maximum(max_act[sf - first], 1e-30)), 1, 10).astype(np.int8)
    order = np.lexsort((smp.column("key").to_numpy(), -dec, sf))
    smp = smp.take(pa.array(order))
    sf, dec = sf[order], dec[order]
    keep = _rank_within(sf * 16 + dec) < per_decile
    smp, sf, dec = smp.filter(pa.array(keep)), sf[keep], dec[keep]
    return smp, sf, dec, _rank_within(sf)


def _examples(top: pa.Table, smp: pa.Table, feat: np.ndarray, rank: np.ndarray, dec: np.ndarray, token_text):
    """Top and sample rows as one EXAMPLE struct array, ordered by (feature, kind, rank);
    returns (the feature of each example, the array)."""
    kinds = np.r_[np.zeros(top.num_rows, np.int8), np.ones(smp.num_rows, np.int8)]
    order = np.lexsort((rank, kinds, feat))
    ex = pa.concat_tables([top, smp]).take(pa.array(order))
    decile = pa.array(np.r_[np.zeros(top.num_rows, np.int8), dec][order], pa.int8(), mask=(kinds[order] == 0))
    tok_col = ex.column("tokens").combine_chunks()
    flat = tok_col.flatten().to_numpy(zero_copy_only=False)
    strs = pa.ListArray.from_arrays(tok_col.offsets, pa.array(token_text(flat), pa.string()))
    cols = [ex.column("kind").combine_chunks(), pa.array(rank[order].astype(np.int32)), decile]
    cols += [ex.column(c).combine_chunks() for c in ("context_id", "position", "value", "top_index")]
    cols += [tok_col, strs, ex.column("acts").combine_chunks(), ex.column("residual").combine_chunks()]
    return feat[order], pa.StructArray.from_arrays(cols, fields=list(schema.EXAMPLE))


# ---- the merge actors, their snapshots, and the driver's side ----------------------------

STATE_DIR = "collect_state"
COMMITTED = "COMMITTED.json"


def feature_ranges(n_features: int, n_actors: int) -> list[tuple[int, int]]:
    """Contiguous ranges [lo, hi) of the global feature index, one per merge actor (as
    equal as can be; never an empty one)."""
    n = max(1, min(n_actors, n_features))
    edges = [round(i * n_features / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


class Snapshots:
    """One merge actor's snapshots, under `<run>/collect_state/merge-NNN/`: `gen-NNNNNN/`
    (its top and sample rows, firing counts) and its commit marker `COMMITTED.json`, written
    last and atomically, naming the snapshot in force, the feature range and the contexts
    parts it covers; and the log of the calls merged since that snapshot
    (`log-NNNNNN-<instance>.arrows`, one per actor process: a restarted actor never appends
    to a log whose last call its lost predecessor may have cut short). Older snapshots and
    logs are removed once the marker has moved on."""

    def __init__(self, root: Path, part_names: list[str], lo: int, hi: int):
        self.root, self.names, self.lo, self.hi = root, part_names, lo, hi
        self.generation = 0
        self.sink = self.writer = None
        self.replayed = 0  # parts the last `load` completed from the log

    def load(self, merger: Merger) -> set[int]:
        """Restore the committed snapshot into `merger` and replay the log of the calls
        merged since; returns the parts it covers. Later calls are logged anew."""
        self.close_log()
        self.root.mkdir(parents=True, exist_ok=True)
        info = self._marker()
        if info is None:
            self.generation = 0
            self._clean(keep=None)
        else:
            index = {n: i for i, n in enumerate(self.names)}
            merger.load(self.root / info["dir"], info, {index[n] for n in info["done"]})
            self.generation = int(info["generation"])
            self._clean(keep=info["dir"])
        self.replayed = sum(merger.add(t) for path in self._logs(self.generation) for t in _read_log(path))
        self._open_log()
        return set(merger.done)

    def _marker(self) -> dict | None:
        marker = self.root / COMMITTED
        if not marker.exists():
            return None
        info = json.loads(marker.read_text())
        if info.get("parts") != self.names or (info.get("lo"), info.get("lo", 0) + info.get("n_features", 0)) != (self.lo, self.hi):
            log(f"[collect] {marker}: a snapshot of other contexts parts or features; this range starts over")
            self._clean(keep=None)
            for path in self.root.glob("log-*.arrows"):
                path.unlink()
            marker.unlink()
            return None
        return info

    def log(self, rows: pa.Table) -> None:
        """Append a call's rows to the log, on disk (fsync) before the call is answered."""
        if self.writer is None:
            return
        for batch in schema.conform(rows, schema.CANDIDATES).combine_chunks().to_batches():  # one batch: a call replays whole
            self.writer.write_batch(batch)
        self.sink.flush()
        os.fsync(self.sink.fileno())

    def save(self, merger: Merger) -> dict:
        name = f"gen-{self.generation + 1:06d}"
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        info = merger.save(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        os.replace(tmp, self.root / name)
        done = sorted(self.names[i] for i in merger.done)
        marker = {"generation": self.generation + 1, "dir": name, "parts": self.names, "done": done, **info}
        write_json_atomic(marker, self.root / COMMITTED)
        self.generation += 1
        self.close_log()
        self._open_log()
        self._clean(keep=name)
        return {"dir": self.root.name, "generation": self.generation, "done": done}

    def _logs(self, generation: int) -> list[Path]:
        return sorted(self.root.glob(f"log-{generation:06d}-*.arrows"))

    def _open_log(self) -> None:
        self.sink = open(self.root / f"log-{self.generation:06d}-{uuid.uuid4().hex[:12]}.arrows", "wb")
        self.writer = pa.ipc.new_stream(self.sink, schema.CANDIDATES)

    def close_log(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.sink.close()
        self.sink = self.writer = None

    def _clean(self, keep: str | None) -> None:
        """Remove the snapshots but `keep` and the logs of other generations than the one in force."""
        for d in self.root.iterdir():
            if d.name != keep and (d.name.startswith("gen-") or d.name.endswith(".tmp")):
                shutil.rmtree(d) if d.is_dir() else d.unlink()
            elif d.name.startswith("log-") and not d.name.startswith(f"log-{self.generation:06d}-"):
                d.unlink()


def _read_log(path: Path):
    """The calls of a log, one table each, up to the first one cut short (a process killed
    while it wrote: that call was never answered, and is retried)."""
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except (pa.ArrowInvalid, OSError):  # empty, or cut short in its schema
        return
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (pa.ArrowInvalid, OSError):
            return
        yield pa.Table.from_batches([batch])


class MergeActor:
    """A Ray actor owning the features [lo, hi) of the global index: the workers push it the
    candidate rows of that range (`add`: a call per forward batch, then the part's counts),
    it merges them (`Merger`), snapshots them (`save`, `Snapshots`) and writes their rows of
    the features table (`write_features`). It ignores SIGINT: a Ctrl-C to the process group
    stops the driver, which then asks every merge actor for a last snapshot."""

    def __init__(self, index: int, lo: int, hi: int, collect: dict, part_sizes: dict[int, int], state_root: str,
                 part_names: list[str]):
        import signal

        import ray

        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        self.index, self.lo, self.hi = index, lo, hi
        self.cfg, self.part_sizes = CollectConfig(**collect), {int(k): v for k, v in part_sizes.items()}
        self.merger = self._fresh()
        self.snapshots = Snapshots(Path(state_root) / f"merge-{index:03d}", part_names, lo, hi)
        if ray.get_runtime_context().was_current_actor_reconstructed:  # (its node was lost: see the module docstring)
            done, replayed = len(self.load()), self.snapshots.replayed
            snap = f"its snapshot of {done - replayed} parts + " if self.snapshots.generation else "no snapshot yet; "
            progress.started(f"merge actor {index}", verb="restored", detail=f" ({snap}{replayed} parts replayed from its log)")
        else:
            progress.started(f"merge actor {index}")

    def _fresh(self) -> Merger:
        return Merger(self.hi - self.lo, self.cfg, part_sizes=self.part_sizes, lo=self.lo)

    def load(self) -> list[int]:
        """Its state from its snapshot and log (a rerun, or a restart after its node was lost)."""
        self.merger = self._fresh()
        return sorted(self.snapshots.load(self.merger))

    def add(self, rows: pa.Table, known_thresholds: int):
        """Merge one part's rows (logged first); answers with the thresholds when newer than the worker's."""
        self.snapshots.log(rows)
        self.merger.add(rows)
        return self.merger.thresholds(known_thresholds)

    def save(self) -> dict:
        return self.snapshots.save(self.merger)

    def status(self) -> dict:
        m = self.merger
        return {"done": sorted(m.done), "pending": sorted(m.pending), "n_tokens": m.n_tokens, "rows_in": m.rows_in,
                "firing": int((m.counts > 0).sum()), "replayed": self.snapshots.replayed}

    def token_ids(self) -> np.ndarray:
        """The distinct token ids in this range's example windows (the driver decodes them)."""
        return self.merger.token_ids()

    def write_features(self, features_dir: str, dictionaries: list, model_id: str, texts: dict[int, str],
                       rows_per_file: int = 4096) -> int:
        """This range's rows of the features table (`texts`: the text of every token id in
        its windows): `part-NNN-MMMMM.parquet` (NNN: this actor), each written to a temp
        name, then renamed. Returns the files written."""
        out = Path(features_dir)
        n = 0
        for n, table in enumerate(self.merger.features_tables(dictionaries, model_id, lambda ids: [texts[int(i)] for i in ids],
                                                              chunk=rows_per_file), 1):
            tmp = out / f".part-{self.index:03d}-{n - 1:05d}.parquet.tmp"
            pq.write_table(table, tmp)
            tmp.rename(out / f"part-{self.index:03d}-{n - 1:05d}.parquet")
        return n


class MergePool:
    """The driver's side of the merge actors: their handles and ranges, and counters only
    (no candidate rows)."""

    def __init__(self, ranges: list[tuple[int, int]], cfg: CollectConfig, part_sizes: dict[int, int], state_root: Path,
                 part_names: list[str]):
        import ray

        self.ranges = ranges
        # restarted on another node when its own is lost (it restores itself: module docstring)
        cls = ray.remote(MergeActor).options(num_cpus=cfg.merge_num_cpus, resources=dict(cfg.merge_resources) or None,
                                             **ACTOR_FAULT_TOLERANCE)
        self.handles = [cls.remote(i, lo, hi, cfg.model_dump(), part_sizes, str(state_root), part_names)
                        for i, (lo, hi) in enumerate(ranges)]
        self.part_sizes = part_sizes
        self.done: set[int] = set()  # parts merged by every actor
        self.saved: set[int] = set()  # ... and covered by every actor's last snapshot

    def load(self) -> set[int]:
        import ray

        sets = [set(d) for d in ray.get([h.load.remote() for h in self.handles])]
        self.done = set.intersection(*sets)
        self.saved = set(self.done)
        return set(self.done)

    def receipt(self, table: pa.Table) -> None:
        self.done.update(int(p) for p in table.column("part").to_pylist())

    def save(self) -> list[dict]:
        import ray

        return ray.get([h.save.remote() for h in self.handles])

    def status(self) -> list[dict]:
        import ray

        return ray.get([h.status.remote() for h in self.handles])

    def write_features(self, features_dir: Path, dictionaries: list, model_id: str, tokenizer) -> int:
        """Every actor writes its range's rows; the token texts come from the driver's
        tokenizer, decoded once per distinct id (`models.lm.token_texts`), so that the merge
        actors never load a tokenizer (nor torch and transformers)."""
        import ray

        ids = np.unique(np.concatenate([np.zeros(0, np.int64)] + ray.get([h.token_ids.remote() for h in self.handles]))).tolist()
        texts = ray.put(dict(zip(ids, tokenizer.batch_decode([[i] for i in ids]))))
        return sum(ray.get([h.write_features.remote(str(features_dir), dictionaries, model_id, texts) for h in self.handles]))

    def close(self) -> None:
        import ray

        for h in self.handles:
            ray.kill(h)


class Checkpoints:
    """The driver's snapshot rounds: every merge actor snapshots its own state (`Snapshots`),
    then the driver writes the summary marker `collect_state/COMMITTED.json` (the parts
    every actor's snapshot covers; resume reads the actors' own markers). A round is taken
    when a part has completed and `collect.checkpoint_s` has passed or
    `collect.checkpoint_contexts` contexts were merged since the previous one, but never
    sooner than 10 × the last round's time: a wide dictionary's state (262k features ×
    (top_k + reservoir) windows) takes a while to write, and snapshots never take more
    than ~10% of the stage. A stop (SIGINT, SIGTERM: KeyboardInterrupt) takes one too
    (`_merge_stream`)."""

    def __init__(self, root: Path, part_names: list[str], interval_s: float, every_contexts: int | None = None):
        self.root, self.names = root, part_names
        self.interval, self.every = interval_s, every_contexts
        self.generation = 0
        self.last, self.cost, self.written = time.monotonic(), 0.0, 0

    def due(self, pool: MergePool) -> bool:
        since = time.monotonic() - self.last
        if since < 10 * self.cost:
            return False
        new = sum(pool.part_sizes.get(p, 0) for p in pool.done - pool.saved)
        return since >= self.interval or (self.every is not None and new >= self.every)

    def save(self, pool: MergePool) -> None:
        t0 = time.monotonic()
        received = set(pool.done)
        infos = pool.save()
        common = set.intersection(*(set(i["done"]) for i in infos))
        self.root.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        write_json_atomic({"generation": self.generation, "parts": self.names, "done": sorted(common),
                           "actors": [{"dir": i["dir"], "generation": i["generation"], "range": list(r)}
                                      for i, r in zip(infos, pool.ranges)]}, self.root / COMMITTED)
        pool.saved = received
        self.last = time.monotonic()
        self.cost, self.written = self.last - t0, self.written + 1
