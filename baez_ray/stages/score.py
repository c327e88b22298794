"""Scoring labels (SPEC §3): detection, fuzz, embedding, the log-prob benchmarks,
simulation, intervention, logit_embedding and the random-label control, as one streaming Ray Data pipeline. The driver holds the keys
(sae_id, feature), the labels and counts; examples, prompts and answers stay in the
workers and the object store.

    test examples (rows sae_id, feature, examples) [+ corpus negatives rows]
      ─tag: block of the feature (keys in order, cut into blocks of ≤ block_features)─▶
      groupby(block).map_groups: items per feature (positives + negatives, shuffled once
         per feature, shared by every method: methods are compared on the same excerpts)
      ─map_batches (× the subjects of each feature: its labels + the random_label control)─▶
      prompt rows: detection / fuzz (examples_per_prompt excerpts each), detection_logprob /
         fuzz_logprob (one excerpt each, a label's prompts one after another: shared prefix),
         simulation (one excerpt each, its tokens numbered: stages/simulation.py)
    keys ─SteerWorker actors (the base model steered: stages/intervention.py)─▶ continuations
      ─map_batches (× subjects)─▶ intervention / intervention_logprob prompt rows (one pair each)
      ─all prompt rows: backend (llm.backends.generate)─▶ answers ─parse in workers─▶ 0/1
         lists, [p_yes], [choice] or predicted activations (simulation: expected values)
                    ▲                                   │ unreadable
                    └── retry round over those rows only (llm.rounds.ask_until_parsed),
                        up to max_retries times
      ─groupby(sae_id, feature, method, benchmark).map_groups─▶ metrics
    items × subjects ─EmbedScorer actor pool (one encode call per batch)─▶ gap, AUROC
    test rows' promoted tokens ─stages/logit_embedding.py─▶ logit items (the feature's
       promoted tokens + other features' of its block) × subjects ─EmbedScorer─▶ gap, AUROC
       (logit_embedding: the output side, benchmarks.py)
    ─▶ scores table (schema.SCORES), one row per (feature, method, benchmark), with the
       headline metric (metrics.HEADLINE) also on each half of the excerpts (score_half_a/b: the split-half
       reliability of metrics.py, from the same answers and similarities, no extra call)

Negatives (`negatives = other_features`, the default): the features to score, in
(sae_id, feature) order, are cut into n_blocks = ceil(N / block_features) contiguous
blocks of nearly equal size (block of the i-th key: i · n_blocks // N); a feature's
negatives are `n_negatives` distinct test examples drawn uniformly (seeded per feature)
from the test examples of the *other* features of its block, its own examples skipped by
index arithmetic: O(n_negatives) per feature, whatever N. With N ≤ block_features (256)
there is one block and the rule is a uniform draw among all other features' test examples.
`negatives_table` rows (sae_id, feature, examples: corpus windows where the feature does
not fire, `negatives = corpus`) replace the draw, their first `n_negatives` taken.
Fuzz: positives highlighted at their active tokens (>= fuzz_threshold × the example max),
negatives at as many random tokens as the positives' mean, drawn per example.

A prompt whose answer stays unreadable after the retries, or that failed in the backend,
is a *failed batch*: its excerpts count in `n_failed` (and in `n_shown`), never silently
dropped; the metrics use the answered excerpts. A log-prob prompt whose two tokens are
both missing from the scorer's top log-probs is failed the same way (not retried: asking
again gives the same probabilities). A feature that cannot be steered (its SAE is not
among the job's) has its intervention pairs counted as failed. Positives are the
feature's test examples (the caller splits: see stages/split.py).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from baez_ray import progress, schema
from baez_ray.config import LLMConfig, ScoreConfig
from baez_ray.llm import prompts
from baez_ray.llm.rounds import score_rounds
from baez_ray.metrics import auroc, binary_metrics, embedding_metrics, half_scores
from baez_ray.models.windows import token_text
from baez_ray.ray_pool import actor_map, gather, resolved
from baez_ray.rundir import log
from baez_ray.stages import intervention, simulation
from baez_ray.stages.logit_embedding import VERSION as LOGIT_EMBEDDING_VERSION
from baez_ray.stages.logit_embedding import logit_items_dataset
from baez_ray.stages.split import feature_seed

RANDOM_LABEL = "random_label"
EMBEDDING_VERSION = "embedding/v1"
LIST_BENCHMARKS = ("detection", "fuzz")  # a list of 0/1 per prompt of examples_per_prompt excerpts
LOGPROB_VERSIONS = {"detection_logprob": prompts.DETECTION_LOGPROB_VERSION, "fuzz_logprob": prompts.FUZZ_LOGPROB_VERSION,
                    "intervention_logprob": prompts.INTERVENTION_LOGPROB_VERSION}  # one answer token, P(A) against P(B)
# one 0/1 answer per excerpt (or pair), scored by balanced accuracy
LIST_VERSIONS = {"detection": prompts.DETECTION_VERSION, "fuzz": prompts.FUZZ_VERSION, "intervention": prompts.INTERVENTION_VERSION}
# benchmarks whose answers are read their own way (llm.rounds.score_rounds `parsers`)
PARSERS = {"simulation": (simulation.parse, simulation.retry), "intervention": (intervention.parse, intervention.retry)}
BLOCK_FEATURES = 256  # features per block of the negatives draw (see the module docstring)
MAX_PARTITIONS = 64  # of the two shuffles (items by block, answers by score row): about a partition per 4096 prompts
# what the items need of an example (the rest, residual vectors included, is dropped early)
ITEM_EXAMPLE = pa.struct([pa.field("token_strs", pa.list_(pa.string())), pa.field("acts", pa.list_(pa.float32()))])
# scorer prompt rows: schema.PROMPTS + what the metrics need (truth: the 0/1 of each excerpt shown)
SCORE_PROMPTS = pa.schema(list(schema.PROMPTS) + [
    pa.field("sae_id", pa.string()), pa.field("layer", pa.int32()), pa.field("feature", pa.int64()), pa.field("method", pa.string()),
    pa.field("benchmark", pa.string()), pa.field("label", pa.string()), pa.field("truth", pa.list_(pa.int8())),
    pa.field("acts", pa.list_(pa.float32()))])  # simulation: the excerpt's true activations, 0-10
# `excerpts`: with simulation, each excerpt's tokens and the feature's activations (0 on negatives)
ITEMS = pa.schema([pa.field("sae_id", pa.string()), pa.field("feature", pa.int64()), pa.field("plain", pa.list_(pa.string())),
                   pa.field("fuzz", pa.list_(pa.string())), pa.field("truth", pa.list_(pa.int8())),
                   pa.field("excerpts", pa.list_(ITEM_EXAMPLE))])


def example_text(ex: dict) -> str:
    return "".join(token_text(t) for t in ex["token_strs"])


def fuzz_text(ex: dict, positions: set[int]) -> str:
    """The example with the tokens at `positions` wrapped in << >> (runs share a pair)."""
    acts = [1.0 if i in positions else 0.0 for i in range(len(ex["token_strs"]))]
    return prompts.mark_tokens([token_text(t) for t in ex["token_strs"]], acts, 0.5)


# ---- items: each feature's excerpts, built per block in the workers ------------------------

def feature_blocks(keys: pa.Table, block_features: int = BLOCK_FEATURES) -> pa.Table:
    """(sae_id, feature, block) of the distinct keys, in (sae_id, feature) order, cut into
    ceil(N / block_features) contiguous blocks of nearly equal size."""
    keys = keys.select(["sae_id", "feature"]).group_by(["sae_id", "feature"]).aggregate([])
    keys = keys.sort_by([("sae_id", "ascending"), ("feature", "ascending")])
    n = keys.num_rows
    n_blocks = max(1, math.ceil(n / block_features))
    return keys.append_column("block", pa.array((np.arange(n) * n_blocks) // max(n, 1), pa.int32()))


def _tag(batch: pa.Table, blocks, role: str) -> pa.Table:
    """Rows (sae_id, feature, examples) of the features in `blocks` → + block and role
    (test: positives; negatives: given negatives), examples cut to ITEM_EXAMPLE."""
    blocks = resolved(blocks)
    idx = pa.table({"sae_id": batch.column("sae_id"), "feature": batch.column("feature").cast(pa.int64()),
                    "_row": pa.array(np.arange(batch.num_rows), pa.int64())})
    hit = idx.join(blocks, ["sae_id", "feature"], join_type="inner").sort_by("_row")
    examples = [[{"token_strs": e["token_strs"], "acts": e["acts"]} for e in exs]
                for exs in batch.column("examples").take(hit.column("_row")).to_pylist()]
    return pa.table({"sae_id": hit.column("sae_id"), "feature": hit.column("feature"), "block": hit.column("block"),
                     "role": pa.array([role] * hit.num_rows, pa.string()), "examples": pa.array(examples, pa.list_(ITEM_EXAMPLE))})


def block_items(tests: dict[tuple[str, int], list[dict]], cfg: ScoreConfig, seed: int,
                negatives: dict[tuple[str, int], list[dict]] | None = None) -> list[dict]:
    """ITEMS rows of one block: `tests` maps each of its features to its test examples
    (dicts with token_strs and acts); `negatives`, when given, each feature's negatives."""
    keys = sorted(tests)
    # the block's test examples in one list, features in key order; a feature's own
    # examples are one slice of it, skipped by index arithmetic (O(n_negatives) per feature)
    pool = [e for k in keys for e in tests[k]]
    block, at = {}, 0
    for k in keys:
        block[k], at = (at, len(tests[k])), at + len(tests[k])
    out = []
    for key in keys:
        rng = np.random.default_rng(feature_seed(seed, key[0], key[1]))
        pos = tests[key][: cfg.test_examples]
        if negatives is not None:
            neg = list(negatives.get(key, []))[: cfg.n_negatives]
        else:
            start, own = block[key]
            n_others = len(pool) - own  # a uniform draw among the other features' examples
            take = rng.choice(n_others, size=min(cfg.n_negatives, n_others), replace=False) if n_others else []
            neg = [pool[i + own if i >= start else i] for i in take]
        marks = []
        for e in pos:
            peak = max(e["acts"]) if e["acts"] else 0.0
            marks.append({i for i, a in enumerate(e["acts"]) if peak > 0 and a >= cfg.fuzz_threshold * peak})
        n_mark = max(1, round(float(np.mean([len(m) for m in marks])))) if marks else 1
        for e in neg:
            n_tok = len(e["token_strs"])
            marks.append(set(rng.choice(n_tok, size=min(n_mark, n_tok), replace=False).tolist()) if n_tok else set())
        examples = list(pos) + list(neg)
        truth = [1] * len(pos) + [0] * len(neg)
        order = rng.permutation(len(examples))
        sim = "simulation" in cfg.benchmarks
        out.append({"sae_id": key[0], "feature": key[1], "plain": [example_text(examples[i]) for i in order],
                    "fuzz": [fuzz_text(examples[i], marks[i]) for i in order], "truth": [truth[i] for i in order],
                    "excerpts": [simulation.excerpt(examples[i], own=truth[i] == 1 or negatives is not None) for i in order] if sim else []})
    return out


