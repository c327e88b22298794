"""The AV in Ray: the actor that holds an engine (`AVWorker`), the pool that runs it over
rows with a `vector` column (`verbalize_vectors`), and the explanations of features' top
examples (`verbalize`: the residual at each top token, kept by collect or computed by the
residuals stage, `stages/residuals.py`, into the residuals table).

    rows (…, vector) ─actor pool (AVWorker: transformers or vLLM engine)─▶
        rows (…, explanation, verbalizer, av_engine, av_error)
"""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import torch

from baez_ray import progress
from baez_ray.av.sidecar import Sidecar, load_sidecar
from baez_ray.config import AVRunConfig

ENGINES = ("transformers", "vllm")


def make_verbalizer(sidecar: Sidecar, engine: str = "transformers", device: str = "cpu", source: str = "<sidecar>",
                    engine_kwargs: dict | None = None):
    """The AV engine named `engine` (transformers | vllm); vllm is imported only here."""
    if engine == "transformers":
        if set(engine_kwargs or {}) - {"cache"}:
            raise ValueError(f"{source}: the transformers engine takes only engine_kwargs cache (prefix | static | dynamic); "
                             f"the others are for the vllm engine (got {sorted(engine_kwargs)})")
        from baez_ray.av.hf_engine import Verbalizer

        return Verbalizer(sidecar, device, source, **(engine_kwargs or {}))
    if engine == "vllm":
        from baez_ray.av.vllm_engine import VLLMVerbalizer

        return VLLMVerbalizer(sidecar, device, source, engine_kwargs)
    raise ValueError(f"unknown AV engine {engine!r} (known: {', '.join(ENGINES)})")


class AVWorker:
    """Ray Data actor: rows with a `vector` column in; `explanation`, `verbalizer`,
    `av_engine`, `av_error` added."""

    def __init__(self, sidecar_path: str, device: str = "cpu", threads: int = 1, seed: int = 0,
                 engine: str = "transformers", engine_kwargs: dict | None = None, max_new_tokens: int | None = None):
        torch.set_num_threads(threads)
        self.sc = load_sidecar(sidecar_path)
        self.v = make_verbalizer(self.sc, engine, device, sidecar_path, engine_kwargs)
        self.seed, self.engine, self.max_new_tokens = seed, engine, max_new_tokens

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        vecs = batch.column("vector").to_pylist()
        texts, errors = [None] * n, [None] * n
        ok = [i for i, v in enumerate(vecs) if v is not None]
        for i in set(range(n)) - set(ok):
            errors[i] = "no vector"
        if ok:
            try:
                for i, t in zip(ok, self.v.explain(np.asarray([vecs[i] for i in ok], np.float32), seed=self.seed,
                                                           max_new_tokens=self.max_new_tokens)):
                    texts[i] = t
            except Exception as e:  # recorded on the rows it touched
                for i in ok:
                    errors[i] = f"{type(e).__name__}: {e}"
        kind = "self" if self.sc.self_verbalizer else "av"
        progress.tick(n)
        return (batch.append_column("explanation", pa.array(texts, pa.string()))
                .append_column("verbalizer", pa.array([kind] * n))
                .append_column("av_engine", pa.array([self.engine] * n))
                .append_column("av_error", pa.array(errors, pa.string())))


def verbalize_vectors(rows, sidecar_path: str, run: AVRunConfig = AVRunConfig()):
    """Rows with a `vector` column (a Ray Dataset) → the same rows with `explanation`,
    `verbalizer`, `av_engine`, `av_error` (lazy). The AV runs in an actor pool, on the
    transformers engine or vLLM (`engine: vllm`, `vllm.LLM(enable_prompt_embeds=True)`)."""
    from baez_ray.ray_pool import actor_map

    extra = {}
    if run.engine == "vllm":  # the engine reads VLLM_* settings (e.g. VLLM_CPU_KVCACHE_SPACE) in the actor
        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
        if env:
            extra["runtime_env"] = {"env_vars": env}
    kwargs = {"sidecar_path": sidecar_path, "device": run.device, "threads": max(1, math.ceil(run.num_cpus)),
              "engine": run.engine, "engine_kwargs": dict(run.engine_kwargs) or None, "max_new_tokens": run.max_new_tokens}
    return actor_map(rows, AVWorker, kwargs, size=run.num_actors, num_cpus=run.num_cpus, num_gpus=run.num_gpus,
                     resources=run.resources, batch_size=run.batch_size, keep=True, **extra)


def distinct_examples(examples: list[dict], window: int) -> list[tuple[dict, int]]:
    """(example, how many of `examples` it stands for), in order: examples whose last
    `window` tokens up to and including the top token are the same (token ids, or the
    token strings where ids are unknown) are near-duplicates, and the first stands for the
    rest; `window` 0: every example stands for itself."""
    if window <= 0:
        return [(e, 1) for e in examples]
    kept: list[list] = []
    where: dict[tuple, int] = {}
    for e in examples:
        toks, t = e.get("tokens") or e["token_strs"], e["top_index"]
        key = tuple(toks[max(0, t - window + 1) : t + 1])
        if key in where:
            kept[where[key]][1] += 1
        else:
            where[key] = len(kept)
            kept.append([e, 1])
    return [(e, n) for e, n in kept]


