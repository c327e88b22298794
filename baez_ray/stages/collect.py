"""collect: run the base model and one or more SAEs (`saes:`, each at its layer) over a
corpus; keep, per feature of each SAE, its top-k examples, examples sampled across
activation deciles, and firing counts.

Path of the data:

    corpus files ──write_contexts──▶ contexts/ (Parquet: context_id, tokens)
    contexts parts ──ray.data (rows (path, part), one block per part)──▶ map_batches(CollectWorker,
             actor pool: each actor reads the parts it is given)
             ──▶ candidate rows (schema.CANDIDATES) ──Merger (driver)──▶ features/ (schema.FEATURES)

Each worker keeps a running top-k per feature (by the feature's max activation in a
context, ties broken by the smaller context id) and a reservoir of firing contexts per
feature (bottom-R of a hash of (seed, context, feature): a uniform sample that does not
depend on how the corpus is sharded). Per batch it emits only the entries that entered its
own top-k or reservoir, with their windows. An entry of the global top-k is necessarily in
the top-k of the worker that saw it when it saw it, so merging what the workers emit gives
the exact global result, whatever the number of workers or the order of batches; and what
a worker emits shrinks as its running top-k fills up. Memory: the workers hold O(F·k)
keys, the merger O(F·(k+R)) windows; neither grows with the corpus.

Several SAEs. A worker runs the base model once per batch, as far as the deepest layer an
SAE reads (hooks capture every layer read, `models.lm.ResidualReader`), and each SAE
encodes its layer's residual into its own running state. The candidate rows and the merge
number the features of all SAEs with one index (SAE i's feature f is f + the features of
the SAEs before it), so the merge, its snapshots and its memory bound (O(F·(k+R)) with F
the sum over the SAEs: the bound of each SAE, added) are those of one SAE; the features
table gives every row back its SAE's id, layer and own feature number.

Resume and faults. The same argument holds for a worker that starts empty in the middle of
the corpus (a restarted actor, or a rerun): it emits a superset of what it would have, and
duplicates of a (feature, context) are dropped by the merge. Firing counts are counted per
contexts part, once. So the driver snapshots its merge state with the set of parts it
covers (`Checkpoints`: `collect_state/`, commit marker written last), and a rerun after a
crash merges only the other parts into the restored state: the features table equals that
of an uninterrupted run (each part is always run in the same forward-pass batches).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from baez_ray import progress, schema
from baez_ray.config import CollectConfig, ModelConfig, SAEConfig
from baez_ray.models.lm import token_texts
from baez_ray.models.sae import n_sae_features
from baez_ray.ray_pool import actor_map
from baez_ray.rundir import fsync_path, log, write_json_atomic, write_table

EMPTY_SAMPLE = 2.0  # reservoir keys live in [0, 1)
ACTS_BUDGET = 2**28  # SAE activations held at once (elements): 1 GiB of float32


def hash_keys(context_ids: torch.Tensor, n_features: int, seed: int) -> torch.Tensor:
    """Uniform [0,1) float64 keys for every (context, feature): splitmix64 of the pair.
    [B] context ids → [F, B] keys."""
    f = torch.arange(n_features, dtype=torch.int64, device=context_ids.device)[:, None]
    x = context_ids[None, :] * 0x9E3779B1 + f * 0x85EBCA77 + (seed + 1) * 0x27D4EB2F165667C5
    mask30, mask37, mask33 = (1 << 34) - 1, (1 << 37) - 1, (1 << 33) - 1
    x = x ^ ((x >> 30) & mask30)  # logical shifts on int64 (arithmetic >> then mask)
    x = x * -4658895280553007687  # 0xBF58476D1CE4E5B9 as signed int64
    x = x ^ ((x >> 27) & mask37)
    x = x * -7723592293110705685  # 0x94D049BB133111EB
    x = x ^ ((x >> 31) & mask33)
    return ((x >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53)


def merge_topk(state_key, state_ctx, cand_key, cand_ctx, largest: bool):
    """Merge candidates [F, B] into a running top-k state [F, k]: best keys first, ties to
    the smaller context id. Returns the new state and, per kept slot, the index it came from
    (>= k: a candidate)."""
    k = state_key.shape[1]
    keys = torch.cat([state_key, cand_key], dim=1)
    ctxs = torch.cat([state_ctx, cand_ctx.expand(cand_key.shape[0], -1)], dim=1)
    o1 = torch.argsort(ctxs, dim=1, stable=True)
    o2 = torch.argsort(torch.gather(keys, 1, o1), dim=1, descending=largest, stable=True)
    order = torch.gather(o1, 1, o2)[:, :k]
    return torch.gather(keys, 1, order), torch.gather(ctxs, 1, order), order


def _list_array(values: np.ndarray, lengths: np.ndarray, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_.value_type))


class _Dictionary:
    """One SAE inside a CollectWorker: the block it reads, its features' place in the
    candidate rows (features offset .. offset+F-1: one index over every SAE of the run), and
    its running top-k and reservoir. Each SAE's state is its own: a run of several SAEs
    gives each the numbers a run of it alone gives."""

    def __init__(self, sae, layer: int, n_features: int, offset: int, cfg: CollectConfig, device: str):
        self.sae, self.layer, self.F, self.offset = sae, layer, n_features, offset
        self.dtype = next(sae.parameters()).dtype
        self.keep_residual = cfg.keeps_residual(layer)
        k, r = cfg.top_k, cfg.reservoir
        self.top_key = torch.zeros(n_features, k, device=device)  # 0: empty (values > 0 only)
        self.top_ctx = torch.full((n_features, k), -1, dtype=torch.int64, device=device)
        self.smp_key = torch.full((n_features, r), EMPTY_SAMPLE, dtype=torch.float64, device=device)
        self.smp_ctx = torch.full((n_features, r), -1, dtype=torch.int64, device=device)


class CollectWorker:
    """Ray Data actor: contexts in, candidate rows out (see module docstring). One forward
    pass per batch reads every SAE's layer (`ResidualReader` stops after the deepest)."""

    def __init__(self, model: dict, saes: list[dict], collect: dict, seed: int, n_features: list[int], bos_id: int | None,
                 threads: int):
        from baez_ray.models.lm import ResidualReader
        from baez_ray.models.sae import load_sae

        torch.set_num_threads(threads)
        self.cfg = CollectConfig(**collect)
        cfgs = [SAEConfig(**s) for s in saes]
        self.lm = ResidualReader(ModelConfig(**model), layers=[c.layer for c in cfgs])
        self.device = self.lm.device
        offsets = np.r_[0, np.cumsum(n_features)].astype(int)
        self.dicts = [_Dictionary(load_sae(c, self.device, self.lm.d_model), c.layer, n, int(o), self.cfg, self.device)
                      for c, n, o in zip(cfgs, n_features, offsets)]
        self.F, self.seed, self.bos_id = int(offsets[-1]), seed, bos_id

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Candidate rows out, for either contexts parts to read (columns `path`, `part`:
        what `collect` sends, one part per call) or contexts given inline (columns
        `context_id`, `tokens`, and optionally `part`). The contexts of each part are run
        in forward passes of `batch_size` in context order, so a part gives the same
        numbers whichever actor runs it and whatever else that actor ran before."""
        if "path" in batch:
            out = []
            for path, part in zip(batch["path"], batch["part"]):
                tokens, cids = read_part(str(path))
                out += self._part(tokens, cids, int(part))
        else:
            tokens = np.stack(batch["tokens"]).astype(np.int64)
            cids = np.asarray(batch["context_id"], dtype=np.int64)
            parts = np.asarray(batch["part"], dtype=np.int64) if "part" in batch else np.full(len(cids), -1, np.int64)
            out = []
            for p in np.unique(parts):
                idx = np.flatnonzero(parts == p)
                idx = idx[np.argsort(cids[idx], kind="stable")]
                out += self._part(tokens[idx], cids[idx], int(p))
        return pa.concat_tables([schema.conform(t, schema.CANDIDATES) for t in out])

    def _part(self, tokens: np.ndarray, cids: np.ndarray, part: int) -> list[pa.Table]:
        B, T = tokens.shape
        counts = torch.zeros(self.F, dtype=torch.int64, device=self.device)
        parts = []
        for s in range(0, B, self.cfg.batch_size):
            ids = torch.from_numpy(tokens[s : s + self.cfg.batch_size]).to(self.device)
            ctx = torch.from_numpy(cids[s : s + self.cfg.batch_size]).to(self.device)
            resid = self.lm.residuals(ids)
            progress.tick(ids.numel())  # progress hook: tokens through the model, for the driver's bar
            for d in self.dicts:
                # the SAE's activations of a wide dictionary do not fit for a whole batch
                # (8 × 1024 tokens × 262k features): encode and merge a few contexts at a
                # time; merging sub-batch by sub-batch gives the same result
                step = max(1, ACTS_BUDGET // (T * d.F))
                for i in range(0, ids.shape[0], step):
                    sl = slice(i, i + step)
                    parts += self._merge(d, ids[sl], ctx[sl], resid[d.layer][sl], counts[d.offset : d.offset + d.F])
        # firing counts; feature -1 carries the number of tokens seen, feature -2 the number
        # of contexts; `context_id` carries the contexts part (-1: not tracked), so the merge
        # counts each part once and knows when a part is complete (see Merger.add)
        nz = torch.nonzero(counts).flatten()
        feats = np.concatenate([[-2, -1], nz.cpu().numpy()]).astype(np.int64)
        cnt = np.concatenate([[B, B * T], counts[nz].cpu().numpy()]).astype(np.int64)
        n = len(feats)
        parts.append(
            pa.table(
                {
                    "kind": pa.array(["count"] * n),
                    "feature": feats,
                    "value": np.zeros(n, np.float32),
                    "key": np.zeros(n, np.float64),
                    "context_id": np.full(n, part, np.int64),
                    "position": np.zeros(n, np.int32),
                    "top_index": np.zeros(n, np.int32),
                    "count": cnt,
                }
            )
        )
        return parts

    def _merge(self, d: _Dictionary, ids, ctx, resid, counts) -> list[pa.Table]:
        acts = d.sae.encode(resid.to(d.dtype))[..., : d.F].float()
        if self.cfg.ignore_bos and self.bos_id is not None:
            acts[ids == self.bos_id] = 0.0
        vmax, pmax = acts.max(dim=1)  # [b, F]: each feature's max in each context
        fires = vmax > 0
        counts += (acts > 0).sum(dim=(0, 1))
        parts = []
        # top-k by value
        cand = torch.where(fires, vmax, torch.full_like(vmax, -1.0)).T  # [F, b]
        d.top_key, d.top_ctx, order = merge_topk(d.top_key, d.top_ctx, cand, ctx[None, :], largest=True)
        new = (order >= self.cfg.top_k) & (d.top_key > 0)
        kept = resid if d.keep_residual else None
        parts.append(self._emit("top", new, order - self.cfg.top_k, ids, ctx, acts, vmax, pmax, kept, d.top_key, d.offset))
        # reservoir of firing contexts by hashed key (of the SAE's own feature index)
        if self.cfg.reservoir:
            keys = hash_keys(ctx, d.F, self.seed)
            cand = torch.where(fires.T, keys, torch.full_like(keys, EMPTY_SAMPLE + 1))
            d.smp_key, d.smp_ctx, order = merge_topk(d.smp_key, d.smp_ctx, cand, ctx[None, :], largest=False)
            new = (order >= self.cfg.reservoir) & (d.smp_key < 1.0)
            parts.append(self._emit("sample", new, order - self.cfg.reservoir, ids, ctx, acts, vmax, pmax, None, d.smp_key, d.offset))
        return parts

    def _emit(self, kind, new, src, ids, ctx, acts, vmax, pmax, resid, state_key, offset: int) -> pa.Table:
        """Candidate rows of the entries `new` of a state; `resid`: store the residual of
        the first `residual_top_n` slots (None: store none)."""
        f_idx, slot = torch.nonzero(new, as_tuple=True)
        b = src[f_idx, slot]
        pos = pmax[b, f_idx]
        W, left, T = self.cfg.window, self.cfg.window_left, ids.shape[1]
        start = pos - left
        offs = start[:, None] + torch.arange(W, device=ids.device)[None, :]
        valid = (offs >= 0) & (offs < T)
        offs_c = offs.clamp(0, T - 1)
        win_acts = acts[b[:, None], offs_c, f_idx[:, None]]
        win_toks = ids[b[:, None], offs_c]
        lengths = valid.sum(1).cpu().numpy()
        valid_np = valid.cpu().numpy()
        residual = None
        if resid is not None:
            keep = (slot < self.cfg.residual_top_n).cpu().numpy()
            vecs = resid[b, pos].float().cpu().numpy()
            d = vecs.shape[1]
            offsets = np.zeros(len(keep) + 1, dtype=np.int32)
            np.cumsum(np.where(keep, d, 0), out=offsets[1:])
            residual = pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(vecs[keep].reshape(-1), pa.float32()), mask=pa.array(~keep)
            )
        return pa.Table.from_pydict(
            {
                "kind": pa.array([kind] * len(b), pa.string()),
                "feature": f_idx.cpu().numpy().astype(np.int64) + offset,
                "value": vmax[b, f_idx].cpu().numpy().astype(np.float32),
                "key": state_key[f_idx, slot].double().cpu().numpy(),
                "context_id": ctx[b].cpu().numpy(),
                "position": pos.cpu().numpy().astype(np.int32),
                "top_index": (pos - start.clamp(min=0)).cpu().numpy().astype(np.int32),
                "tokens": _list_array(win_toks.cpu().numpy()[valid_np].astype(np.int32), lengths, pa.list_(pa.int32())),
                "acts": _list_array(win_acts.cpu().numpy()[valid_np].astype(np.float32), lengths, pa.list_(pa.float32())),
                "residual": residual if residual is not None else pa.nulls(len(b), pa.list_(pa.float32())),
                "count": np.zeros(len(b), np.int64),
            }
        )


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
    """Driver-side merge of candidate rows into the global result, in bounded memory.

    Counts are kept per contexts part (the `context_id` of count rows, see CollectWorker):
    a part's firing and token counts are added once, when its every context has been
    counted, and a part reported again (a retried task) is ignored. `done` is then the set
    of parts fully merged, and `save` / `load` a snapshot that covers exactly them. Top and
    sample rows of parts still in flight may be in a snapshot too: they are true candidates,
    and the same row sent again by a rerun is dropped as a duplicate of its (feature,
    context), so resuming from a snapshot gives the same table as an uninterrupted run."""

    def __init__(self, n_features: int, cfg: CollectConfig, buffer_rows: int | None = None,
                 part_sizes: dict[int, int] | None = None):
        self.F, self.cfg = n_features, cfg
        self.counts = np.zeros(n_features, dtype=np.int64)
        self.n_tokens = 0
        self.top: list[pa.Table] = []
        self.smp: list[pa.Table] = []
        self.buffered = 0
        self.buffer_rows = buffer_rows or max(50_000, n_features * (cfg.top_k + cfg.reservoir))
        self.rows_in = 0
        self.part_sizes = part_sizes or {}  # part → contexts in it
        self.done: set[int] = set()
        self.pending: dict[int, list] = {}  # part → [contexts counted, [(features, counts)]]

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
        self.rows_in += top.num_rows + smp.num_rows
        if self.buffered > self.buffer_rows:
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
        np.add.at(self.counts, feat[feat >= 0], c[feat >= 0])

    def compact(self) -> None:
        empty = schema.empty(schema.CANDIDATES)
        self.top = [_select(pa.concat_tables(self.top or [empty]), self.cfg.top_k, largest=True)]
        self.smp = [_select(pa.concat_tables(self.smp or [empty]), self.cfg.reservoir, largest=False)]
        self.buffered = 0

    def save(self, path: Path) -> dict:
        """Write the merge state of the parts in `done` into the new directory `path`;
        returns what the commit marker records besides the directory."""
        self.compact()
        path.mkdir(parents=True)
        pq.write_table(self.top[0], path / "top.parquet")
        pq.write_table(self.smp[0], path / "sample.parquet")
        np.save(path / "counts.npy", self.counts)
        return {"n_features": self.F, "n_tokens": self.n_tokens, "rows_in": self.rows_in}

    def load(self, path: Path, info: dict, done: set[int]) -> None:
        self.top = [schema.conform(pq.read_table(path / "top.parquet"), schema.CANDIDATES)]
        self.smp = [schema.conform(pq.read_table(path / "sample.parquet"), schema.CANDIDATES)]
        counts = np.load(path / "counts.npy")
        if counts.shape != (self.F,):
            raise ValueError(f"{path}: counts of {counts.shape[0]} features, expected {self.F}")
        self.counts = counts
        self.n_tokens, self.rows_in = int(info["n_tokens"]), int(info["rows_in"])
        self.done, self.pending, self.buffered = set(done), {}, 0

    def features_table(self, dictionaries: list[tuple[str, int, int]], model_id: str, token_text) -> pa.Table:
        """The FEATURES table of every SAE: `dictionaries` is (sae id, layer, features) of
        each, in the order of their features in the merge (SAE i's feature f is merge
        feature f + the features of the SAEs before it); non-firing features have no
        examples."""
        self.compact()
        top, smp, F = self.top[0], self.smp[0], self.F
        max_act = np.zeros(F, np.float32)
        tf = top.column("feature").to_numpy()
        first = np.r_[True, tf[1:] != tf[:-1]] if len(tf) else np.zeros(0, bool)
        max_act[tf[first]] = top.column("value").to_numpy()[first]
        top_rank = _rank_within(tf)
        # a residual is emitted when an example enters a worker's top-n; keep it only where
        # the example is still in the global top-n
        res = top.column("residual").combine_chunks()
        drop = pa.array(top_rank >= self.cfg.residual_top_n)
        top = top.set_column(top.schema.get_field_index("residual"), "residual", pc.if_else(drop, pa.nulls(len(res), res.type), res))
        smp, sf, dec, smp_rank = _decile_samples(smp, top, max_act, self.cfg.samples_per_decile)
        feat, examples = _examples(top, smp, np.r_[tf, sf].astype(np.int64), np.r_[top_rank, smp_rank], dec, token_text)
        per_feature = np.bincount(feat, minlength=F)
        offsets = np.zeros(F + 1, np.int32)
        np.cumsum(per_feature, out=offsets[1:])
        sizes = [n for _, _, n in dictionaries]
        if sum(sizes) != F:
            raise ValueError(f"collect: {sum(sizes)} features in the SAEs named, {F} merged")
        starts = np.repeat(np.r_[0, np.cumsum(sizes)[:-1]], sizes).astype(np.int64)
        table = pa.table(
            {
                "sae_id": pa.array(np.repeat([i for i, _, _ in dictionaries], sizes).astype(object), pa.string()),
                "model_id": pa.array([model_id] * F),
                "layer": pa.array(np.repeat([layer for _, layer, _ in dictionaries], sizes).astype(np.int32)),
                "feature": pa.array(np.arange(F, dtype=np.int64) - starts),
                "n_tokens": pa.array(np.full(F, self.n_tokens, np.int64)),
                "n_firing": pa.array(self.counts),
                "max_activation": pa.array(max_act),
                "examples": pa.ListArray.from_arrays(pa.array(offsets), examples),
            }
        )
        return schema.conform(table, schema.FEATURES)


def _decile_samples(smp: pa.Table, top: pa.Table, max_act: np.ndarray, per_decile: int):
    """Decile samples: drop contexts already among the feature's top examples, bin the
    reservoir by ceil(10·value/max), keep the first `per_decile` keys per bin. Returns
    (rows, their features, deciles, ranks within each feature)."""
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
    dec = np.clip(np.ceil(10 * sv / np.maximum(max_act[sf], 1e-30)), 1, 10).astype(np.int8)
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


def read_part(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One contexts part → (tokens [n, context_len] int64, context ids [n]), in context order."""
    t = pq.read_table(path, schema=schema.CONTEXTS)
    cids = t.column("context_id").to_numpy()
    tok = t.column("tokens").combine_chunks()
    n = len(cids)
    tokens = tok.flatten().to_numpy().astype(np.int64).reshape(n, -1) if n else np.zeros((0, 0), np.int64)
    order = np.argsort(cids, kind="stable")
    return tokens[order], cids[order].astype(np.int64)