def _items_group(group: pa.Table, cfg: ScoreConfig, seed: int, corpus: bool) -> pa.Table:
    tests: dict[tuple, list] = {}
    negs: dict[tuple, list] = {}
    for s, f, role, exs in zip(*(group.column(c).to_pylist() for c in ("sae_id", "feature", "role", "examples"))):
        (tests if role == "test" else negs).setdefault((s, f), []).extend(exs)
    rows = block_items(tests, cfg, seed, negs if corpus else None)
    return pa.Table.from_pylist(rows, schema=ITEMS) if rows else ITEMS.empty_table()


def items_dataset(tests, keys: pa.Table, cfg: ScoreConfig, seed: int, negatives_table: pa.Table | None = None,
                  block_features: int = BLOCK_FEATURES):
    """Ray Dataset of ITEMS rows (sae_id, feature, plain, fuzz, truth), one per key in
    `keys`: `tests` is a Ray Dataset of rows (sae_id, feature, examples: the positives);
    `negatives_table` a table or an ObjectRef of one (`corpus_negatives_ref`)."""
    import ray

    blocks = ray.put(feature_blocks(keys, block_features))
    ds = tests.map_batches(_tag, batch_format="pyarrow", fn_kwargs={"blocks": blocks, "role": "test"})
    if negatives_table is not None:
        negs = ray.data.from_arrow_refs([negatives_table]).select_columns(["sae_id", "feature", "examples"]) \
            if isinstance(negatives_table, ray.ObjectRef) else ray.data.from_arrow(negatives_table.select(["sae_id", "feature", "examples"]))
        ds = ds.union(negs.map_batches(_tag, batch_format="pyarrow", fn_kwargs={"blocks": blocks, "role": "negatives"}))
    n_blocks = max(1, math.ceil(keys.num_rows / block_features))
    return ds.groupby("block", num_partitions=min(n_blocks, MAX_PARTITIONS)).map_groups(_items_group, batch_format="pyarrow",
                                          fn_kwargs={"cfg": cfg, "seed": seed, "corpus": negatives_table is not None})


