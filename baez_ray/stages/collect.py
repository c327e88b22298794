"""collect: run the base model and one or more SAEs (`saes:`, each at its layer) over a
corpus; keep, per feature of each SAE, its top-k examples, examples sampled across
activation deciles, and firing counts.

Path of the data:

    corpus files ──write_contexts──▶ contexts/ (Parquet: context_id, tokens)
    contexts parts ──ray.data (rows (path, part), one block per part)──▶ map_batches(CollectWorker,
             actor pool: each actor reads the parts it is given)
             ──▶ candidate rows (schema.CANDIDATES), split by feature range, pushed by the
                 worker straight to the MergeActors (Ray actors, `stages/merge.py`, `collect.merge_actors`,
                 each owning a contiguous range of the global feature index)
             ──▶ features/ (schema.FEATURES: each merge actor writes its range's parts,
                 `part-NNN-MMMMM.parquet`; one table, read by pq.read_table(dir))
    Ray Data's output is one receipt row per part (part, contexts, tokens, rows): the
    driver keeps counters only, never a candidate row, whatever the width or corpus.

Each worker keeps a running top-k per feature (by the feature's max activation in a
context, ties broken by the smaller context id) and a reservoir of firing contexts per
feature (bottom-R of a hash of (seed, context, feature): a uniform sample that does not
depend on how the corpus is sharded). Per part it emits only the entries that entered its
own top-k or reservoir, with their windows. An entry of the global top-k is necessarily in
the top-k of the worker that saw it when it saw it, so merging what the workers emit gives
the exact global result, whatever the number of workers or the order of batches; and what
a worker emits shrinks as its running top-k fills up.

Threshold feedback. After each compaction a merge actor knows, per feature of its range,
the k-th best value among the distinct rows it has merged and the R-th smallest reservoir
key; it answers each worker's push with them (when newer than what the worker has). Both
are bounds of the final ones (the final k-th best is at least the k-th best of a subset;
the final R-th smallest key at most), so a worker drops top candidates below a feature's
threshold and reservoir candidates above its key bound: such a row cannot be in the final
top-k or reservoir, and the result stays exact (ties are kept: a tie may win on its
smaller context id).

Memory. Workers hold O(F·k + F·R) keys and encode a wide SAE a chunk of features at a time
(`_Dictionary.blocks`: at most ACTS_BUDGET activations at once, the firing counts summed
from the JumpReLU mask the encode makes anyway, no boolean copy of the activations). A
merge actor holds O(F_range·(k+R)) windows plus a buffer of `collect.merge_buffer_mb`
(compacted when full) and builds its features rows 4096 features at a time. The driver
holds counters.

Several SAEs. A worker runs the base model once per batch, as far as the deepest layer an
SAE reads (hooks capture every layer read, `models.lm.ResidualReader`), and each SAE
encodes its layer's residual into its own running state. The candidate rows and the merge
number the features of all SAEs with one index (SAE i's feature f is f + the features of
the SAEs before it), and the merge actors split that index into contiguous ranges, so the
merge, its snapshots and its memory bound (with F the sum over the SAEs) are those of one
SAE; the features table gives every row back its SAE's id, layer and own feature number.

Resume and faults. The same argument holds for a worker that starts empty in the middle of
the corpus (a restarted actor, or a rerun): it emits a superset of what it would have, and
duplicates of a (feature, context) are dropped by the merge. A worker pushes a part's rows
to the merge actors batch by batch as it runs them (without waiting: the merge runs beside
the next forward pass), then the part's counts, and returns the part's receipt once every
actor has merged all of it; a merge actor runs one worker's calls in order, so the counts,
which complete the part, come after its rows, and it counts a part's firing counts once
(`Merger.add`: a part pushed again is not counted again). Each merge actor snapshots its
own state with the set of parts it covers (`Snapshots`: `collect_state/merge-NNN/`, its
commit marker written last), in rounds the driver starts (`Checkpoints`, which then writes
the summary marker `collect_state/COMMITTED.json`); a rerun after a crash restores each actor from its own
snapshot and runs the parts some actor lacks (an actor that has a part ignores it again):
the features table equals that of an uninterrupted run (each part is always run in the
same forward-pass batches).

A lost node (docs/cluster-faults.md). Its collect workers are restarted on another node
and their parts in flight redone there (rows merged twice are duplicates, counts of a
part an actor has are ignored, as above); its merge actors restore their snapshot and
replay their log (`stages/merge.py`). The driver's bar says what was redone
(`[collect] lost node 3f2a9c1e at 12,288/16,384 tok: part 3 redone on 9bd10c44`); the
manifest counts it (`faults`, `replayed_merges`).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from baez_ray import progress, schema
from baez_ray.config import CollectConfig, ModelConfig, SAEConfig
from baez_ray.models.sae import n_sae_features
from baez_ray.ray_pool import actor_map
from baez_ray.rundir import log
from baez_ray.stages.merge import COMMITTED, EMPTY_SAMPLE, Checkpoints, MergePool, feature_ranges

ACTS_BUDGET = 2**24  # SAE activations held at once (elements): 64 MiB of float32, per block of features


def hash_keys(context_ids: torch.Tensor, n_features: int, seed: int, first: int = 0) -> torch.Tensor:
    """Uniform [0,1) float64 keys for every (context, feature): splitmix64 of the pair.
    [B] context ids → [F, B] keys of the features first .. first+F-1."""
    f = torch.arange(first, first + n_features, dtype=torch.int64, device=context_ids.device)[:, None]
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
    gives each the numbers a run of it alone gives.

    Encoding. A JumpReLU or ReLU SAE (sae-lens `JumpReLUSAE`, `StandardSAE` with a ReLU) is
    encoded a chunk of features at a time (`sae_in @ W_enc[:, a:b] + b_enc[a:b]`, the
    operations of sae-lens' encode, on a column block), so the activations held at once are
    bounded by ACTS_BUDGET whatever the width; its firing mask (pre-activation above
    max(threshold, 0), zero at BOS) is the one the activation function needs anyway, and the
    firing counts are summed from it: no boolean copy of the activations. W_dec is dropped
    (collect never decodes). Any other SAE (TopK, ...) is encoded whole per sub-batch and sliced
    into chunks; its counts come from the firing entries all the same (`_sparse_stats`)."""

    def __init__(self, sae, layer: int, n_features: int, offset: int, cfg: CollectConfig, device: str):
        self.sae, self.layer, self.F, self.offset = sae, layer, n_features, offset
        self.dtype = next(sae.parameters()).dtype
        self.keep_residual = cfg.keeps_residual(layer)
        name = type(sae).__name__
        self.chunked = name in ("JumpReLUSAE", "StandardSAE") and isinstance(getattr(sae, "activation_fn", None), torch.nn.ReLU)
        if self.chunked:
            thr = sae.threshold.detach() if name == "JumpReLUSAE" else torch.zeros(sae.W_enc.shape[1], dtype=self.dtype, device=device)
            self.min_act = thr[:n_features].clamp(min=0)  # fires ⇔ pre > max(threshold, 0) (ReLU, then the jump)
            with torch.no_grad():
                sae.W_dec.data = torch.empty(0, dtype=self.dtype, device=device)
        k, r = cfg.top_k, cfg.reservoir
        self.top_key = torch.zeros(n_features, k, device=device)  # 0: empty (values > 0 only)
        self.top_ctx = torch.full((n_features, k), -1, dtype=torch.int64, device=device)
        self.smp_key = torch.full((n_features, r), EMPTY_SAMPLE, dtype=torch.float64, device=device)
        self.smp_ctx = torch.full((n_features, r), -1, dtype=torch.int64, device=device)
        # threshold feedback from the merge actors: lower bounds of each feature's final k-th
        # best value and upper bounds of its final R-th smallest reservoir key
        self.floor_top = torch.zeros(n_features, device=device)
        self.floor_smp = torch.full((n_features,), EMPTY_SAMPLE, dtype=torch.float64, device=device)

    def blocks(self, resid: torch.Tensor, ids: torch.Tensor, bos_id: int | None):
        """(first feature, activations [b, T, c] float32, firing counts [c], each feature's
        max activation in each context [b, c] and its first position [b, c] (0 where it does
        not fire)) per feature chunk of a sub-batch of contexts.

        The counts and the per-context max / argmax come from the firing entries only
        (`_sparse_stats`: one nonzero pass over the firing mask, then scatter reductions
        over the ~50 entries per token), not from reductions over the dense block: a
        `mask.sum(dim=(0, 1))` and an `acts.max(dim=1)` over a 16M-element block cost
        ~55 + 25 ms per block on 2 threads, the sparse path ~8 ms."""
        b, T = ids.shape
        chunk = max(1, min(self.F, ACTS_BUDGET // max(1, b * T)))
        bos_rows = (ids == bos_id).reshape(-1).nonzero().squeeze(1) if bos_id is not None else None  # BOS tokens of [b·T]
        if not self.chunked:
            acts = self.sae.encode(resid.to(self.dtype))[..., : self.F].float().contiguous()
            if bos_rows is not None:
                acts.view(b * T, -1).index_fill_(0, bos_rows, 0.0)
            for a in range(0, self.F, chunk):
                block = acts[..., a : a + chunk].contiguous()  # (a view when one chunk holds every feature)
                yield a, block, *_sparse_stats(block > 0, block)
            return
        sae_in = self.sae.process_sae_in(resid)
        W, bias = self.sae.W_enc, self.sae.b_enc
        for a in range(0, self.F, chunk):
            e = min(self.F, a + chunk)
            pre = sae_in @ W[:, a:e] + bias[a:e]
            mask = pre > self.min_act[a:e]
            if bos_rows is not None:
                mask.view(b * T, e - a).index_fill_(0, bos_rows, False)  # (mask[bos] = False: ~10 ms per block)
            acts = pre.clamp_(min=0).mul_(mask).float()  # = relu(pre) · (pre > threshold), as sae-lens
            yield a, acts, *_sparse_stats(mask, acts)


def _set_entries(flat: torch.Tensor) -> torch.Tensor:
    """The indices of the set entries of a 1-d bool tensor, ascending (= `flat.nonzero()`):
    its bytes read 8 at a time as int64 words, then the bytes of the set words only. A wide
    SAE's firing mask is ~0.02% set: 1.8 ms against 10.6 ms for `nonzero` over a block of
    16M entries (2 threads); a dense mask falls back to `nonzero`."""
    n8 = flat.numel() - flat.numel() % 8
    words = flat[:n8].view(torch.int64).nonzero().squeeze(1)
    if len(words) > n8 // 64:  # more than 1 word in 8 set: not sparse
        return flat.nonzero().squeeze(1)
    r, k = flat[:n8].view(-1, 8)[words].nonzero(as_tuple=True)
    idx = words[r] * 8 + k
    if n8 < flat.numel():
        idx = torch.cat([idx, n8 + flat[n8:].nonzero().squeeze(1)])
    return idx


def _sparse_stats(mask: torch.Tensor, acts: torch.Tensor):
    """From a block's firing mask [b, T, c] and activations (> 0 exactly where the mask is
    set): firing counts [c], max activation per (context, feature) [b, c] (0: none) and the
    first position of that max [b, c] (0 where none fires): what `mask.sum(dim=(0, 1))`
    and `acts.max(dim=1)` give, from the firing entries only."""
    b, T, c = acts.shape
    flat = _set_entries(mask.reshape(-1))
    f = flat % c
    bt = flat // c
    t = bt % T
    key = (bt // T) * c + f
    v = acts.reshape(-1)[flat]
    counts = torch.bincount(f, minlength=c)
    vmax = torch.zeros(b * c, dtype=acts.dtype, device=acts.device).scatter_reduce_(0, key, v, "amax")
    top = v == vmax[key]  # ties: the first position, as torch.max / numpy argmax
    pmax = torch.full((b * c,), T, dtype=torch.int64, device=acts.device).scatter_reduce_(0, key[top], t[top], "amin")
    pmax = torch.where(vmax > 0, pmax, 0)
    return counts, vmax.view(b, c), pmax.view(b, c)


class CollectWorker:
    """Ray Data actor: contexts in, candidate rows out (see module docstring). One forward
    pass per batch reads every SAE's layer (`ResidualReader` stops after the deepest).

    With `merge` (the merge actors' handles and feature ranges, what `collect` gives) each
    part's candidate rows go straight to the merge actors, split by feature range, and the
    call returns one small receipt row per part (part, contexts, tokens, rows); each merge
    actor answers with its current thresholds (threshold feedback). Without it the call
    returns the candidate rows themselves (a worker used directly: tests, benches)."""

    def __init__(self, model: dict, saes: list[dict], collect: dict, seed: int, n_features: list[int], bos_id: int | None,
                 threads: int, merge: dict | None = None):
        from baez_ray.models.lm import ResidualReader, hold_freed_memory
        from baez_ray.models.sae import load_sae

        torch.set_num_threads(threads)
        hold_freed_memory()
        self.cfg = CollectConfig(**collect)
        cfgs = [SAEConfig(**s) for s in saes]
        self.lm = ResidualReader(ModelConfig(**model), layers=[c.layer for c in cfgs])
        self.device = self.lm.device
        offsets = np.r_[0, np.cumsum(n_features)].astype(int)
        self.dicts = [_Dictionary(load_sae(c, self.device, self.lm.d_model), c.layer, n, int(o), self.cfg, self.device)
                      for c, n, o in zip(cfgs, n_features, offsets)]
        self.F, self.seed, self.bos_id = int(offsets[-1]), seed, bos_id
        self.merge = merge
        self.thr_gen = [-1] * len(merge["handles"]) if merge else []

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Candidate rows (or receipts, see the class) for either contexts parts to read
        (columns `path`, `part`: what `collect` sends, one part per call) or contexts given
        inline (columns `context_id`, `tokens`, and optionally `part`). The contexts of each
        part are run in forward passes of `batch_size` in context order, so a part gives the
        same numbers whichever actor runs it and whatever else that actor ran before."""
        if "path" in batch:
            work = [(*read_part(str(path)), int(part)) for path, part in zip(batch["path"], batch["part"])]
        else:
            tokens = np.stack(batch["tokens"]).astype(np.int64)
            cids = np.asarray(batch["context_id"], dtype=np.int64)
            parts = np.asarray(batch["part"], dtype=np.int64) if "part" in batch else np.full(len(cids), -1, np.int64)
            work = []
            for p in np.unique(parts):
                idx = np.flatnonzero(parts == p)
                idx = idx[np.argsort(cids[idx], kind="stable")]
                work.append((tokens[idx], cids[idx], int(p)))
        out = []
        for tokens, cids, part in work:
            if part >= 0:  # (a part begun again on another node after its own was lost: the driver's bar says so)
                progress.started(f"part {part}", tokens.size)
            tables = self._part(tokens, cids, part)
            out.append(self._push(tables, part, tokens.shape) if self.merge else pa.concat_tables(list(tables)))
        return pa.concat_tables(out)

    def _push(self, tables, part: int, shape: tuple[int, int]) -> pa.Table:
        """Send a part's rows to the merge actors as they come (each forward batch's rows,
        then the part's counts: each actor its feature range, and the token and context
        counts of feature −1/−2), without waiting: the merge actors merge a batch while this
        worker runs the next. A merge actor runs one worker's calls in the order they were
        sent, so it sees a part's counts (what completes the part, `Merger.add`) after its
        every row. At the part's end, wait until each has merged everything; take the newest
        thresholds they answer with. Returns the part's receipt."""
        import ray

        refs: list[list] = [[] for _ in self.merge["handles"]]
        n_rows = 0
        for rows in tables:
            feat = rows.column("feature").to_numpy()
            n_rows += int(pc.sum(pc.not_equal(rows.column("kind"), "count")).as_py() or 0)
            for m, (lo, hi) in enumerate(self.merge["bounds"]):
                sel = (feat < 0) | ((feat >= lo) & (feat < hi))
                if sel.any():
                    refs[m].append(self.merge["handles"][m].add.remote(rows.filter(pa.array(sel)), self.thr_gen[m]))
        answers = iter(ray.get([r for rs in refs for r in rs]))
        for m, rs in enumerate(refs):
            # an actor answers only with thresholds newer than the worker's; it runs the
            # calls in order, so its last answer is its newest
            newer = [a for a in itertools.islice(answers, len(rs)) if a is not None]
            if not newer:
                continue
            self.thr_gen[m], top, smp = newer[-1]
            lo, hi = self.merge["bounds"][m]
            for d in self.dicts:
                a, e = max(lo, d.offset), min(hi, d.offset + d.F)
                if a < e:
                    d.floor_top[a - d.offset : e - d.offset] = torch.tensor(top[a - lo : e - lo], device=self.device)
                    d.floor_smp[a - d.offset : e - d.offset] = torch.tensor(smp[a - lo : e - lo], device=self.device)
        return pa.table({"part": [part], "contexts": [shape[0]], "tokens": [shape[0] * shape[1]], "rows": [n_rows]})

    def _part(self, tokens: np.ndarray, cids: np.ndarray, part: int):
        """A part's candidate rows (schema.CANDIDATES), one table per forward batch, then one
        table of its firing counts."""
        B, T = tokens.shape
        counts = torch.zeros(self.F, dtype=torch.int64, device=self.device)
        for s in range(0, B, self.cfg.batch_size):
            parts = []
            ids = torch.from_numpy(tokens[s : s + self.cfg.batch_size]).to(self.device)
            ctx = torch.from_numpy(cids[s : s + self.cfg.batch_size]).to(self.device)
            resid = self.lm.residuals(ids)
            progress.tick(ids.numel())  # progress hook: tokens through the model, for the driver's bar
            for d in self.dicts:
                # a few contexts at a time when even a chunk of 1024 features of a whole batch
                # passes the budget (long contexts), then chunks of features (see _Dictionary);
                # merging block by block gives the same result
                step = max(1, ACTS_BUDGET // (T * min(d.F, 1024)))
                for i in range(0, ids.shape[0], step):
                    sl = slice(i, i + step)
                    r = resid[d.layer][sl]
                    for a, acts, fired, vmax, pmax in d.blocks(r, ids[sl], self.bos_id if self.cfg.ignore_bos else None):
                        counts[d.offset + a : d.offset + a + acts.shape[2]] += fired
                        parts += self._merge(d, a, ids[sl], ctx[sl], r, acts, vmax, pmax)
            if parts:
                yield pa.concat_tables([schema.conform(t, schema.CANDIDATES) for t in parts])
        # firing counts; feature -1 carries the number of tokens seen, feature -2 the number
        # of contexts; `context_id` carries the contexts part (-1: not tracked), so the merge
        # counts each part once and knows when a part is complete (see Merger.add)
        nz = torch.nonzero(counts).flatten()
        feats = np.concatenate([[-2, -1], nz.cpu().numpy()]).astype(np.int64)
        cnt = np.concatenate([[B, B * T], counts[nz].cpu().numpy()]).astype(np.int64)
        n = len(feats)
        yield schema.conform(pa.table({
            "kind": pa.array(["count"] * n), "feature": feats, "value": np.zeros(n, np.float32), "key": np.zeros(n, np.float64),
            "context_id": np.full(n, part, np.int64), "position": np.zeros(n, np.int32), "top_index": np.zeros(n, np.int32),
            "count": cnt,
        }), schema.CANDIDATES)

    def _merge(self, d: _Dictionary, a: int, ids, ctx, resid, acts, vmax, pmax) -> list[pa.Table]:
        """Merge one block (features a .. a+c-1 of `d`, a sub-batch of contexts; `vmax`,
        `pmax` [b, c]: each feature's max in each context and its position) into the
        running states; only the features with a candidate that can enter are touched."""
        c = acts.shape[2]
        fires = vmax > 0
        out = []
        k, R = self.cfg.top_k, self.cfg.reservoir
        # top-k by value
        cand = torch.where(fires, vmax, torch.full_like(vmax, -1.0)).T  # [c, b]
        best = cand.max(dim=1).values
        rows = torch.nonzero((best > 0) & (best >= d.top_key[a : a + c, -1])).flatten()
        if len(rows):
            g = rows + a
            key, cx, order = merge_topk(d.top_key[g], d.top_ctx[g], cand[rows], ctx[None, :], largest=True)
            d.top_key[g], d.top_ctx[g] = key, cx
            # threshold feedback: below a feature's merged k-th best, a row cannot enter
            new = (order >= k) & (key > 0) & (key >= d.floor_top[g, None])
            kept = resid if d.keep_residual else None
            out.append(self._emit("top", rows, new, order - k, ids, ctx, acts, vmax, pmax, kept, key, d.offset + a))
        # reservoir of firing contexts by hashed key (of the SAE's own feature index)
        if R:
            keys = hash_keys(ctx, c, self.seed, first=a)
            cand = torch.where(fires.T, keys, torch.full_like(keys, EMPTY_SAMPLE + 1))
            rows = torch.nonzero(cand.min(dim=1).values <= d.smp_key[a : a + c, -1]).flatten()
            if len(rows):
                g = rows + a
                key, cx, order = merge_topk(d.smp_key[g], d.smp_ctx[g], cand[rows], ctx[None, :], largest=False)
                d.smp_key[g], d.smp_ctx[g] = key, cx
                new = (order >= R) & (key < 1.0) & (key <= d.floor_smp[g, None])
                out.append(self._emit("sample", rows, new, order - R, ids, ctx, acts, vmax, pmax, None, key, d.offset + a))
        return out

    def _emit(self, kind, rows, new, src, ids, ctx, acts, vmax, pmax, resid, state_key, offset: int) -> pa.Table:
        """Candidate rows of the entries `new` of the merged states of the block's features
        `rows`; `resid`: store the residual of the first `residual_top_n` slots (None: store
        none)."""
        r_idx, slot = torch.nonzero(new, as_tuple=True)
        f_idx = rows[r_idx]  # feature inside the block
        b = src[r_idx, slot]
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
                "key": state_key[r_idx, slot].double().cpu().numpy(),
                "context_id": ctx[b].cpu().numpy(),
                "position": pos.cpu().numpy().astype(np.int32),
                "top_index": (pos - start.clamp(min=0)).cpu().numpy().astype(np.int32),
                "tokens": _list_array(win_toks.cpu().numpy()[valid_np].astype(np.int32), lengths, pa.list_(pa.int32())),
                "acts": _list_array(win_acts.cpu().numpy()[valid_np].astype(np.float32), lengths, pa.list_(pa.float32())),
                "residual": residual if residual is not None else pa.nulls(len(b), pa.list_(pa.float32())),
                "count": np.zeros(len(b), np.int64),
            }
        )


def read_part(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One contexts part → (tokens [n, context_len] int64, context ids [n]), in context order."""
    t = pq.read_table(path, schema=schema.CONTEXTS)
    cids = t.column("context_id").to_numpy()
    tok = t.column("tokens").combine_chunks()
    n = len(cids)
    tokens = tok.flatten().to_numpy().astype(np.int64).reshape(n, -1) if n else np.zeros((0, 0), np.int64)
    order = np.argsort(cids, kind="stable")
    return tokens[order], cids[order].astype(np.int64)


def _worker_stream(part_paths: list[Path], todo: list[int], model: ModelConfig, saes: list[SAEConfig], cfg: CollectConfig,
                   seed: int, n_features: list[int], bos_id: int | None, pool: MergePool):
    """The receipts of the contexts parts `todo`, from an actor pool of CollectWorkers that
    push their candidate rows to the merge actors."""
    import ray

    # one row and one block per contexts part, and the actors read their parts themselves:
    # no read tasks, so the stage's processes are the driver, `num_actors` workers and the
    # merge actors whatever the corpus length (a read task per part made Ray start a worker
    # process per part, all at once). Each actor call takes one whole part (batch_size=None)
    # and runs it in forward passes of batch_size.
    ds = ray.data.from_items([{"path": str(part_paths[i]), "part": i} for i in todo], override_num_blocks=len(todo))
    kwargs = dict(model=model.model_dump(), saes=[s.model_dump() for s in saes], collect=cfg.model_dump(), seed=seed,
                  n_features=n_features, bos_id=bos_id, threads=max(1, math.ceil(model.num_cpus)),
                  merge={"handles": pool.handles, "bounds": pool.ranges})
    # a restarted actor starts with an empty running top-k: it emits more candidates, never
    # fewer, and its part is counted once by each merge actor (Merger.add). A part is
    # seconds to minutes of work. Two per actor in flight: the next part waits on the actor
    # while it runs one (with one, each part began 0.1-0.2 s after the last ended: Ray Data
    # polls its tasks every 0.1 s). Dispatch only once every actor is up (`all_up`), each
    # part to the least busy actor (the first actor ready took every part of a short corpus
    # while the second was still loading its model).
    return actor_map(ds, CollectWorker, kwargs, size=cfg.num_actors, num_cpus=model.num_cpus, num_gpus=model.num_gpus,
                     resources=model.resources, batch_format="numpy", fault_tolerant=True, in_flight=2, all_up=True)


def _merge_stream(out, pool: MergePool, checkpoints: Checkpoints) -> None:
    """Count the receipts (each: a part merged by every merge actor), snapshot when due
    (progress: the workers' ticks)."""
    try:
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            pool.receipt(batch)
            if batch.num_rows and checkpoints.due(pool):
                checkpoints.save(pool)
    except KeyboardInterrupt:  # SIGINT / SIGTERM: keep what is merged, for the rerun
        # always a round: the merge actors may be ahead of the receipts, and the signal may
        # have landed between a round's actor snapshots and its summary marker
        checkpoints.save(pool)
        kept = json.loads((checkpoints.root / COMMITTED).read_text())["done"]
        log(f"[collect] stopped: snapshot of {len(kept)} of {len(checkpoints.names)} contexts parts kept for the rerun")
        raise


def collect(contexts_dir: Path, state_root: Path, features_dir: Path, model: ModelConfig, saes: list[SAEConfig],
            cfg: CollectConfig, seed: int, tokenizer, total_tokens: int) -> dict:
    """contexts/ → features/: the base model (one forward pass per batch, as far as the
    deepest SAE's layer) and every SAE over every context, top-k and decile samples merged
    per feature of each SAE by the merge actors (resuming from their snapshots in
    `state_root`), who write the features table. Returns the stage's counts."""
    per_sae = [min(cfg.features or d, d) for d in (n_sae_features(s) for s in saes)]
    n_features = sum(per_sae)
    part_paths = sorted(contexts_dir.glob("part-*.parquet"))
    sizes = {i: pq.ParquetFile(p).metadata.num_rows for i, p in enumerate(part_paths)}
    names = [p.name for p in part_paths]
    pool = MergePool(feature_ranges(n_features, cfg.merge_actors), cfg, sizes, state_root, names)
    try:
        checkpoints = Checkpoints(state_root, names, cfg.checkpoint_s, cfg.checkpoint_contexts)
        resumed = pool.load()
        todo = [i for i in range(len(part_paths)) if i not in resumed]
        if resumed:
            log(f"[collect] resuming: {len(resumed)} of {len(part_paths)} contexts parts merged by an earlier attempt")
        rates = {"startup_s": None, "steady_per_s": None}
        if todo:
            out = _worker_stream(part_paths, todo, model, saes, cfg, seed, per_sae, tokenizer.bos_token_id, pool)
            initial = sum(sizes[i] for i in resumed) * (total_tokens // max(1, sum(sizes.values())))
            with progress.bar("collect", total=total_tokens, unit="tok", initial=initial) as bar:
                _merge_stream(out, pool, checkpoints)
            rates = bar.rates()  # worker-side: when the tokens went through the model, not when they reached the driver
        status = pool.status()
        for st, (lo, hi) in zip(status, pool.ranges):
            if st["pending"] or len(st["done"]) != len(part_paths):
                missing = sorted(set(range(len(part_paths))) - set(st["done"]))
                raise RuntimeError(f"collect: contexts parts {[names[i] for i in missing][:5]} were not fully merged "
                                   f"for features {lo}..{hi - 1}: a batch was lost")
            if st["n_tokens"] != total_tokens:
                raise RuntimeError(f"collect saw {st['n_tokens']} tokens but the corpus has {total_tokens}: a batch was lost")
        features_dir.mkdir(parents=True, exist_ok=True)
        for old in list(features_dir.glob("part-*.parquet")) + list(features_dir.glob(".part-*.tmp")):
            old.unlink()
        parts = pool.write_features(features_dir, [(s.id, s.layer, n) for s, n in zip(saes, per_sae)], model.id, tokenizer)
    finally:
        pool.close()
    return dict(
        features=n_features, features_per_sae={s.id: n for s, n in zip(saes, per_sae)}, tokens=status[0]["n_tokens"],
        firing_features=sum(st["firing"] for st in status), candidate_rows=sum(st["rows_in"] for st in status), parts=parts,
        resumed_parts=len(resumed), checkpoints=checkpoints.written, contexts_run=sum(sizes[i] for i in todo),
        merge_actors=len(pool.ranges), replayed_merges=sum(st["replayed"] for st in status),
        # start-up (actors, model load, first forward batch) apart from the steady rate of
        # the forward passes after it, both from the workers' progress reports
        startup_s=rates["startup_s"], steady_tokens_per_s=rates["steady_per_s"],
    )
