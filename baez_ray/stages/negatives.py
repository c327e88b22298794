"""Negatives from the corpus (`score.negatives: corpus`): windows where a feature does not
fire at all, found by running the base model and the SAE over a seeded sample of contexts.

    contexts/ (sampled) ─▶ NegativeWorker actors (base model → each scored SAE's layer's
    residual → that SAE's encode, full dictionary, then the scored features) ─▶ per window of `window` tokens:
    the max activation of each scored feature ─▶ per feature, n windows whose max is 0,
    drawn at random (seeded per feature)

Each window is cut from a whole context after the model has read the context from its
start, so its activations are the ones the feature has in the corpus. The BOS token is
never part of a window.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from baez_ray import schema
from baez_ray.config import CorpusConfig, ModelConfig, SAEConfig
from baez_ray.stages.split import feature_seed

NEGATIVES = pa.schema([pa.field("sae_id", pa.string()), pa.field("feature", pa.int64()), pa.field("examples", pa.list_(schema.EXAMPLE))])


class NegativeWorker:
    """Ray Data actor: contexts in, one row per window out (context_id, start, tokens, the
    scored features' max activation in the window, SAE after SAE: one forward pass reads
    every SAE's layer)."""

    def __init__(self, model: dict, saes: list[dict], features: list[list[int]], window: int, threads: int):
        from baez_ray.models.lm import ResidualReader
        from baez_ray.models.sae import load_sae

        torch.set_num_threads(threads)
        cfgs = [SAEConfig(**s) for s in saes]
        self.lm = ResidualReader(ModelConfig(**model), layers=[c.layer for c in cfgs])
        self.saes = []
        for c, f in zip(cfgs, features):
            sae = load_sae(c, self.lm.device, self.lm.d_model)
            self.saes.append((sae, next(sae.parameters()).dtype, c.layer, torch.tensor(f, dtype=torch.int64, device=self.lm.device)))
        self.window = window

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = torch.from_numpy(np.stack(batch["tokens"]).astype(np.int64)).to(self.lm.device)
        resid = self.lm.residuals(ids)
        acts = torch.cat([sae.encode(resid[layer].to(dtype))[..., feats].float() for sae, dtype, layer, feats in self.saes],
                         dim=-1)  # [B, T, F_sel]
        B, T, _ = acts.shape
        out = {"context_id": [], "start": [], "tokens": [], "max_acts": []}
        for b in range(B):
            for start in range(1, T - self.window + 1, self.window):  # position 0 is BOS
                out["context_id"].append(int(batch["context_id"][b]))
                out["start"].append(start)
                out["tokens"].append(ids[b, start : start + self.window].cpu().numpy().astype(np.int32))
                out["max_acts"].append(acts[b, start : start + self.window].amax(dim=0).cpu().numpy())
        return {k: np.asarray(v) if k in ("context_id", "start") else np.stack(v) if v else np.zeros((0,)) for k, v in out.items()}


def corpus_negatives(contexts_dir: Path, model: ModelConfig, saes: list[SAEConfig], corpus: CorpusConfig, window: int,
                     batch_size: int, keys: list[tuple[str, int]], n: int, seed: int,
                     n_contexts: int = 64) -> pa.Table:
    """Rows (sae_id, feature, examples): per key, up to `n` examples (dicts of the EXAMPLE
    fields) of corpus windows of `window` tokens where the feature (of its SAE, among the
    job's `saes`) does not fire: the `negatives_table` of stages/score.py. Writes the
    contexts table to `contexts_dir` if it has none. (`corpus_negatives_ref`: the same
    table left in the object store, never in the driver.)"""
    import ray

    return ray.get(corpus_negatives_ref(contexts_dir, model, saes, corpus, window, batch_size, keys, n, seed, n_contexts))


def corpus_negatives_ref(contexts_dir: Path, model: ModelConfig, saes: list[SAEConfig], corpus: CorpusConfig, window: int,
                         batch_size: int, keys: list[tuple[str, int]], n: int, seed: int, n_contexts: int = 64):
    """`corpus_negatives` as an ObjectRef of its table: the windows' matrix of max
    activations (windows × the scored features) and the examples are built by a Ray task
    (`_pick_negatives`) from the workers' blocks; the driver holds the keys and references."""
    import ray

    from baez_ray.data.corpus import write_contexts
    from baez_ray.models.lm import load_tokenizer
    from baez_ray.ray_pool import actor_map, remote

    other = sorted({s for s, _ in keys} - {s.id for s in saes})
    if other:
        raise ValueError(f"score.negatives = corpus: features of SAE(s) {other}, but the job's SAEs are {[s.id for s in saes]}")
    used = [s for s in saes if any(k == s.id for k, _ in keys)]
    features = [sorted({f for k, f in keys if k == s.id}) for s in used]
    if not any(Path(contexts_dir).glob("part-*.parquet")):
        write_contexts(corpus, load_tokenizer(model), contexts_dir)
    ids = pq.read_table(contexts_dir, columns=["context_id"])  # the sample is drawn over the rows; one int column
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(ids.num_rows, size=min(n_contexts, ids.num_rows), replace=False))
    contexts = remote(_read_contexts).remote(str(contexts_dir), take)  # read by a task, into the object store
    kwargs = dict(model=model.model_dump(), saes=[s.model_dump() for s in used], features=features, window=window, threads=max(1, math.ceil(model.num_cpus)))
    ds = actor_map(ray.data.from_arrow_refs([contexts]), NegativeWorker, kwargs, num_cpus=model.num_cpus,
                   num_gpus=model.num_gpus, resources=model.resources, batch_size=batch_size, batch_format="numpy")
    blocks = ds.materialize().to_arrow_refs()
    return remote(_pick_negatives).remote(model.model_dump(), [s.id for s in used], features, keys, n, seed, window, *blocks)