def block_items_table(features_dir: str, keys: pa.Table, cfg: ScoreConfig, seed: int, min_test: int) -> pa.Table:
    """ITEMS rows of one block of features `keys` (sae_id, feature), read from features/
    (a Ray task; no shuffle): each feature's held-out test examples (split.held_out_tests),
    those with at least `min_test` of them, shown with negatives drawn from the block's
    other features (`block_items`)."""
    from baez_ray.schema import read_keyed
    from baez_ray.stages.split import held_out_tests

    tests = {}
    for r in read_keyed(features_dir, keys, ["sae_id", "feature", "examples"]).to_pylist():
        held = held_out_tests(r["examples"], cfg.test_examples)
        if len(held) >= min_test:
            tests[(r["sae_id"], r["feature"])] = [{"token_strs": e["token_strs"], "acts": e["acts"]} for e in held]
    rows = block_items(tests, cfg, seed)
    return pa.Table.from_pylist(rows, schema=ITEMS) if rows else ITEMS.empty_table()


def sample_items(features_dir, keys: pa.Table, cfg: ScoreConfig, seed: int, min_test: int,
                 block_features: int = BLOCK_FEATURES) -> tuple[pa.Table, list]:
    """The items of the features `keys`, one Ray task per block (`block_items_table`),
    started now: (the keys with their block (`feature_blocks`), the ObjectRef of each
    block's ITEMS table)."""
    from baez_ray.ray_pool import remote

    blocks = feature_blocks(keys, block_features)
    n_blocks = int(pc.max(blocks.column("block")).as_py()) + 1 if blocks.num_rows else 0
    refs = [remote(block_items_table).remote(str(features_dir), blocks.filter(pc.equal(blocks.column("block"), b)).select(["sae_id", "feature"]),
                                             cfg, seed, min_test) for b in range(n_blocks)]
    return blocks, refs


def label_prompts(batch: pa.Table, blocks, refs: list, cfg: ScoreConfig) -> pa.Table:
    """A map_batches function: LABELS rows → the scorer prompt rows (SCORE_PROMPTS) of
    those with a label whose feature is among `blocks` (the sample), on its items (the
    ITEMS table of its block, `refs`)."""
    import ray

    blocks = resolved(blocks)
    labelled = batch.filter(pc.is_valid(batch.column("label"))).select(["sae_id", "layer", "feature", "method", "label"])
    labelled = labelled.join(blocks, ["sae_id", "feature"], join_type="inner")
    items: dict[tuple[str, int], dict] = {}
    for b in sorted(set(labelled.column("block").to_pylist())):
        table = ray.get(refs[b])
        for r in table.filter(pc.is_in(table.column("feature"), value_set=labelled.column("feature"))).to_pylist():
            items[(r["sae_id"], r["feature"])] = r
    subs = sorted((r for r in labelled.drop_columns(["block"]).to_pylist() if (r["sae_id"], r["feature"]) in items),
                  key=lambda r: (r["method"], r["sae_id"], r["feature"]))
    return prompt_rows(subs, items, cfg)


