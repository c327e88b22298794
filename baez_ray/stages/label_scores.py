"""The label job's score sample (`label.score`): planned before the labels, scored with
them as they come, finished after (SPEC §3 on a label job's labels).

    plan    the selected features that get a label (tier 0: not routed; tiers 1, 2; tier 3
            with an AV) ─▶ the sample: `sample` per SAE among those with
            `min_test_examples` held-out examples (null: all of them) ─▶ score_sample/
            ─▶ blocks of ≤ 256 features, a Ray task each (score.block_items_table):
            their ITEMS (excerpts, negatives, truth) in the object store
    stream  a label shard's LABELS rows, as the workers write them (label_shards)
            ─score.label_prompts (sampled features with a label)─▶ scorer prompts
            ─backend (asked until parsed in the API actors)─▶ final rows, written
            ─score.scores_of (a Ray task)─▶ the shard's SCORES part, committed with its labels
    finish  streamed SCORES ∪ score.score_labels over the rest (the random-label control,
            the embedding benchmarks, labels not streamed) ─▶ scores/

A shard's labels and scores stream together (`streams`) when the scorer asks until parsed
itself (the API backends: `backends.asks_in_backend`) and the negatives are other features'
examples: a feature is scored as soon as its label exists, in the same Ray Data pipeline,
and the requests of both stages share the backend's window. The items do not depend on
how a label is scored (methods are compared on the same excerpts). A sampled feature whose
label failed is not scored; one with fewer than `min_test_examples` held-out examples has
no items (counted).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from baez_ray import progress, schema
from baez_ray.config import LabelConfig, LabelScoreConfig, LLMConfig
from baez_ray.llm.backends import asks_in_backend
from baez_ray.llm.rounds import score_rounds
from baez_ray.ray_pool import gather, remote
from baez_ray.rundir import Run, write_parquet_atomic, write_table
from baez_ray.schema import key_table
from baez_ray.stages.label_shards import SHARD_DIR, committed_scores
from baez_ray.stages.score import (ITEMS, LIST_BENCHMARKS, LOGPROB_VERSIONS, label_prompts, round_counts, sample_items, score_labels, scores_of,
                                   subjects)

SAMPLE_DIR = "score_sample"
COUNTS = ("prompts", "failed_prompts", "retried_prompts", "scorer_input_tokens", "scorer_output_tokens", "scorer_cost_usd")


def scorer_of(cfg: LabelConfig) -> LLMConfig:
    return cfg.score.scorer or cfg.explainer


def llm_benchmarks(cfg: LabelScoreConfig) -> list[str]:
    return [b for b in cfg.benchmarks if b in LIST_BENCHMARKS or b in LOGPROB_VERSIONS]


def unstreamed(cfg: LabelScoreConfig) -> list[str]:
    """The LLM benchmarks the label shards do not stream (simulation, intervention,
    intervention_logprob): scored after the labels, every subject at once."""
    return [b for b in cfg.benchmarks if b not in llm_benchmarks(cfg) and b not in ("embedding", "logit_embedding")]


def streams(cfg: LabelConfig) -> bool:
    """Whether the label shards score their sample as they label it (see the docstring)."""
    s = cfg.score
    return s is not None and s.negatives == "other_features" and bool(llm_benchmarks(s)) and asks_in_backend(scorer_of(cfg))


@dataclass
class ScorePlan:
    """A label job's score sample: its keys, their blocks and the ITEMS of each block (Ray
    ObjectRefs), and the counts of what was streamed."""

    cfg: LabelScoreConfig
    scorer: LLMConfig
    keys: pa.Table  # (sae_id, feature) of the sample, in key order
    blocks: pa.Table  # keys + block
    refs: list  # the ITEMS table of each block
    stream: bool
    counts: dict = field(default_factory=dict)

    def scorer_for(self, chunk: set[tuple[str, int]]):
        """The `scored` step of a label shard of the features `chunk` (label_shards.
        commit_dataset), or None when the shard streams no score."""
        if not self.stream or not chunk & set(zip(self.keys.column("sae_id").to_pylist(), self.keys.column("feature").to_pylist())):
            return None
        return lambda labels, out: stream_scores(labels, self, out)


def candidates(cfg: LabelConfig, keys: dict[int, set]) -> pa.Table:
    """The selected features that get a label: every tier but tier 3 without an AV."""
    tiers = [t for t in sorted(keys) if t != 3 or cfg.av_sidecar]
    return key_table(sorted(k for t in tiers for k in keys[t]))


def sample_keys(cfg: LabelConfig, seed: int, features_dir: Path, keys: dict[int, set]) -> tuple[pa.Table, dict]:
    """The sample among `candidates`: all of them when `sample` is null and the items drop
    the features with too few held-out examples themselves; else a seeded sample among
    those with enough (counted in the workers: split.sample_held_out)."""
    from baez_ray.stages.split import sample_held_out

    s, cand = cfg.score, candidates(cfg, keys)
    if s.sample is None and s.negatives == "other_features":
        return cand, {"candidates": cand.num_rows}
    sample, counts = sample_held_out(cand, features_dir, s.test_examples, s.min_test_examples, s.sample, seed)
    return sample, {"candidates": cand.num_rows, **counts}


def plan_scores(cfg: LabelConfig, seed: int, run: Run, features_dir: Path, keys: dict[int, set]) -> ScorePlan:
    """The sample (written to score_sample/) and its items, whose Ray tasks start now."""
    sample, counts = sample_keys(cfg, seed, features_dir, keys)
    write_table(sample, run.table_dir(SAMPLE_DIR))
    blocks, refs = sample_items(features_dir, sample, cfg.score, seed, cfg.score.min_test_examples) \
        if cfg.score.negatives == "other_features" else (None, [])
    return ScorePlan(cfg.score, scorer_of(cfg), sample, blocks, refs, streams(cfg), {"sample": sample.num_rows, **counts})


def stream_scores(labels, plan: ScorePlan, out: Path) -> dict:
    """Run a shard's label rows (a lazy Dataset, written as they pass) on through the
    scorer: its prompts from the sample's items, asked until parsed, the final rows written
    beside `out`; then the shard's SCORES rows to `out` (a Ray task). Returns the counts."""
    import ray

    cfg = plan.cfg.model_copy(update={"benchmarks": llm_benchmarks(plan.cfg)})
    prompts = labels.map_batches(label_prompts, batch_format="pyarrow",
                                 fn_kwargs={"blocks": ray.put(plan.blocks), "refs": plan.refs, "cfg": cfg})
    done = score_rounds(prompts, plan.scorer, cfg.max_retries, lazy=True)
    tmp = out.with_name(f".{out.stem}.rows.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with progress.bar("label+score", total=None, unit="prompt"):
        counts = gather(done.map_batches(_write_final, batch_format="pyarrow", fn_kwargs={"out_dir": str(tmp)}))
    rows = ray.get(remote(_shard_scores).remote(str(tmp), str(out)))
    shutil.rmtree(tmp, ignore_errors=True)
    info = {k: (float if k.endswith("usd") else int)(pc.sum(counts.column(k)).as_py() or 0) if counts.num_rows else 0 for k in COUNTS}
    return {**info, "rows": rows}


FINAL_COLUMNS = ["sae_id", "layer", "feature", "method", "benchmark", "label", "request_id", "truth", "value", "tries",
                 "input_tokens", "output_tokens", "cost_usd"]


def _write_final(batch: pa.Table, out_dir: str) -> pa.Table:
    """A map_batches function: final scorer rows → a Parquet file in `out_dir` (named by
    their request ids: a retried batch rewrites its own file); returns their counts."""
    if batch.num_rows:
        digest = hashlib.sha1(repr(batch.column("request_id").to_pylist()).encode()).hexdigest()[:20]
        write_parquet_atomic(batch.select(FINAL_COLUMNS), Path(out_dir) / f"part-{digest}.parquet")
        return round_counts(batch)
    return pa.table({k: pa.array([0.0 if k.endswith("usd") else 0]) for k in COUNTS})


def _shard_scores(rows_dir: str, out: str) -> int:
    """A Ray task: the SCORES rows of a shard's final scorer rows (`scores_of`), written to
    `out`; returns their number."""
    files = sorted(Path(rows_dir).glob("part-*.parquet"))
    final = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default") if files else None
    table = schema.conform(scores_of(final), schema.SCORES) if final is not None else schema.empty(schema.SCORES)
    write_parquet_atomic(table, Path(out))
    return table.num_rows


def finish_scores(cfg: LabelConfig, seed: int, run: Run, features_dir: Path, keys: dict[int, set],
                  plan: ScorePlan | None = None, negatives=None, model=None, saes=(), steering_dir=None) -> tuple[pa.Table, dict]:
    """The score stage: the streamed SCORES of the sample's labels, and `score_labels` over
    the rest: the random-label control, the embedding benchmarks, simulation and
    intervention (never streamed: `model`, `saes` and `steering_dir` for the steering, see
    score.score_labels), and every label the shards did not score (`negatives`: the corpus
    negatives of the sample, `negatives: corpus`). Returns the SCORES table and the stage's
    counts."""
    s = cfg.score
    sample = plan.keys if plan is not None else saved_sample(cfg, seed, run, features_dir, keys)
    labels = pq.read_table(run.table_dir("labels"), columns=["sae_id", "layer", "feature", "method", "label"])
    streamed, counts = committed_scores(run.table_dir(SHARD_DIR))
    subs = subjects(labels, sample, s, seed)
    streamed = streamed.join(subs.select(["sae_id", "feature", "method", "label"]), ["sae_id", "feature", "method", "label"], join_type="left semi")
    done = set(zip(*(streamed.column(c).to_pylist() for c in ("sae_id", "feature", "method"))))
    rest = subs.filter(pa.array([k not in done for k in zip(*(subs.column(c).to_pylist() for c in ("sae_id", "feature", "method")))], pa.bool_()))
    info = {k: counts.get(k, 0) for k in COUNTS}
    parts = [streamed]
    embedded = [([b], subs) for b in ("embedding", "logit_embedding") if b in s.benchmarks]
    todo = [(llm_benchmarks(s), rest), (unstreamed(s), subs)] + embedded
    todo = [(b, t) for b, t in todo if b and t.num_rows]
    if todo:
        items, tests = _items(cfg, seed, features_dir, sample, plan)
        for benchmarks, subs_ in todo:
            its, tes = _logit_inputs(cfg, features_dir, sample) if benchmarks == ["logit_embedding"] else (items, tests)
            table, more = score_labels(tes, sample, labels, s.model_copy(update={"benchmarks": benchmarks}), scorer_of(cfg), seed=seed,
                                       items=its, subs=subs_, negatives_table=negatives, model=model, saes=saes, steering_dir=steering_dir)
            parts.append(table)
            for k in COUNTS:
                info[k] += more.get(k, 0)
            info.update({k: v for k, v in more.items() if k.startswith("steer")})  # intervention: features steered, KL
    table = pa.concat_tables([schema.conform(p, schema.SCORES) for p in parts])
    table = table.sort_by([("sae_id", "ascending"), ("feature", "ascending"), ("method", "ascending"), ("benchmark", "ascending")])
    scored = table.select(["sae_id", "feature"]).group_by(["sae_id", "feature"]).aggregate([]).num_rows
    info.update(features=scored, subjects=subs.num_rows, streamed_rows=streamed.num_rows, sample=sample.num_rows)
    return table, info


def saved_sample(cfg: LabelConfig, seed: int, run: Run, features_dir: Path, keys: dict[int, set]) -> pa.Table:
    """The sample the label stage planned (score_sample/), or planned now (a run whose
    label stage had finished before it had a score section)."""
    path = run.table_dir(SAMPLE_DIR)
    if path.exists() and any(path.glob("part-*.parquet")):
        return pq.read_table(path).select(["sae_id", "feature"])
    sample, _ = sample_keys(cfg, seed, features_dir, keys)
    write_table(sample, path)
    return sample


def _logit_inputs(cfg: LabelConfig, features_dir: Path, sample: pa.Table):
    """(items, tests) for logit_embedding: no excerpt items, the held-out test rows with the
    features' promoted tokens (pos_tokens, pos_values) it reads."""
    import ray

    from baez_ray.stages.split import held_out_examples

    return ray.data.from_arrow(ITEMS.empty_table()), held_out_examples(features_dir, sample, cfg.score.test_examples)


def _items(cfg: LabelConfig, seed: int, features_dir: Path, sample: pa.Table, plan: ScorePlan | None):
    """(items, tests) for score_labels: the plan's items, or items built now by Ray tasks;
    with corpus negatives, the held-out tests (score_labels builds its items with them)."""
    import ray

    from baez_ray.stages.split import held_out_examples

    if cfg.score.negatives == "corpus":
        return None, held_out_examples(features_dir, sample, cfg.score.test_examples)
    refs = plan.refs if plan is not None and plan.refs else sample_items(features_dir, sample, cfg.score, seed, cfg.score.min_test_examples)[1]
    return (ray.data.from_arrow_refs(refs) if refs else ray.data.from_arrow(ITEMS.empty_table())), None
