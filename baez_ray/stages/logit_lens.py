"""logit_lens: every collected feature's decoder direction read through the unembedding
(SPEC §2: Neuronpedia's top logits), its top promoted and suppressed tokens written into
the features table.

    features/ parts (collect's, `part-NNN-MMMMM.parquet`) not yet marked
      ──ray.data (one row per part)──▶ map_batches(LogitLensWorker, actor pool)
           each actor: W_U [V, d] (read once from the checkpoint), one SAE's W_dec [F, d]
           per part: its (sae_id, feature) rows → chunks of features:
               W_dec[chunk] @ W_Uᵀ [c, V] ─top-k / bottom-k─▶ ids, values
               ids → token strings (the tokenizer's decode of each id on its own)
           ──▶ the part rewritten in place (temp file, then rename) with pos_tokens,
               pos_values, neg_tokens, neg_values filled, and the marker `logit_lens` in
               its Parquet metadata
      ──▶ one receipt row per part (part, features, seconds): the driver counts.

What is computed: logits_f = W_dec[f] @ W_U, the raw decoder row (as sae-lens loads it)
times the unembedding (the LM head's weight, or the tied input embedding), with no final
norm: Neuronpedia's dashboards (SAEDashboard, which loads the model without TransformerLens'
weight processing, or reads the HF LM head) compute exactly this, so collected and
ingested features carry comparable numbers. A final RMSNorm would divide the direction by
its RMS (a positive number per feature: the same tokens, other values) and scale each
channel by its learned weight (which can change the order of the tokens); a direction
added to the residual stream is not normalised on its own in the model, so neither reading
is exact, and we keep the one the features' other source (Neuronpedia exports) uses. An
SAE that rescales its activations by the decoder norm (sae-lens TopK with
`rescale_acts_by_decoder_norm`) writes W_dec[f] / ‖W_dec[f]‖ per unit of activation: its
values differ from ours by that positive factor, its tokens not. docs/output-side.md says
the same for users.

pos_tokens are the k largest logits, largest first; neg_tokens the k smallest, most
negative first (Neuronpedia's pos_str / neg_str order). Ties between equal logits are
broken by torch.topk.

Memory. An actor holds W_U in float32 (262,144 × 640: 671 MB for Gemma 3 270M), the
decoder of the SAE whose rows it is reading (`models.sae.decoder_rows`: read alone from an
SAE folder; a release is loaded whole by sae-lens, its encoder dropped at once), one part
of the features table and one chunk of logits of at most LOGITS_BUDGET values (256 MB):
bounded whatever the width. On a GPU (the base model's
`num_gpus`) W_U, the decoder and the chunk live there.

Resume. A part is done when its Parquet metadata holds the marker with the same version
and k (the marker is written with the data, by the same rename); a rerun runs the other
parts only. A restarted actor redoes the part it was on (the rewrite is idempotent).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from baez_ray import progress, schema
from baez_ray.config import LogitLensConfig, ModelConfig, SAEConfig
from baez_ray.ray_pool import actor_map
from baez_ray.rundir import write_parquet_atomic

VERSION = "logit_lens/v1"
MARKER = b"logit_lens"
LOGITS_BUDGET = 2**26  # logits held at once (elements): 256 MB of float32
COLUMNS = ("pos_tokens", "pos_values", "neg_tokens", "neg_values")


def top_logits(rows: torch.Tensor, W_U: torch.Tensor, k: int, budget: int = LOGITS_BUDGET):
    """Decoder rows [n, d] and the unembedding [V, d] → (pos ids, pos values, neg ids, neg
    values), each [n, k] numpy: the k largest logits of each row (largest first) and the k
    smallest (smallest first), computed `budget // V` rows at a time."""
    n, V = rows.shape[0], W_U.shape[0]
    k = min(k, V)
    out = [np.zeros((n, k), np.int64), np.zeros((n, k), np.float32), np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)]
    step = max(1, budget // max(1, V))
    for a in range(0, n, step):
        logits = rows[a : a + step].to(device=W_U.device, dtype=W_U.dtype) @ W_U.T
        for j, largest in ((0, True), (2, False)):
            vals, ids = torch.topk(logits, k, dim=1, largest=largest, sorted=True)
            out[j][a : a + step], out[j + 1][a : a + step] = ids.cpu().numpy(), vals.float().cpu().numpy()
    return tuple(out)


def is_done(path: Path, top_k: int) -> bool:
    """Whether the part at `path` already carries this version's logit lens with `top_k`."""
    meta = pq.read_schema(path).metadata or {}
    if MARKER not in meta:
        return False
    mark = json.loads(meta[MARKER])
    return mark.get("version") == VERSION and mark.get("top_k") == top_k