# ---- subjects: what to score -----------------------------------------------------------------

def subjects(labels: pa.Table, keys: pa.Table, cfg: ScoreConfig, seed: int) -> pa.Table:
    """(sae_id, layer, feature, method, label) to score: every non-null label of a feature
    in `keys`, plus the random-label control: each feature scored with the label of another
    feature, chosen at random (a random derangement of the control method's labels)."""
    wanted = set(zip(keys.column("sae_id").to_pylist(), keys.column("feature").to_pylist()))
    rows = [r for r in labels.select(["sae_id", "layer", "feature", "method", "label"]).to_pylist()
            if r["label"] and (r["sae_id"], r["feature"]) in wanted]
    rows.sort(key=lambda r: (r["method"], r["sae_id"], r["feature"]))
    if cfg.random_label and rows:
        if cfg.control_method:
            base = [r for r in rows if r["method"] == cfg.control_method]
        else:  # one label per feature: that of the first method (in table order) that labelled it
            order = {m: i for i, m in enumerate(dict.fromkeys(labels.column("method").to_pylist()))}
            first: dict[tuple, dict] = {}
            for r in sorted(rows, key=lambda r: order[r["method"]]):
                first.setdefault((r["sae_id"], r["feature"]), r)
            base = sorted(first.values(), key=lambda r: (r["sae_id"], r["feature"]))
        if len(base) >= 2:
            rng = np.random.default_rng(seed + 7919)
            perm = rng.permutation(len(base))
            while np.any(perm == np.arange(len(base))):  # a derangement: nobody keeps its own label
                perm = rng.permutation(len(base))
            rows += [{**r, "method": RANDOM_LABEL, "label": base[j]["label"]} for r, j in zip(base, perm)]
    subs = pa.schema([pa.field("sae_id", pa.string()), pa.field("layer", pa.int32()), pa.field("feature", pa.int64()),
                      pa.field("method", pa.string()), pa.field("label", pa.string())])
    return pa.Table.from_pylist(rows, schema=subs)


def _subjects_of(batch: pa.Table, subs) -> tuple[list[dict], dict]:
    """The subjects of the features of an items batch (in subject order), and the batch's
    items by key."""
    subs = resolved(subs)
    items = {(r["sae_id"], r["feature"]): r for r in batch.to_pylist()}
    mine = subs.filter(pc.is_in(subs.column("feature"), value_set=batch.column("feature").unique()))
    return [s for s in mine.to_pylist() if (s["sae_id"], s["feature"]) in items], items


def n_prompts(n_items: int, cfg: ScoreConfig) -> int:
    """Scorer prompts of one subject with `n_items` excerpts."""
    per, cap = cfg.examples_per_prompt, cfg.simulation_excerpts
    sim = n_items if cap is None else min(n_items, 2 * cap)  # (at most: the caps are per kind)
    return sum(math.ceil(n_items / per) if b in LIST_BENCHMARKS else n_items if b in ("detection_logprob", "fuzz_logprob")
               else sim if b == "simulation" else 0 for b in cfg.benchmarks)


def _prompt_batch(batch: pa.Table, subs, cfg: ScoreConfig) -> pa.Table:
    """Scorer prompt rows of an items batch: every subject × LLM benchmark (`prompt_rows`)."""
    subjects_, items = _subjects_of(batch, subs)
    return prompt_rows(subjects_, items, cfg)


def prompt_rows(subjects_: list[dict], items: dict[tuple[str, int], dict], cfg: ScoreConfig) -> pa.Table:
    """Scorer prompt rows (SCORE_PROMPTS) of `subjects_` (sae_id, layer, feature, method,
    label) on their features' `items`: every subject × LLM benchmark; list benchmarks
    `examples_per_prompt` excerpts a prompt, log-prob benchmarks one excerpt a prompt (a
    subject's rows one after another, so that their shared prefix, instructions + label,
    is computed once: the transformers backend's prefix runs, vLLM's prefix cache)."""
    rows = []
    per = cfg.examples_per_prompt
    # benchmark by benchmark: the backend's batches then share their system prompt, which
    # the transformers backend runs once per batch and vLLM caches as a prefix
    for bench in [b for b in cfg.benchmarks if b in LIST_BENCHMARKS or b in ("detection_logprob", "fuzz_logprob")]:
        for s in subjects_:
            it = items[(s["sae_id"], s["feature"])]
            texts = it["plain"] if bench in ("detection", "detection_logprob") else it["fuzz"]
            common = {"sae_id": s["sae_id"], "layer": s["layer"], "feature": s["feature"], "method": s["method"],
                      "benchmark": bench, "label": s["label"], "temperature": 0.0, "stop": None}
            if bench in LIST_BENCHMARKS:
                for c, start in enumerate(range(0, len(texts), per)):
                    chunk = texts[start : start + per]
                    rows.append({**common, "request_id": f"{s['sae_id']}|{s['feature']}|{s['method']}|{bench}|{c}",
                                 "messages": prompts.scorer_messages(bench, s["label"], chunk), "max_tokens": 4 * len(chunk) + 16,
                                 "constraint": f"binary_list:{len(chunk)}", "truth": it["truth"][start : start + per]})
            else:
                for i, (text, truth) in enumerate(zip(texts, it["truth"])):
                    rows.append({**common, "request_id": f"{s['sae_id']}|{s['feature']}|{s['method']}|{bench}|{i}",
                                 "messages": prompts.logprob_messages(bench, s["label"], text), "max_tokens": 1,
                                 "constraint": prompts.LOGPROB_CONSTRAINT, "truth": [truth]})
    if "simulation" in cfg.benchmarks:
        for s in subjects_:
            rows += simulation.prompt_rows(items[(s["sae_id"], s["feature"])], [s], cfg)
    return pa.Table.from_pylist(rows, schema=SCORE_PROMPTS)


