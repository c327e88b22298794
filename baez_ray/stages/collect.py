"""collect: run the base model and SAE over a corpus; keep, per feature, its top-k
examples, examples sampled across activation deciles, and firing counts.

Path of the data:

    corpus files ──write_contexts──▶ contexts/ (Parquet: context_id, tokens)
    contexts parts ──ray.data (one block per part)──▶ map_batches(CollectWorker, actor pool)
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
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from baez_ray import schema
from baez_ray.config import CollectConfig, JobSpec, ModelConfig, SAEConfig
from baez_ray.run import Run, init_ray, log

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


class CollectWorker:
    """Ray Data actor: contexts in, candidate rows out (see module docstring)."""

    def __init__(self, model: dict, sae: dict, collect: dict, seed: int, n_features: int, bos_id: int | None, threads: int):
        from baez_ray.models.base import BaseModel, load_sae

        torch.set_num_threads(threads)
        self.cfg = CollectConfig(**collect)
        self.lm = BaseModel(ModelConfig(**model))
        self.device = self.lm.device
        self.sae = load_sae(SAEConfig(**sae), self.device, self.lm.d_model)
        self.sae_dtype = next(self.sae.parameters()).dtype
        self.F, self.seed, self.bos_id = n_features, seed, bos_id
        k, r = self.cfg.top_k, self.cfg.reservoir
        dev = self.device
        self.top_key = torch.zeros(n_features, k, device=dev)  # 0: empty (values > 0 only)
        self.top_ctx = torch.full((n_features, k), -1, dtype=torch.int64, device=dev)
        self.smp_key = torch.full((n_features, r), EMPTY_SAMPLE, dtype=torch.float64, device=dev)
        self.smp_ctx = torch.full((n_features, r), -1, dtype=torch.int64, device=dev)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = torch.from_numpy(np.stack(batch["tokens"]).astype(np.int64)).to(self.device)
        ctx = torch.tensor(np.asarray(batch["context_id"], dtype=np.int64), device=self.device)
        B, T = ids.shape
        resid = self.lm.residual(ids)
        counts = torch.zeros(self.F, dtype=torch.int64, device=self.device)
        parts = []
        # the SAE's activations of a wide dictionary do not fit for a whole batch
        # (8 × 1024 tokens × 262k features): encode and merge a few contexts at a time;
        # merging sub-batch by sub-batch gives the same result
        step = max(1, ACTS_BUDGET // (T * self.F))
        for i in range(0, B, step):
            parts += self._merge(ids[i : i + step], ctx[i : i + step], resid[i : i + step], counts)
        # firing counts; feature -1 carries the number of tokens seen
        nz = torch.nonzero(counts).flatten()
        feats = np.concatenate([[-1], nz.cpu().numpy()]).astype(np.int64)
        cnt = np.concatenate([[B * T], counts[nz].cpu().numpy()]).astype(np.int64)
        n = len(feats)
        parts.append(
            pa.table(
                {
                    "kind": pa.array(["count"] * n),
                    "feature": feats,
                    "value": np.zeros(n, np.float32),
                    "key": np.zeros(n, np.float64),
                    "context_id": np.full(n, -1, np.int64),
                    "position": np.zeros(n, np.int32),
                    "top_index": np.zeros(n, np.int32),
                    "count": cnt,
                }
            )
        )
        return pa.concat_tables([schema.conform(p, schema.CANDIDATES) for p in parts])

    def _merge(self, ids, ctx, resid, counts) -> list[pa.Table]:
        acts = self.sae.encode(resid.to(self.sae_dtype))[..., : self.F].float()
        if self.cfg.ignore_bos and self.bos_id is not None:
            acts[ids == self.bos_id] = 0.0
        vmax, pmax = acts.max(dim=1)  # [b, F]: each feature's max in each context
        fires = vmax > 0
        counts += (acts > 0).sum(dim=(0, 1))
        parts = []
        # top-k by value
        cand = torch.where(fires, vmax, torch.full_like(vmax, -1.0)).T  # [F, b]
        self.top_key, self.top_ctx, order = merge_topk(self.top_key, self.top_ctx, cand, ctx[None, :], largest=True)
        new = (order >= self.cfg.top_k) & (self.top_key > 0)
        parts.append(self._emit("top", new, order - self.cfg.top_k, ids, ctx, acts, vmax, pmax, resid, self.top_key))
        # reservoir of firing contexts by hashed key
        if self.cfg.reservoir:
            keys = hash_keys(ctx, self.F, self.seed)
            cand = torch.where(fires.T, keys, torch.full_like(keys, EMPTY_SAMPLE + 1))
            self.smp_key, self.smp_ctx, order = merge_topk(self.smp_key, self.smp_ctx, cand, ctx[None, :], largest=False)
            new = (order >= self.cfg.reservoir) & (self.smp_key < 1.0)
            parts.append(self._emit("sample", new, order - self.cfg.reservoir, ids, ctx, acts, vmax, pmax, None, self.smp_key))
        return parts

    def _emit(self, kind, new, src, ids, ctx, acts, vmax, pmax, resid, state_key) -> pa.Table:
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
        if resid is not None and self.cfg.keep_residual:
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
                "feature": f_idx.cpu().numpy().astype(np.int64),
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
    """Driver-side merge of candidate rows into the global result, in bounded memory."""

    def __init__(self, n_features: int, cfg: CollectConfig, buffer_rows: int | None = None):
        self.F, self.cfg = n_features, cfg
        self.counts = np.zeros(n_features, dtype=np.int64)
        self.n_tokens = 0
        self.top: list[pa.Table] = []
        self.smp: list[pa.Table] = []
        self.buffered = 0
        self.buffer_rows = buffer_rows or max(50_000, n_features * (cfg.top_k + cfg.reservoir))
        self.rows_in = 0

    def add(self, batch: pa.Table) -> None:
        kind = batch.column("kind")
        cnt = batch.filter(pc.equal(kind, "count"))
        feat = cnt.column("feature").to_numpy()
        c = cnt.column("count").to_numpy()
        self.n_tokens += int(c[feat == -1].sum())
        np.add.at(self.counts, feat[feat >= 0], c[feat >= 0])
        top, smp = batch.filter(pc.equal(kind, "top")), batch.filter(pc.equal(kind, "sample"))
        self.top.append(top)
        self.smp.append(smp)
        self.buffered += top.num_rows + smp.num_rows
        self.rows_in += top.num_rows + smp.num_rows
        if self.buffered > self.buffer_rows:
            self.compact()

    def compact(self) -> None:
        self.top = [_select(pa.concat_tables(self.top), self.cfg.top_k, largest=True)]
        self.smp = [_select(pa.concat_tables(self.smp), self.cfg.reservoir, largest=False)]
        self.buffered = 0

    def features_table(self, sae_id: str, model_id: str, layer: int, token_text) -> pa.Table:
        """The FEATURES table for features 0..F-1 (non-firing ones with no examples)."""
        self.compact()
        top, smp = self.top[0], self.smp[0]
        F = self.F
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

        # decile samples: drop contexts already among the feature's top examples, bin the
        # reservoir by ceil(10·value/max), keep the first `samples_per_decile` keys per bin
        if smp.num_rows and self.cfg.samples_per_decile:
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
            keep = _rank_within(sf * 16 + dec) < self.cfg.samples_per_decile
            smp, sf, dec = smp.filter(pa.array(keep)), sf[keep], dec[keep]
            smp_rank = _rank_within(sf)
        else:
            smp = smp.slice(0, 0)
            sf, dec, smp_rank = np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int64)

        ex = pa.concat_tables([top, smp])
        kinds = np.r_[np.zeros(top.num_rows, np.int8), np.ones(smp.num_rows, np.int8)]
        feat = np.r_[tf, sf].astype(np.int64)
        order = np.lexsort((np.r_[top_rank, smp_rank], kinds, feat))
        ex = ex.take(pa.array(order))
        feat = feat[order]
        decile = pa.array(np.r_[np.zeros(top.num_rows, np.int8), dec][order], pa.int8(), mask=(kinds[order] == 0))
        tok_col = ex.column("tokens").combine_chunks()
        flat = tok_col.flatten().to_numpy(zero_copy_only=False)
        strs = pa.ListArray.from_arrays(tok_col.offsets, pa.array(token_text(flat), pa.string()))
        examples = pa.StructArray.from_arrays(
            [
                ex.column("kind").combine_chunks(),
                pa.array(np.r_[top_rank, smp_rank][order].astype(np.int32)),
                decile,
                ex.column("context_id").combine_chunks(),
                ex.column("position").combine_chunks(),
                ex.column("value").combine_chunks(),
                ex.column("top_index").combine_chunks(),
                tok_col,
                strs,
                ex.column("acts").combine_chunks(),
                ex.column("residual").combine_chunks(),
            ],
            fields=list(schema.EXAMPLE),
        )
        per_feature = np.bincount(feat, minlength=F)
        offsets = np.zeros(F + 1, np.int32)
        np.cumsum(per_feature, out=offsets[1:])
        table = pa.table(
            {
                "sae_id": pa.array([sae_id] * F),
                "model_id": pa.array([model_id] * F),
                "layer": pa.array(np.full(F, layer, np.int32)),
                "feature": pa.array(np.arange(F, dtype=np.int64)),
                "n_tokens": pa.array(np.full(F, self.n_tokens, np.int64)),
                "n_firing": pa.array(self.counts),
                "max_activation": pa.array(max_act),
                "examples": pa.ListArray.from_arrays(pa.array(offsets), examples),
            }
        )
        return schema.conform(table, schema.FEATURES)


def token_texts(tokenizer):
    """ids → the text of each token on its own (decoded once per distinct id)."""
    cache: dict[int, str] = {}

    def lookup(ids: np.ndarray) -> list[str]:
        uniq = np.unique(ids)
        missing = [int(i) for i in uniq if int(i) not in cache]
        if missing:
            for i, s in zip(missing, tokenizer.batch_decode([[i] for i in missing])):
                cache[i] = s
        return [cache[int(i)] for i in ids]

    return lookup


def write_table(table: pa.Table, out_dir: Path, rows_per_file: int = 4096) -> int:
    """Write `table` as part-*.parquet files (each written to a temp name, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    n_parts = 0
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        tmp = out_dir / f".part-{i:05d}.parquet.tmp"
        pq.write_table(table.slice(start, rows_per_file), tmp)
        tmp.rename(out_dir / f"part-{i:05d}.parquet")
        n_parts += 1
    return n_parts


def _read_contexts(batch: pa.Table) -> pa.Table:
    return pa.concat_tables([pq.read_table(p, schema=schema.CONTEXTS) for p in batch.column("path").to_pylist()])


def n_sae_features(sae_cfg: SAEConfig) -> int:
    """d_sae without building the SAE (cfg.json on disk), else by loading it."""
    import json

    if sae_cfg.path and (Path(sae_cfg.path) / "cfg.json").exists():
        return int(json.loads((Path(sae_cfg.path) / "cfg.json").read_text())["d_sae"])
    from baez_ray.models.base import load_sae

    return int(load_sae(sae_cfg, "cpu").cfg.d_sae)


def collect_job(spec: JobSpec, run: Run) -> None:
    import ray

    from baez_ray.corpus import write_contexts
    from baez_ray.models.base import load_tokenizer

    cfg, mcfg = spec.collect, spec.model
    tokenizer = load_tokenizer(mcfg)
    contexts_dir = run.table_dir("contexts")
    if not run.completed("contexts"):
        with run.stage("contexts") as info:
            # parts of a few batches each: Ray Data hands one part to an actor at a time, so
            # small parts spread the work over the actors and stream results to the merge
            info["contexts"] = write_contexts(spec.corpus, tokenizer, contexts_dir, rows_per_file=8 * cfg.batch_size)
            info["tokens"] = info["contexts"] * spec.corpus.context_len

    if not run.completed("collect"):
        d_sae = n_sae_features(spec.sae)
        n_features = min(cfg.features or d_sae, d_sae)
        init_ray(spec)
        with run.stage("collect") as info:
            # one block per contexts part (read_parquet would coalesce small parts into one
            # block, and then one actor would get all the work and emit only at the end)
            parts = sorted(str(p) for p in contexts_dir.glob("part-*.parquet"))
            ds = ray.data.from_items([{"path": p} for p in parts], override_num_blocks=len(parts)).map_batches(
                _read_contexts, batch_size=1, batch_format="pyarrow", num_cpus=0.1
            )
            out = ds.map_batches(
                CollectWorker,
                fn_constructor_kwargs=dict(
                    model=mcfg.model_dump(), sae=spec.sae.model_dump(), collect=cfg.model_dump(), seed=spec.seed,
                    n_features=n_features, bos_id=tokenizer.bos_token_id, threads=max(1, math.ceil(mcfg.num_cpus)),
                ),
                batch_size=cfg.batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                num_cpus=mcfg.num_cpus,
                num_gpus=mcfg.num_gpus or None,
            )
            merger = Merger(n_features, cfg)
            total = run.manifest["stages"]["contexts"]["tokens"]
            t0, t_first, first_tokens, last_log = time.perf_counter(), None, None, 0.0
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
                merger.add(batch)
                if t_first is None:
                    t_first, first_tokens = time.perf_counter(), merger.n_tokens
                now = time.perf_counter()
                if now - last_log > 10:
                    last_log = now
                    log(f"[collect] {merger.n_tokens:,}/{total:,} tokens ({100 * merger.n_tokens / total:.0f}%), {merger.n_tokens / (now - t0):,.0f} tok/s")
            table = merger.features_table(spec.sae.id, mcfg.id, mcfg.layer, token_texts(tokenizer))
            parts = write_table(table, run.table_dir("features"))
            t_done = time.perf_counter()
            info.update(
                features=n_features,
                tokens=merger.n_tokens,
                firing_features=int((merger.counts > 0).sum()),
                candidate_rows=merger.rows_in,
                parts=parts,
                # start-up (actors, model load, first batch) apart from the steady rate, which
                # includes the merge and writing the features table
                startup_s=round((t_first or t0) - t0, 3),
                steady_tokens_per_s=round((merger.n_tokens - (first_tokens or 0)) / max(t_done - (t_first or t0), 1e-9), 1),
            )
            if merger.n_tokens != total:
                raise RuntimeError(f"collect saw {merger.n_tokens} tokens but the corpus has {total}: a batch was lost")
    with run.stage("features_report") as info:
        from baez_ray.report.features import write_features_report

        # in a label job the features page sits beside the job's own report
        info["path"] = str(write_features_report(run.dir, name="index.html" if spec.job == "collect" else "features.html"))
