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
    contexts table to `contexts_dir` if it has none."""
    import ray

    from baez_ray.data.corpus import write_contexts
    from baez_ray.models.lm import load_tokenizer, token_texts
    from baez_ray.ray_pool import actor_map

    other = sorted({s for s, _ in keys} - {s.id for s in saes})
    if other:
        raise ValueError(f"score.negatives = corpus: features of SAE(s) {other}, but the job's SAEs are {[s.id for s in saes]}")
    used = [s for s in saes if any(k == s.id for k, _ in keys)]
    features = [sorted({f for k, f in keys if k == s.id}) for s in used]
    column = {(s.id, f): j for j, (s, f) in enumerate((s, f) for s, fs in zip(used, features) for f in fs)}
    tokenizer = load_tokenizer(model)
    if not any(Path(contexts_dir).glob("part-*.parquet")):
        write_contexts(corpus, tokenizer, contexts_dir)
    contexts = pq.read_table(contexts_dir)
    rng = np.random.default_rng(seed)
    take = np.sort(rng.choice(contexts.num_rows, size=min(n_contexts, contexts.num_rows), replace=False))
    kwargs = dict(model=model.model_dump(), saes=[s.model_dump() for s in used], features=features, window=window, threads=max(1, math.ceil(model.num_cpus)))
    ds = actor_map(ray.data.from_arrow(contexts.take(pa.array(take))), NegativeWorker, kwargs, num_cpus=model.num_cpus,
                   num_gpus=model.num_gpus, resources=model.resources, batch_size=batch_size, batch_format="numpy")
    rows = ds.take_all()
    if not rows:
        return pa.Table.from_pylist([{"sae_id": s, "feature": f, "examples": []} for s, f in keys], schema=NEGATIVES)
    max_acts = np.stack([r["max_acts"] for r in rows])  # [W, F_sel]
    text = token_texts(tokenizer)
    out = []
    for key in keys:
        j = column[key]
        quiet = np.flatnonzero(max_acts[:, j] <= 0)
        pick = np.random.default_rng(feature_seed(seed, *key)).permutation(quiet)[:n]
        out.append({"sae_id": key[0], "feature": key[1], "examples": [
            {"kind": "negative", "rank": i, "context_id": int(rows[w]["context_id"]), "position": int(rows[w]["start"]),
             "value": 0.0, "top_index": 0, "token_strs": text(rows[w]["tokens"]), "acts": [0.0] * window} for i, w in enumerate(pick)]})
    return pa.Table.from_pylist(out, schema=NEGATIVES)