def _intervention_batch(batch: pa.Table, subs, cfg: ScoreConfig, seed: int) -> pa.Table:
    """Scorer prompt rows of a batch of intervention.CONTINUATIONS rows (those without an
    error): every subject of the feature × intervention benchmark × pair."""
    conts = [c for c in batch.to_pylist() if c["error"] is None]
    if not conts:
        return SCORE_PROMPTS.empty_table()
    subjects_, _ = _subjects_of(pa.table({"sae_id": [c["sae_id"] for c in conts], "feature": pa.array([c["feature"] for c in conts], pa.int64())}), subs)
    rows = []
    for c in conts:
        mine = [s for s in subjects_ if (s["sae_id"], s["feature"]) == (c["sae_id"], c["feature"])]
        rows += intervention.prompt_rows(c, mine, cfg, seed)
    return pa.Table.from_pylist(rows, schema=SCORE_PROMPTS)


# ---- metrics per (feature, method, benchmark) ------------------------------------------------

def _halves(rs: list[dict]) -> dict[str, float | None]:
    """score_half_a/b of one (feature, method, benchmark): balanced accuracy on each half
    of its excerpts (metrics.split_halves, in the order shown: prompts sorted by chunk);
    excerpts of failed prompts are left out of their half."""
    rs = sorted(rs, key=lambda r: int(r["request_id"].rsplit("|", 1)[1]))
    truth = [t for r in rs for t in r["truth"]]
    pred = [p for r in rs for p in (r["pred"] if r["pred"] is not None else [None] * len(r["truth"]))]
    a, b = half_scores(truth, pred, "balanced_accuracy")
    return {"score_half_a": None if math.isnan(a) else a, "score_half_b": None if math.isnan(b) else b}


def _spent(rs: list[dict]) -> dict:
    return {"input_tokens": sum(r["input_tokens"] for r in rs), "output_tokens": sum(r["output_tokens"] for r in rs),
            "cost_usd": sum(r["cost_usd"] for r in rs)}


def _logprob_score(rs: list[dict]) -> dict:
    """The score row of one log-prob (feature, method, benchmark): AUROC of p_yes, and the
    binary metrics of p_yes > 0.5 (balanced accuracy at 0.5); failed prompts count in
    n_failed."""
    ok = [r for r in rs if r["pred"] is not None]
    truth, p = [r["truth"][0] for r in ok], [float(r["pred"]) for r in ok]
    m = binary_metrics(truth, [int(x > 0.5) for x in p]) if ok else {k: math.nan for k in ("balanced_accuracy", "accuracy", "precision", "recall", "f1")}
    m["auroc"] = auroc(p, truth) if ok else math.nan
    rs = sorted(rs, key=lambda r: int(r["request_id"].rsplit("|", 1)[1]))  # the excerpts in the order shown
    half_a, half_b = half_scores([r["truth"][0] for r in rs], [None if r["pred"] is None else float(r["pred"]) for r in rs], "auroc")
    return {"n_shown": len(rs), "n_failed": len(rs) - len(ok), **{k: (None if math.isnan(v) else v) for k, v in m.items()},
            "score_half_a": None if math.isnan(half_a) else half_a, "score_half_b": None if math.isnan(half_b) else half_b,
            "prompt_version": LOGPROB_VERSIONS[rs[0]["benchmark"]]}


def _list_score(rs: list[dict]) -> dict:
    """The score row of one detection / fuzz (feature, method): binary metrics of the
    answered excerpts; excerpts of failed prompts count in n_failed."""
    truth = [t for r in rs if r["pred"] is not None for t in r["truth"]]
    pred = [p for r in rs if r["pred"] is not None for p in r["pred"]]
    m = binary_metrics(truth, pred) if truth else {k: None for k in ("balanced_accuracy", "accuracy", "precision", "recall", "f1")}
    return {"n_shown": sum(len(r["truth"]) for r in rs), "n_failed": sum(len(r["truth"]) for r in rs if r["pred"] is None),
            **{k: (None if v is None or math.isnan(v) else v) for k, v in m.items()}, **_halves(rs),
            "prompt_version": LIST_VERSIONS[rs[0]["benchmark"]]}