def av_examples(examples: list[dict], n: int) -> list[dict]:
    """The examples an AV method reads of one feature: its first `n` top examples (in the
    table's order: by rank). The residuals stage computes vectors for exactly these."""
    return [e for e in examples if e["kind"] == "top"][:n]


NO_VECTOR = "no residual vector at the top token: the residuals stage computed none for this example (and collect kept none)"
VECTOR_ROWS = pa.schema([pa.field("sae_id", pa.string()), pa.field("layer", pa.int32()), pa.field("feature", pa.int64()),
                         pa.field("rank", pa.int32()), pa.field("same", pa.int64()), pa.field("score", pa.int64()), pa.field("vector", pa.list_(pa.float32())),
                         pa.field("vector_error", pa.string())])


def top_example_vectors(n_examples: int, layer: int | None = None, dedup_window: int = 0, residuals_dir: str | None = None):
    """A map_batches function: FEATURES rows → one row per distinct example the AV reads
    (`av_examples`; near-duplicates by `distinct_examples(dedup_window)` are one row, `same`
    counts them): its vector (the residual at the top token: the one collect kept, else the
    residuals table's row of the same (sae_id, feature, kind, rank)), or, when there is
    none, `vector_error` saying why; and its 1-10 activation score. `layer`: only features
    of SAEs at that layer (the AV's extraction layer)."""

    def build(batch: pa.Table) -> pa.Table:
        rows = []
        for f in batch.select(["sae_id", "layer", "feature", "max_activation", "examples"]).to_pylist():
            if layer is not None and f["layer"] != layer:
                continue
            for e, same in distinct_examples(av_examples(f["examples"], n_examples), dedup_window):
                rows.append({
                    "sae_id": f["sae_id"], "layer": f["layer"], "feature": f["feature"], "kind": e["kind"], "rank": e["rank"], "same": same,
                    "score": max(1, min(10, math.ceil(10 * e["value"] / f["max_activation"]))) if f["max_activation"] > 0 else 1,
                    "vector": e["residual"], "vector_error": None,
                })
        fill_vectors(rows, residuals_dir)
        return pa.Table.from_pylist([{k: r[k] for k in VECTOR_ROWS.names} for r in rows], schema=VECTOR_ROWS)

    return build


def fill_vectors(rows: list[dict], residuals_dir: str | None) -> None:
    """Give the rows without a vector the residuals table's vector (or its error), read
    for their features only (`schema.read_keyed`: the table's row groups are sorted by key)."""
    from pathlib import Path

    from baez_ray import schema

    need = [r for r in rows if r["vector"] is None]
    found: dict[tuple, dict] = {}
    if need and residuals_dir and any(Path(residuals_dir).glob("*.parquet")):
        keys = schema.key_table(sorted({(r["sae_id"], r["feature"]) for r in need}))
        table = schema.read_keyed(residuals_dir, keys, columns=["sae_id", "feature", "kind", "rank", "residual", "error"])
        found = {(t["sae_id"], t["feature"], t["kind"], t["rank"]): t for t in table.to_pylist()}
    for r in need:
        hit = found.get((r["sae_id"], r["feature"], r["kind"], r["rank"]))
        if hit is None:
            r["vector_error"] = NO_VECTOR
        elif hit["residual"] is None:
            r["vector_error"] = hit["error"] or NO_VECTOR
        else:
            r["vector"] = hit["residual"]


def verbalize(features, sidecar_path: str, n_examples: int = 10, run: AVRunConfig = AVRunConfig(),
              residuals_dir: str | None = None) -> pa.Table:
    """AV explanations of each feature's top examples, near-duplicates once (`run.dedup_window`):
    rows (sae_id, layer, feature, rank, same, score, explanation, verbalizer, av_engine,
    av_error), one per distinct example the AV reads of the features of SAEs at the AV's
    extraction layer (features at other layers get none).
    Each example's vector is the residual collect kept, else the residuals table's
    (`residuals_dir`); an example without one gets its row with `av_error` saying why."""
    from baez_ray.ray_pool import gather

    layer = load_sidecar(sidecar_path).extraction_layer
    rows = features.map_batches(top_example_vectors(n_examples, layer, run.dedup_window, residuals_dir), batch_format="pyarrow").materialize()
    with_vector = rows.filter(lambda r: r["vector"] is not None).drop_columns(["vector_error"])
    without = gather(rows.filter(lambda r: r["vector"] is None).drop_columns(["vector"]))
    at_most = features.count() * n_examples  # features with fewer top examples (or at other layers) send fewer
    with progress.bar("av", total=at_most, unit="example") as bar:
        out = gather(verbalize_vectors(with_vector, sidecar_path, run).drop_columns(["vector"]))
        bar.add_total(out.num_rows - at_most)  # the examples there were
    if without.num_rows:
        n = without.num_rows
        failed = pa.table({"sae_id": without.column("sae_id"), "layer": without.column("layer"), "feature": without.column("feature"),
                           "rank": without.column("rank"), "same": without.column("same"), "score": without.column("score"), "explanation": pa.nulls(n, pa.string()),
                           "verbalizer": pa.nulls(n, pa.string()), "av_engine": pa.array([run.engine] * n),
                           "av_error": without.column("vector_error")})
        out = pa.concat_tables([out, failed], promote_options="default") if out.num_rows else failed
    return out
