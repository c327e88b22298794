"""The `intervention` benchmark (output side; after Gur-Arieh et al. 2025, "Enhancing
automated interpretability with output-centric feature descriptions"): does the label say
what the feature *does* to the model's output?

    keys (sae_id, feature) ─SteerWorker actors (the base model and the SAEs' decoder rows,
       loaded once per job: ray_pool.actor_map keep=True), a batch of features per call ─▶
    CONTINUATIONS rows: per feature, the neutral prompts, their greedy continuations with the
       feature's decoder direction added to the residual at its SAE's layer (models/steer.py)
       and without it (the same texts for every feature), the steering's KL, or an error
    continuations × the feature's subjects (its labels + the random-label control) ─▶
    one scorer prompt per (label, prompt): the steered and the unsteered continuation in a
       seeded order, the same for every label of the feature, the steered one first in half
       of its pairs ─▶ (stages/score.py) the scorer answers 1 or 2 (`intervention`, parsed,
       retried when unreadable) or gives P("1") against P("2") (`intervention_logprob`)

Metrics (stages/score.py): `truth` is 1 where the steered continuation is shown first, the
prediction 1 where the scorer picks the first. `intervention`: balanced accuracy over the
two positions = the share of pairs where the scorer picked the steered continuation,
averaged over the positions it was shown in (the plain accuracy when no pair failed; a
scorer that always says "1" gets 0.5); chance 0.5. `intervention_logprob`: AUROC of
P(first) against truth (chance 0.5), and the balanced accuracy of P(first) > 0.5.

Defaults (config.ScoreConfig; docs/output-scoring.md): `intervention_pairs` 6 prompts,
`intervention_tokens` 25 new tokens (the paper: 25), `intervention_scale` 0.2 of the mean
residual norm (the paper sets a strength per feature by a target KL of 0.25 or 0.5; 0.2
gives a median KL of 0.3-0.5 on the demo SAE); greedy decoding (the paper samples at
temperature 0.75): the unsteered continuations are shared across features and a run is
reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from baez_ray.config import ModelConfig, SAEConfig, ScoreConfig
from baez_ray.llm import prompts
from baez_ray.stages.split import feature_seed

BENCHMARKS = ("intervention", "intervention_logprob")
VERSIONS = {"intervention": prompts.INTERVENTION_VERSION, "intervention_logprob": prompts.INTERVENTION_LOGPROB_VERSION}
ANSWER_TOKENS = 8  # `intervention`: room for "1", or a short "Continuation 2"
CONTINUATIONS = pa.schema([
    pa.field("sae_id", pa.string()), pa.field("feature", pa.int64()), pa.field("prompts", pa.list_(pa.string())),
    pa.field("steered", pa.list_(pa.string())), pa.field("unsteered", pa.list_(pa.string())), pa.field("kl", pa.float64()),
    pa.field("scale", pa.float64()), pa.field("error", pa.string())])


def neutral_prompts(n: int, seed: int) -> list[str]:
    """The `n` base-model prompts of a run: prompts.NEUTRAL_PROMPTS in a seeded order."""
    order = np.random.default_rng(seed).permutation(len(prompts.NEUTRAL_PROMPTS))
    return [prompts.NEUTRAL_PROMPTS[i] for i in order[:n]]


class SteerWorker:
    """Ray Data actor: rows (sae_id, feature) → CONTINUATIONS rows. The features of a batch
    that share an SAE are steered in one generate call (features × prompts rows)."""

    def __init__(self, model: dict, saes: list[dict], prompts: list[str], new_tokens: int, scale: float, threads: int):
        import torch

        from baez_ray.models.steer import Steerer

        torch.set_num_threads(threads)
        self.steer = Steerer(ModelConfig(**model), [SAEConfig(**s) for s in saes], prompts, new_tokens)
        self.scale = scale

    def _rows(self, sae_id: str, feats: list[int]) -> list[dict]:
        base = {"sae_id": sae_id, "prompts": self.steer.prompts, "unsteered": self.steer.unsteered, "scale": self.scale}
        if sae_id not in self.steer.decoders:
            return [{**base, "feature": f, "error": f"SAE {sae_id!r} is not among the job's saes: no decoder to steer with"} for f in feats]
        n = self.steer.decoders[sae_id][1].shape[0]
        bad = [f for f in feats if not 0 <= f < n]
        ok = [f for f in feats if 0 <= f < n]
        rows = [{**base, "feature": f, "error": f"feature {f} is outside SAE {sae_id!r} (0..{n - 1})"} for f in bad]
        if ok:
            layer, vectors = self.steer.directions(sae_id, ok, self.scale)
            kls = self.steer.kl(layer, vectors)
            for f, kl, texts in zip(ok, kls, self.steer.continue_(layer, vectors)):
                rows.append({**base, "feature": f, "steered": texts, "kl": kl})
        return rows

    def __call__(self, batch: pa.Table) -> pa.Table:
        by_sae: dict[str, list[int]] = {}
        for s, f in zip(batch.column("sae_id").to_pylist(), batch.column("feature").to_pylist()):
            by_sae.setdefault(s, []).append(int(f))
        rows = [r for s, feats in by_sae.items() for r in self._rows(s, feats)]
        return pa.Table.from_pylist(rows, schema=CONTINUATIONS)


def continuations(keys: pa.Table, model: ModelConfig, saes: list[SAEConfig], cfg: ScoreConfig, seed: int):
    """A Ray Dataset of CONTINUATIONS rows, one per key (sae_id, feature), from a pool of
    `intervention_actors` SteerWorkers (kept for the job: a second call reuses them)."""
    import ray

    from baez_ray.ray_pool import actor_map

    used = [s for s in saes if s.id in set(keys.column("sae_id").to_pylist())]
    kwargs = {"model": model.model_dump(), "saes": [s.model_dump() for s in used], "prompts": neutral_prompts(cfg.intervention_pairs, seed),
              "new_tokens": cfg.intervention_tokens, "scale": cfg.intervention_scale, "threads": max(1, math.ceil(model.num_cpus))}
    ds = ray.data.from_arrow(keys.select(["sae_id", "feature"]))
    return actor_map(ds, SteerWorker, kwargs, size=cfg.intervention_actors, num_cpus=model.num_cpus, num_gpus=model.num_gpus,
                     resources=model.resources, batch_size=cfg.intervention_batch, fault_tolerant=True, keep=True)


def steered_first(sae_id: str, feature: int, n: int, seed: int) -> list[bool]:
    """Which of a feature's n pairs show the steered continuation first: a seeded half
    (n // 2 of them, one more or less by the seed when n is odd)."""
    rng = np.random.default_rng(feature_seed(seed, sae_id, feature) + 104729)
    first = rng.permutation(n) < (n // 2 + (int(rng.integers(0, 2)) if n % 2 else 0))
    return first.tolist()


def prompt_rows(cont: dict, subjects: list[dict], cfg: ScoreConfig, seed: int) -> list[dict]:
    """Scorer prompt rows (score.SCORE_PROMPTS fields) of one CONTINUATIONS row (no error)
    for each of its feature's subjects and each intervention benchmark of `cfg`."""
    n = len(cont["prompts"])
    order = steered_first(cont["sae_id"], cont["feature"], n, seed)
    rows = []
    for bench in [b for b in cfg.benchmarks if b in BENCHMARKS]:
        logprob = bench == "intervention_logprob"
        for s in subjects:
            common = {"sae_id": s["sae_id"], "layer": s["layer"], "feature": s["feature"], "method": s["method"], "benchmark": bench,
                      "label": s["label"], "temperature": 0.0, "stop": None, "max_tokens": 1 if logprob else ANSWER_TOKENS,
                      "constraint": prompts.INTERVENTION_CONSTRAINT if logprob else prompts.INTERVENTION_CHOICE}
            for i, (p, on, off, first) in enumerate(zip(cont["prompts"], cont["steered"], cont["unsteered"], order)):
                a, b = (on, off) if first else (off, on)
                rows.append({**common, "request_id": f"{s['sae_id']}|{s['feature']}|{s['method']}|{bench}|{i}",
                             "messages": prompts.intervention_messages(s["label"], p, a, b), "truth": [int(first)]})
    return rows


def parse(row: dict, attempt: int):
    """An `intervention` answer → ([1.0] when it picks the first continuation, [0.0] the
    second), or (None, problem)."""
    choice, problem = prompts.parse_choice(row["answer"])
    return (None, problem) if choice is None else ([1.0 if choice == 1 else 0.0], None)


def retry(row: dict, problem: str, attempt: int) -> list:
    return list(row["messages"]) + [{"role": "assistant", "content": row["answer"] or ""},
                                    {"role": "user", "content": prompts.INTERVENTION_RETRY_TEMPLATE.format(problem=problem)}]