def _score_group(group: pa.Table) -> pa.Table:
    """The final rows of one (sae_id, feature, method, benchmark) → its SCORES row."""
    cols = ["sae_id", "layer", "feature", "method", "benchmark", "label", "request_id", "truth", "value", "input_tokens",
            "output_tokens", "cost_usd"] + (["acts"] if "acts" in group.column_names else [])  # simulation's true activations
    rs = group.select(cols).to_pylist()
    bench = rs[0]["benchmark"]
    logprob = bench in LOGPROB_VERSIONS
    for r in rs:
        v = r.pop("value")
        r["pred"] = None if v is None else v if bench == "simulation" else v[0] if logprob else [int(x) for x in v]
    head = {k: rs[0][k] for k in ("sae_id", "layer", "feature", "method", "benchmark", "label")}
    metrics = simulation.score_row(rs) if bench == "simulation" else _logprob_score(rs) if logprob else _list_score(rs)
    row = {**head, **metrics, **_spent(rs)}
    return schema.conform(pa.Table.from_pylist([row]), schema.SCORES)


def scores_of(final: pa.Table) -> pa.Table:
    """Final scorer rows of complete (sae_id, feature, method, benchmark) groups → their
    SCORES rows (a pyarrow group-by of row indices; no shuffle)."""
    if final.num_rows == 0:
        return schema.empty(schema.SCORES)
    keys = ["sae_id", "feature", "method", "benchmark"]
    idx = final.select(keys).append_column("_row", pa.array(np.arange(final.num_rows), pa.int64()))
    # one thread: acero's hash_list over several threads can fail ("thread index N is out of range")
    groups = idx.group_by(keys, use_threads=False).aggregate([("_row", "list")]).column("_row_list").to_pylist()
    return pa.concat_tables([_score_group(final.take(pa.array(g, pa.int64()))) for g in groups])


def _scores_of_parts(*parts: pa.Table) -> pa.Table:
    """A Ray task: `scores_of` the final scorer rows of materialized blocks."""
    return scores_of(pa.concat_tables([p for p in parts if p.num_rows], promote_options="default")) if any(p.num_rows for p in parts) \
        else schema.empty(schema.SCORES)


def round_counts(batch: pa.Table) -> pa.Table:
    """One row of counts of a batch of final scorer rows (for the manifest)."""
    total = lambda c: pc.sum(batch.column(c)).as_py() or 0  # noqa: E731
    return pa.table({"prompts": [batch.num_rows], "failed_prompts": [int(pc.sum(pc.is_null(batch.column("value"))).as_py() or 0)],
                     "retried_prompts": [int(pc.sum(pc.greater(batch.column("tries"), 1)).as_py() or 0)],
                     "scorer_input_tokens": [int(total("input_tokens"))], "scorer_output_tokens": [int(total("output_tokens"))],
                     "scorer_cost_usd": [float(total("cost_usd"))]})


# ---- embedding -------------------------------------------------------------------------------