class LogitLensWorker:
    """Ray Data actor: rows (path) of features parts → receipts (part, features, seconds),
    each part rewritten with its features' top logits (see the module docstring)."""

    def __init__(self, model: dict, saes: list[dict], top_k: int, threads: int):
        from baez_ray.models.lm import load_tokenizer, pick_device, token_texts, unembedding

        torch.set_num_threads(threads)
        cfg = ModelConfig(**model)
        self.device = pick_device(cfg.device)
        self.W_U = unembedding(cfg).to(self.device)
        self.texts = token_texts(load_tokenizer(cfg))
        self.saes = {s["id"]: SAEConfig(**s) for s in saes}
        self.top_k = top_k
        self._decoder: tuple[str, torch.Tensor] | None = None

    def decoder(self, sae_id: str) -> torch.Tensor:
        """W_dec [F, d] float32 of SAE `sae_id` (one SAE held at a time)."""
        from baez_ray.models.sae import decoder_rows

        if self._decoder is None or self._decoder[0] != sae_id:
            self._decoder = None  # free the last one before loading the next
            W = decoder_rows(self.saes[sae_id])
            if W.shape[1] != self.W_U.shape[1]:
                raise ValueError(f"sae {sae_id}: decoder rows of size {W.shape[1]}, the model's unembedding reads {self.W_U.shape[1]}")
            self._decoder = (sae_id, W.to(self.device))
        return self._decoder[1]

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for path in batch["path"]:
            t0 = time.perf_counter()
            n = self.part(Path(str(path)))
            rows.append({"part": Path(str(path)).name, "features": n, "seconds": time.perf_counter() - t0})
        return pa.Table.from_pylist(rows)

    def columns(self, sae_ids: list[str], features: np.ndarray) -> dict[str, list]:
        """The four columns for rows (sae_id, feature), SAE by SAE."""
        out: dict[str, list] = {c: [None] * len(features) for c in COLUMNS}
        ids = np.asarray(sae_ids, dtype=object)
        for sae_id in dict.fromkeys(sae_ids):
            where = np.flatnonzero(ids == sae_id)
            W = self.decoder(sae_id)
            pi, pv, ni, nv = top_logits(W[torch.from_numpy(features[where]).to(W.device)], self.W_U, self.top_k)
            pos_t, neg_t = self.texts(pi.reshape(-1)), self.texts(ni.reshape(-1))
            k = pi.shape[1]
            for j, r in enumerate(where):
                out["pos_tokens"][r], out["pos_values"][r] = pos_t[j * k : (j + 1) * k], pv[j].tolist()
                out["neg_tokens"][r], out["neg_values"][r] = neg_t[j * k : (j + 1) * k], nv[j].tolist()
            progress.tick(len(where))
        return out

    def part(self, path: Path) -> int:
        """Rewrite one features part with its logit lens; returns its number of rows."""
        table = pq.read_table(path)
        cols = self.columns(table.column("sae_id").to_pylist(), table.column("feature").to_numpy())
        for name, values in cols.items():
            table = table.drop_columns([name]) if name in table.column_names else table
            table = table.append_column(name, pa.array(values, schema.FEATURES.field(name).type))
        table = schema.conform(table, schema.FEATURES)
        meta = {**(table.schema.metadata or {}), MARKER: json.dumps({"version": VERSION, "top_k": self.top_k}).encode()}
        write_parquet_atomic(table.replace_schema_metadata(meta), path)
        return table.num_rows


def logit_lens(features_dir: Path, model: ModelConfig, saes: list[SAEConfig], cfg: LogitLensConfig,
               parts: list[Path] | None = None) -> dict:
    """Fill pos_tokens / pos_values / neg_tokens / neg_values of the features table in
    `features_dir` (all its parts, or `parts`), skipping the parts done before. Returns
    the stage's counts."""
    import ray

    parts = sorted(Path(features_dir).glob("part-*.parquet")) if parts is None else list(parts)
    todo = [p for p in parts if not is_done(p, cfg.top_k)]
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in todo)
    info = {"parts": len(parts), "parts_run": len(todo), "features": total, "top_k": cfg.top_k, "version": VERSION,
            "actor_seconds": 0.0}
    if not todo:
        return info
    ds = ray.data.from_items([{"path": str(p)} for p in todo], override_num_blocks=len(todo))
    kwargs = dict(model=model.model_dump(), saes=[s.model_dump() for s in saes], top_k=cfg.top_k,
                  threads=max(1, math.ceil(model.num_cpus)))
    out = actor_map(ds, LogitLensWorker, kwargs, size=min(cfg.num_actors, len(todo)), num_cpus=model.num_cpus,
                    num_gpus=model.num_gpus, resources=model.resources, batch_format="numpy", fault_tolerant=True, in_flight=1)
    with progress.bar("logit_lens", total=total, unit="feat"):
        for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            info["actor_seconds"] += float(sum(batch.column("seconds").to_pylist())) if batch.num_rows else 0.0
    info["actor_seconds"] = round(info["actor_seconds"], 2)
    missing = [p.name for p in todo if not is_done(p, cfg.top_k)]
    if missing:
        raise RuntimeError(f"logit_lens: parts {missing[:5]} were not written")
    return info