def _read_contexts(contexts_dir: str, take: np.ndarray) -> pa.Table:
    """A Ray task: the rows `take` of the contexts table."""
    return pq.read_table(contexts_dir).take(pa.array(take))


def _ndarray(col: pa.ChunkedArray) -> np.ndarray:
    """A column of equal-length arrays per row (Ray Data's tensor column, or lists) → [rows, …]."""
    parts = [c.to_numpy(zero_copy_only=False) for c in col.chunks if len(c)]
    parts = [np.stack(p) if p.dtype == object else p for p in parts]
    return np.concatenate(parts) if parts else np.zeros((0, 0))


def _pick_negatives(model: dict, sae_ids: list[str], features: list[list[int]], keys: list[tuple[str, int]], n: int, seed: int,
                    window: int, *blocks: pa.Table) -> pa.Table:
    """A Ray task: the NegativeWorker rows (`blocks`, in order) → per key, up to `n` windows
    where the feature's max is 0, drawn at random (seeded per feature), as NEGATIVES rows."""
    from baez_ray.models.lm import load_tokenizer, token_texts

    column = {(s, f): j for j, (s, f) in enumerate((s, f) for s, fs in zip(sae_ids, features) for f in fs)}
    blocks = [b for b in blocks if b.num_rows]
    if not blocks:
        return pa.Table.from_pylist([{"sae_id": s, "feature": f, "examples": []} for s, f in keys], schema=NEGATIVES)
    table = pa.concat_tables(blocks)
    max_acts, tokens = _ndarray(table.column("max_acts")), _ndarray(table.column("tokens"))  # [W, F_sel], [W, window]
    context_id, start = table.column("context_id").to_numpy(), table.column("start").to_numpy()
    text = token_texts(load_tokenizer(ModelConfig(**model)))
    out = []
    for key in keys:
        j = column[key]
        quiet = np.flatnonzero(max_acts[:, j] <= 0)
        pick = np.random.default_rng(feature_seed(seed, *key)).permutation(quiet)[:n]
        out.append({"sae_id": key[0], "feature": key[1], "examples": [
            {"kind": "negative", "rank": i, "context_id": int(context_id[w]), "position": int(start[w]),
             "value": 0.0, "top_index": 0, "token_strs": text(tokens[w]), "acts": [0.0] * window} for i, w in enumerate(pick)]})
    return pa.Table.from_pylist(out, schema=NEGATIVES)