class EmbedScorer:
    """Ray Data actor: rows (subject, label, texts, truth) → gap and AUROC; every text of a
    batch (labels and excerpts of all its subjects) is embedded in one `encode` call, each
    distinct text once."""

    def __init__(self, embedder: str | None, threads: int):
        from baez_ray.models.embedder import Embedder

        self.emb = Embedder(embedder, device="auto", threads=threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        labels = batch.column("label").to_pylist()
        texts = batch.column("texts").to_pylist()
        truth = batch.column("truth").to_pylist()
        uniq = list(dict.fromkeys(labels + [t for ts in texts for t in ts]))
        where = {t: i for i, t in enumerate(uniq)}
        U = self.emb.encode(uniq)
        cols: dict[str, list] = {"gap": [], "auroc": [], "score_half_a": [], "score_half_b": [], "n_dropped": []}
        for lab, ts, tr in zip(labels, texts, truth):
            sim = (U[[where[t] for t in ts]] @ U[where[lab]]).tolist()
            m = embedding_metrics(sim, tr)
            m["score_half_a"], m["score_half_b"] = half_scores(tr, sim, "auroc")
            for k, v in m.items():
                cols[k].append(v if k == "n_dropped" or not math.isnan(v) else None)
        out = batch.drop_columns(["texts", "truth"])
        progress.tick(batch.num_rows)
        for k, v in cols.items():
            out = out.append_column(k, pa.array(v, pa.int32() if k == "n_dropped" else pa.float64()))
        return out


EMBED_ROWS = pa.schema([pa.field("sae_id", pa.string()), pa.field("layer", pa.int32()), pa.field("feature", pa.int64()),
                        pa.field("method", pa.string()), pa.field("label", pa.string()), pa.field("texts", pa.list_(pa.string())),
                        pa.field("truth", pa.list_(pa.int8())), pa.field("n_shown", pa.int32())])


def _embedding_rows(batch: pa.Table, subs, texts: str = "plain") -> pa.Table:
    """Rows (subject, texts, truth, n_shown) of an items batch (the column `texts` of the
    items: excerpts, or logit_embedding's promoted tokens), for EmbedScorer."""
    subjects_, items = _subjects_of(batch, subs)
    rows = [{**s, "texts": items[(s["sae_id"], s["feature"])][texts], "truth": items[(s["sae_id"], s["feature"])]["truth"],
             "n_shown": len(items[(s["sae_id"], s["feature"])]["truth"])} for s in subjects_]
    return pa.Table.from_pylist(rows, schema=EMBED_ROWS)


def _embedding_scores(batch: pa.Table, benchmark: str = "embedding", version: str = EMBEDDING_VERSION) -> pa.Table:
    """EmbedScorer rows → SCORES rows of `benchmark`. A text whose similarity is NaN is
    left out of the metrics, and counted as failed."""
    n = batch.num_rows
    out = batch.select(["sae_id", "layer", "feature", "method", "label", "gap", "auroc", "score_half_a", "score_half_b", "n_shown"])
    out = out.append_column("benchmark", pa.array([benchmark] * n, pa.string()))
    out = out.append_column("n_failed", batch.column("n_dropped"))
    out = out.append_column("prompt_version", pa.array([version] * n, pa.string()))
    for c, t in (("input_tokens", pa.int64()), ("output_tokens", pa.int64()), ("cost_usd", pa.float64())):
        out = out.append_column(c, pa.array([0] * n, t))
    return schema.conform(out, schema.SCORES)


# ---- intervention: the steered continuations ------------------------------------------------

def _failed_rows(failed: pa.Table, subs: pa.Table, cfg: ScoreConfig) -> pa.Table:
    """SCORES rows of the subjects of features that could not be steered (`failed`: rows
    sae_id, feature, error): every pair of each intervention benchmark counted as failed."""
    bad = set(zip(failed.column("sae_id").to_pylist(), failed.column("feature").to_pylist()))
    rows = [{**s, "benchmark": b, "n_shown": cfg.intervention_pairs, "n_failed": cfg.intervention_pairs,
             "prompt_version": intervention.VERSIONS[b], "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
            for s in subs.to_pylist() if (s["sae_id"], s["feature"]) in bad for b in cfg.benchmarks if b in intervention.BENCHMARKS]
    return schema.conform(pa.Table.from_pylist(rows), schema.SCORES) if rows else schema.empty(schema.SCORES)


def _steered(keys: pa.Table, subs: pa.Table, subs_ref, cfg: ScoreConfig, model, saes, seed: int, steering_dir) -> tuple:
    """The intervention part of the stage: the continuations of every feature (written to
    `steering_dir` when given, by the workers), their scorer prompt rows (a Dataset), the
    SCORES rows of the features that could not be steered, the prompts' number and counts."""
    conts = intervention.continuations(keys, model, saes, cfg, seed).materialize()
    if steering_dir is not None:
        conts.write_parquet(str(steering_dir))
    state = gather(conts.select_columns(["sae_id", "feature", "kl", "error"]))
    ok = state.filter(pc.is_null(state.column("error")))
    failed = state.filter(pc.is_valid(state.column("error")))
    kl = ok.column("kl").to_numpy(zero_copy_only=False) if ok.num_rows else np.zeros(0)
    n_benches = sum(b in intervention.BENCHMARKS for b in cfg.benchmarks)
    good = set(zip(ok.column("sae_id").to_pylist(), ok.column("feature").to_pylist())) if ok.num_rows else set()
    n_subjects = sum((s, f) in good for s, f in zip(subs.column("sae_id").to_pylist(), subs.column("feature").to_pylist()))
    pending = conts.map_batches(_intervention_batch, batch_format="pyarrow", fn_kwargs={"subs": subs_ref, "cfg": cfg, "seed": seed})
    info = {"steered_features": ok.num_rows, "steering_failed_features": failed.num_rows,
            "steering_kl_median": float(np.median(kl)) if kl.size else None}
    if failed.num_rows:
        log(f"[score] intervention: {failed.num_rows} features could not be steered (first: {failed.column('error')[0].as_py()})")
    return pending, _failed_rows(failed, subs, cfg), n_subjects * n_benches * cfg.intervention_pairs, info


# ---- the stage ---------------------------------------------------------------------------------

def _prompt_counts(items, subs: pa.Table, cfg: ScoreConfig) -> tuple[dict, int]:
    """Items per feature, and the scorer prompts of the benchmarks read from the items."""
    n_items = gather(items.map_batches(lambda b: pa.table({"sae_id": b.column("sae_id"), "feature": b.column("feature"),
                                                           "n_items": pc.list_value_length(b.column("truth"))}), batch_format="pyarrow"))
    per_key = dict(zip(zip(n_items.column("sae_id").to_pylist(), n_items.column("feature").to_pylist()), n_items.column("n_items").to_pylist())) \
        if n_items.num_rows else {}
    total = sum(n_prompts(per_key.get((s, f), 0), cfg) for s, f in zip(subs.column("sae_id").to_pylist(), subs.column("feature").to_pylist()))
    return per_key, total


def _llm_scores(pending, total: int, scorer: LLMConfig, cfg: ScoreConfig, info: dict) -> pa.Table:
    """Every scorer prompt row through the ask-until-parsed rounds → SCORES rows; the
    rounds' counts added to `info`."""
    done = score_rounds(pending, scorer, cfg.max_retries, total=total, parsers=PARSERS)
    counts = gather(done.map_batches(round_counts, batch_format="pyarrow"))
    for k in list(info):
        if k in counts.column_names:
            info[k] = type(info[k])(pc.sum(counts.column(k)).as_py() or 0)
    return metrics(done, total)


def _embedded_scores(tests, keys: pa.Table, items, subs: pa.Table, subs_ref, cfg: ScoreConfig, seed: int, threads: int,
                     block_features: int) -> list[pa.Table]:
    """SCORES rows of the sentence-embedding benchmarks: embedding (the label against the
    excerpts) and logit_embedding (against the promoted tokens: stages/logit_embedding.py)."""
    import ray

    parts = []
    embedded = {"embedding": ("plain", items, EMBEDDING_VERSION)}
    if "logit_embedding" in cfg.benchmarks and subs.num_rows:
        n_blocks = max(1, math.ceil(keys.num_rows / block_features))
        embedded["logit_embedding"] = ("texts", logit_items_dataset(tests, ray.put(feature_blocks(keys, block_features)), n_blocks, cfg,
                                                                    seed, MAX_PARTITIONS), LOGIT_EMBEDDING_VERSION)
    for bench, (column, source, version) in embedded.items():
        if bench in cfg.benchmarks and subs.num_rows:
            rows = source.map_batches(_embedding_rows, batch_format="pyarrow", fn_kwargs={"subs": subs_ref, "texts": column})
            with progress.bar(f"score:{bench}", total=subs.num_rows, unit="label"):
                emb = actor_map(rows, EmbedScorer, {"embedder": cfg.embedder, "threads": threads}, num_cpus=0.5, batch_size=256, keep=True)
                parts.append(gather(emb.map_batches(_embedding_scores, batch_format="pyarrow",
                                                    fn_kwargs={"benchmark": bench, "version": version})))
    return parts


def score_labels(tests, keys: pa.Table, labels: pa.Table, cfg: ScoreConfig, scorer: LLMConfig, seed: int = 0,
                 negatives_table: pa.Table | None = None, threads: int = 2, block_features: int = BLOCK_FEATURES,
                 items=None, subs: pa.Table | None = None, model=None, saes=(), steering_dir=None) -> tuple[pa.Table, dict]:
    """Score every label of the features `keys` (a table with sae_id, feature) with each
    benchmark of `cfg`, plus the random-label control. `tests`: a Ray Dataset of rows
    (sae_id, feature, examples: the feature's test examples; rows of other features are
    ignored; with pos_tokens and pos_values for logit_embedding); `negatives_table`: rows
    (sae_id, feature, examples) of given negatives (`negatives = corpus`). `items`: a Dataset
    of ITEMS rows built already (`tests` then unused but by logit_embedding); `subs`: the
    subjects to score (default: `subjects(labels, keys, ...)`); `model` and `saes`
    (config.ModelConfig, SAEConfig list): the base model the intervention benchmarks steer
    and the SAEs whose decoder rows they steer along; `steering_dir`: where the steered
    continuations are written. Returns the SCORES table and counts for the manifest."""
    import ray

    subs = subjects(labels, keys, cfg, seed) if subs is None else subs
    if items is None:
        items = items_dataset(tests, keys, cfg, seed, negatives_table, block_features)
    items = items.materialize()  # read twice: LLM and embedding
    per_key, total = _prompt_counts(items, subs, cfg)
    subs_ref = ray.put(subs)
    parts, info = [], {"features": len(per_key), "subjects": subs.num_rows, "prompts": total, "failed_prompts": 0, "retried_prompts": 0,
                       "scorer_input_tokens": 0, "scorer_output_tokens": 0, "scorer_cost_usd": 0.0}
    pending = items.map_batches(_prompt_batch, batch_format="pyarrow", fn_kwargs={"subs": subs_ref, "cfg": cfg}) if total else None
    if any(b in intervention.BENCHMARKS for b in cfg.benchmarks) and subs.num_rows:
        steered, failed, n_steered, steer_info = _steered(keys, subs, subs_ref, cfg, model, list(saes), seed, steering_dir)
        parts.append(failed)
        info.update(steer_info)
        if n_steered:
            pending, total = (steered if pending is None else pending.union(steered)), total + n_steered
    info["prompts"] = total
    log(f"[score] {len(per_key)} features, {subs.num_rows} labels (incl. control), {total} scorer prompts ({scorer.backend}:{scorer.model})")
    if total:
        parts.append(_llm_scores(pending, total, scorer, cfg, info))
    parts += _embedded_scores(tests, keys, items, subs, subs_ref, cfg, seed, threads, block_features)
    table = pa.concat_tables([schema.empty(schema.SCORES)] + [schema.conform(p, schema.SCORES) for p in parts if p.num_rows])
    table = table.sort_by([("sae_id", "ascending"), ("feature", "ascending"), ("method", "ascending"), ("benchmark", "ascending")])
    return table, info


TASK_METRICS_MAX = 200_000  # scorer prompts whose metrics one Ray task computes (more: a groupby over the cluster)


def metrics(done, total: int) -> pa.Table:
    """SCORES rows of the final scorer rows `done` (a materialized Dataset of `total`
    prompts): up to TASK_METRICS_MAX in one Ray task over its blocks (no shuffle), beyond
    that a groupby by (sae_id, feature, method, benchmark)."""
    import ray

    from baez_ray.ray_pool import remote

    if total <= TASK_METRICS_MAX:
        return ray.get(remote(_scores_of_parts).remote(*done.to_arrow_refs()))
    by = done.groupby(["sae_id", "feature", "method", "benchmark"], num_partitions=min(MAX_PARTITIONS, max(1, total // 4096)))
    return gather(by.map_groups(_score_group, batch_format="pyarrow"))