# ---- resume inside the stage ------------------------------------------------------------

STATE_DIR = "collect_state"
COMMITTED = "COMMITTED.json"


class Checkpoints:
    """Snapshots of the merge state under `<run>/collect_state/`: `gen-NNNNNN/` (top and
    sample rows, firing counts) and the commit marker `COMMITTED.json`, written last and
    atomically, naming the snapshot in force and the contexts parts it covers. A snapshot
    is taken when a part has completed and `collect.checkpoint_s` has passed or
    `collect.checkpoint_contexts` contexts were merged since the previous one, but never
    sooner than 10 × the last snapshot's time: a wide dictionary's state (262k features ×
    (top_k + reservoir) windows) takes a while to write, and snapshots never take more
    than ~10% of the stage. A stop (SIGINT, SIGTERM: KeyboardInterrupt) takes one too
    (`_merge_stream`). Older snapshots are removed once the marker has moved on."""

    def __init__(self, root: Path, part_names: list[str], interval_s: float, every_contexts: int | None = None):
        self.root, self.names = root, part_names
        self.interval, self.every = interval_s, every_contexts
        self.generation = 0
        self.last, self.cost, self.written = time.monotonic(), 0.0, 0
        self.saved_parts: set[int] = set()

    def load(self, merger: Merger) -> int:
        """Restore the committed snapshot into `merger`; returns the parts it covers."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / COMMITTED
        if not marker.exists():
            self._clean(keep=None)
            return 0
        info = json.loads(marker.read_text())
        if info.get("parts") != self.names or info.get("n_features") != merger.F:
            log(f"[collect] {marker}: a snapshot of other contexts parts or features; starting the stage over")
            self._clean(keep=None)
            marker.unlink()
            return 0
        index = {n: i for i, n in enumerate(self.names)}
        merger.load(self.root / info["dir"], info, {index[n] for n in info["done"]})
        self.generation = int(info["generation"])
        self.saved_parts = set(merger.done)
        self._clean(keep=info["dir"])
        return len(merger.done)

    def due(self, merger: Merger) -> bool:
        since = time.monotonic() - self.last
        if since < 10 * self.cost:
            return False
        new = sum(merger.part_sizes.get(p, 0) for p in merger.done - self.saved_parts)
        return since >= self.interval or (self.every is not None and new >= self.every)

    def save(self, merger: Merger) -> None:
        t0 = time.monotonic()
        name = f"gen-{self.generation + 1:06d}"
        tmp = self.root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        info = merger.save(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        os.replace(tmp, self.root / name)
        done = sorted(self.names[i] for i in merger.done)
        write_json_atomic({"generation": self.generation + 1, "dir": name, "parts": self.names, "done": done, **info},
                          self.root / COMMITTED)
        self.generation += 1
        self._clean(keep=name)
        self.last = time.monotonic()
        self.cost, self.written = self.last - t0, self.written + 1
        self.saved_parts = set(merger.done)

    def _clean(self, keep: str | None) -> None:
        for d in self.root.iterdir():
            if d.name != keep and (d.name.startswith("gen-") or d.name.endswith(".tmp")):
                shutil.rmtree(d) if d.is_dir() else d.unlink()


def _worker_stream(part_paths: list[Path], todo: list[int], model: ModelConfig, saes: list[SAEConfig], cfg: CollectConfig,
                   seed: int, n_features: list[int], bos_id: int | None):
    """The candidate rows of the contexts parts `todo`, from an actor pool of CollectWorkers."""
    import ray

    # one row and one block per contexts part, and the actors read their parts themselves:
    # no read tasks, so the stage's processes are the driver and `num_actors` actors
    # whatever the corpus length (a read task per part made Ray start a worker process
    # per part, all at once). Each actor call takes one whole part (batch_size=None) and
    # runs it in forward passes of batch_size.
    ds = ray.data.from_items([{"path": str(part_paths[i]), "part": i} for i in todo], override_num_blocks=len(todo))
    kwargs = dict(model=model.model_dump(), saes=[s.model_dump() for s in saes], collect=cfg.model_dump(), seed=seed,
                  n_features=n_features, bos_id=bos_id, threads=max(1, math.ceil(model.num_cpus)))
    # a restarted actor starts with an empty running top-k: it emits more candidates, never
    # fewer, and its part is counted once (Merger.add)
    return actor_map(ds, CollectWorker, kwargs, size=cfg.num_actors, num_cpus=model.num_cpus, num_gpus=model.num_gpus,
                     resources=model.resources, batch_format="numpy", fault_tolerant=True)


def _merge_stream(out, merger: Merger, checkpoints: Checkpoints) -> None:
    """Merge every candidate batch, snapshot when due (progress: the workers' ticks)."""
    try:
        # prefetch_batches=0: the iterator's default read-ahead of one block held each
        # part's candidates back until the actor had finished the next part
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            if merger.add(batch) and checkpoints.due(merger):
                checkpoints.save(merger)
    except KeyboardInterrupt:  # SIGINT / SIGTERM: keep what is merged, for the rerun
        if merger.done - checkpoints.saved_parts:
            checkpoints.save(merger)
        log(f"[collect] stopped: snapshot of {len(merger.done)} of {len(checkpoints.names)} contexts parts kept for the rerun")
        raise


def collect(contexts_dir: Path, state_root: Path, features_dir: Path, model: ModelConfig, saes: list[SAEConfig],
            cfg: CollectConfig, seed: int, tokenizer, total_tokens: int) -> dict:
    """contexts/ → features/: the base model (one forward pass per batch, as far as the
    deepest SAE's layer) and every SAE over every context, top-k and decile samples merged
    per feature of each SAE (resuming from the snapshot in `state_root`). Returns the
    stage's counts."""
    per_sae = [min(cfg.features or d, d) for d in (n_sae_features(s) for s in saes)]
    n_features = sum(per_sae)
    part_paths = sorted(contexts_dir.glob("part-*.parquet"))
    sizes = {i: pq.ParquetFile(p).metadata.num_rows for i, p in enumerate(part_paths)}
    merger = Merger(n_features, cfg, part_sizes=sizes)
    checkpoints = Checkpoints(state_root, [p.name for p in part_paths], cfg.checkpoint_s, cfg.checkpoint_contexts)
    resumed = checkpoints.load(merger)
    todo = [i for i in range(len(part_paths)) if i not in merger.done]
    if resumed:
        log(f"[collect] resuming: {resumed} of {len(part_paths)} contexts parts merged by an earlier attempt")
    rates = {"startup_s": None, "steady_per_s": None}
    if todo:
        out = _worker_stream(part_paths, todo, model, saes, cfg, seed, per_sae, tokenizer.bos_token_id)
        with progress.bar("collect", total=total_tokens, unit="tok", initial=merger.n_tokens) as bar:
            _merge_stream(out, merger, checkpoints)
        rates = bar.rates()  # worker-side: when the tokens went through the model, not when they reached the driver
    if merger.pending or len(merger.done) != len(part_paths):
        missing = sorted(set(range(len(part_paths))) - merger.done)
        raise RuntimeError(f"collect: contexts parts {[part_paths[i].name for i in missing][:5]} were not fully merged: a batch was lost")
    table = merger.features_table([(s.id, s.layer, n) for s, n in zip(saes, per_sae)], model.id, token_texts(tokenizer))
    parts = write_table(table, features_dir)
    if merger.n_tokens != total_tokens:
        raise RuntimeError(f"collect saw {merger.n_tokens} tokens but the corpus has {total_tokens}: a batch was lost")
    return dict(
        features=n_features, features_per_sae={s.id: n for s, n in zip(saes, per_sae)}, tokens=merger.n_tokens, firing_features=int((merger.counts > 0).sum()),
        candidate_rows=merger.rows_in, parts=parts, resumed_parts=resumed, checkpoints=checkpoints.written,
        contexts_run=sum(sizes[i] for i in todo),
        # start-up (actors, model load, first forward batch) apart from the steady rate of
        # the forward passes after it, both from the workers' progress reports
        startup_s=rates["startup_s"], steady_tokens_per_s=rates["steady_per_s"],
    )
