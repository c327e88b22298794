"""The AV in Ray: the actor that holds an engine (`AVWorker`), the pool that runs it over
rows with a `vector` column (`verbalize_vectors`), and the explanations of features' top
examples (`verbalize`: the residual at each top token, kept by collect).

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


def top_example_vectors(n_examples: int, layer: int | None = None, dedup_window: int = 0):
    """A map_batches function: FEATURES rows → one row per distinct top example (of the
    top `n_examples`; near-duplicates by `distinct_examples(dedup_window)` are one row,
    `same` counts them): the vector the AV reads (the residual at the top token, kept by
    collect) and its 1-10 activation score. `layer`: only features of SAEs at that layer
    (the AV's extraction layer)."""

    def build(batch: pa.Table) -> pa.Table:
        rows = []
        for f in batch.select(["sae_id", "layer", "feature", "max_activation", "examples"]).to_pylist():
            if layer is not None and f["layer"] != layer:
                continue
            top = [e for e in f["examples"] if e["kind"] == "top"][:n_examples]
            for e, same in distinct_examples(top, dedup_window):
                rows.append({
                    "sae_id": f["sae_id"], "layer": f["layer"], "feature": f["feature"], "rank": e["rank"], "same": same,
                    "score": max(1, min(10, math.ceil(10 * e["value"] / f["max_activation"]))) if f["max_activation"] > 0 else 1,
                    "vector": e["residual"],
                })
        return pa.Table.from_pylist(rows) if rows else pa.table({
            "sae_id": pa.array([], pa.string()), "layer": pa.array([], pa.int32()), "feature": pa.array([], pa.int64()),
            "rank": pa.array([], pa.int32()), "same": pa.array([], pa.int64()), "score": pa.array([], pa.int64()),
            "vector": pa.array([], pa.list_(pa.float32()))})

    return build


def verbalize(features, sidecar_path: str, n_examples: int = 10, run: AVRunConfig = AVRunConfig()) -> pa.Table:
    """AV explanations of each feature's top examples, near-duplicates once (`run.dedup_window`):
    rows (feature, rank, same, score, explanation, verbalizer, av_engine, av_error).
    Examples need the residual vector (collect with keep_residual) of the AV's extraction
    layer: features of SAEs at other layers get none."""
    from baez_ray.ray_pool import gather

    layer = load_sidecar(sidecar_path).extraction_layer
    rows = features.map_batches(top_example_vectors(n_examples, layer, run.dedup_window), batch_format="pyarrow")
    rows = rows.filter(lambda r: r["vector"] is not None)
    at_most = features.count() * n_examples  # features with fewer top examples (or no residuals) send fewer
    with progress.bar("av", total=at_most, unit="example") as bar:
        out = gather(verbalize_vectors(rows, sidecar_path, run).drop_columns(["vector"]))
        bar.add_total(out.num_rows - at_most)  # the examples there were
    return out
