"""Scoring labels (SPEC §3): detection, fuzz, embedding, and the random-label control.

    test examples + negatives ─▶ items per feature (shuffled once per feature, shared by
    every method so that methods are compared on the same excerpts)
    labels ─▶ subjects (feature, method, label) + random_label subjects
    subjects × items ─▶ prompt rows (examples_per_prompt excerpts each), ALL features,
       methods and benchmarks in one Ray Dataset ─backend─▶ answers ─parse─▶ 0/1 lists
                               ▲                                  │ unreadable
                               └── retry round (the failed answer and the problem), all
                                   unreadable prompts together, up to max_retries times
    subjects × items ─embedder actor pool (one encode call per batch of subjects)─▶ gap, AUROC
    detection_logprob, fuzz_logprob: subjects × items ─▶ one excerpt per prompt, a feature's
       prompts one after another (shared prefix: instructions + label) ─backend─▶ p_yes =
       P("1") / (P("1") + P("0")) of the first answer token ─▶ AUROC, balanced accuracy at 0.5
    ─▶ scores table (schema.SCORES), one row per (feature, method, benchmark), with the
       headline metric also on each half of the excerpts (score_half_a/b: the split-half
       reliability of metrics.py, from the same answers and similarities, no extra call)

A prompt whose answer stays unreadable after the retries, or that failed in the backend,
is a *failed batch*: its excerpts count in `n_failed` (and in `n_shown`), never silently
dropped; the metrics use the answered excerpts. A log-prob prompt whose two tokens are
both missing from the scorer's top log-probs is failed the same way (not retried: asking
again gives the same probabilities). Positives are the feature's test examples
(the caller splits: see baez_ray/splits.py); negatives are test examples of other features
(default) or corpus windows where the feature does not fire (`negatives_table`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from baez_ray import progress, schema
from baez_ray.config import LLMConfig, ScoreConfig
from baez_ray.llm import prompts
from baez_ray.llm.rounds import score_rounds
from baez_ray.metrics import auroc, binary_metrics, embedding_metrics, half_scores
from baez_ray.models.windows import token_text
from baez_ray.ray_pool import actor_map, gather
from baez_ray.rundir import log
from baez_ray.stages.split import feature_seed

RANDOM_LABEL = "random_label"
EMBEDDING_VERSION = "embedding/v1"
LIST_BENCHMARKS = ("detection", "fuzz")  # a list of 0/1 per prompt of examples_per_prompt excerpts
LOGPROB_VERSIONS = {"detection_logprob": prompts.DETECTION_LOGPROB_VERSION, "fuzz_logprob": prompts.FUZZ_LOGPROB_VERSION}


def example_text(ex: dict) -> str:
    return "".join(token_text(t) for t in ex["token_strs"])


def fuzz_text(ex: dict, positions: set[int]) -> str:
    """The example with the tokens at `positions` wrapped in << >> (runs share a pair)."""
    acts = [1.0 if i in positions else 0.0 for i in range(len(ex["token_strs"]))]
    return prompts.mark_tokens([token_text(t) for t in ex["token_strs"]], acts, 0.5)


@dataclass
class Items:
    """One feature's excerpts: plain text (detection, embedding), highlighted text (fuzz),
    truth (1: a test example of the feature), in the order shown."""

    plain: list[str] = field(default_factory=list)
    fuzz: list[str] = field(default_factory=list)
    truth: list[int] = field(default_factory=list)


def build_items(tests: dict[tuple[str, int], list[dict]], cfg: ScoreConfig, seed: int,
                negatives: dict[tuple[str, int], list[dict]] | None = None) -> dict[tuple[str, int], Items]:
    """Excerpts per feature. `tests`: (sae_id, feature) → test examples. Negatives: test
    examples of other features drawn at random (or `negatives[key]` when given). Fuzz:
    positives highlighted at their active tokens (>= fuzz_threshold × the example max),
    negatives at as many random tokens as the positives' mean, drawn per example."""
    keys = sorted(tests)
    # every feature's test examples in one list, features in key order; a feature's own
    # examples are one block of it, skipped by index arithmetic (O(n_negatives) per feature)
    pool = [e for k in keys for e in tests[k]]
    block, at = {}, 0
    for k in keys:
        block[k], at = (at, len(tests[k])), at + len(tests[k])
    out = {}
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
        items = Items()
        for i in order:
            items.plain.append(example_text(examples[i]))
            items.fuzz.append(fuzz_text(examples[i], marks[i]))
            items.truth.append(truth[i])
        out[key] = items
    return out


def subjects(labels: pa.Table, keys: set[tuple[str, int]], cfg: ScoreConfig, seed: int) -> list[dict]:
    """(sae_id, layer, feature, method, label) to score: every non-null label of a feature
    in `keys`, plus the random-label control: each feature scored with the label of another
    feature, chosen at random (a random derangement of the control method's labels)."""
    rows = [r for r in labels.select(["sae_id", "layer", "feature", "method", "label"]).to_pylist()
            if r["label"] and (r["sae_id"], r["feature"]) in keys]
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
    return rows


def prompt_rows(subs: list[dict], items: dict, cfg: ScoreConfig) -> list[dict]:
    """Scorer prompt rows: every subject × LLM benchmark, `examples_per_prompt` excerpts each."""
    rows = []
    per = cfg.examples_per_prompt
    # benchmark by benchmark: the backend's batches then share their system prompt, which
    # the transformers backend runs once per batch and vLLM caches as a prefix
    for bench in [b for b in cfg.benchmarks if b in LIST_BENCHMARKS]:
        for s in subs:
            it = items[(s["sae_id"], s["feature"])]
            texts = it.plain if bench == "detection" else it.fuzz
            for c, start in enumerate(range(0, len(texts), per)):
                chunk = texts[start : start + per]
                rows.append({
                    "request_id": f"{s['sae_id']}|{s['feature']}|{s['method']}|{bench}|{c}",
                    "messages": prompts.scorer_messages(bench, s["label"], chunk),
                    "max_tokens": 4 * len(chunk) + 16, "temperature": 0.0, "stop": None,
                    "constraint": f"binary_list:{len(chunk)}",
                    "sae_id": s["sae_id"], "layer": s["layer"], "feature": s["feature"], "method": s["method"],
                    "benchmark": bench, "label": s["label"], "truth": it.truth[start : start + per],
                })
    return rows


def _halves(rs: list[dict]) -> dict[str, float | None]:
    """score_half_a/b of one (feature, method, benchmark): balanced accuracy on each half
    of its excerpts (metrics.split_halves, in the order shown: prompts sorted by chunk);
    excerpts of failed prompts are left out of their half."""
    rs = sorted(rs, key=lambda r: int(r["request_id"].rsplit("|", 1)[1]))
    truth = [t for r in rs for t in r["truth"]]
    pred = [p for r in rs for p in (r["pred"] if r["pred"] is not None else [None] * len(r["truth"]))]
    a, b = half_scores(truth, pred, "balanced_accuracy")
    return {"score_half_a": None if math.isnan(a) else a, "score_half_b": None if math.isnan(b) else b}


def logprob_prompt_rows(subs: list[dict], items: dict, cfg: ScoreConfig) -> list[dict]:
    """Log-prob scorer prompt rows: every subject × log-prob benchmark × excerpt, one excerpt
    each; a subject's rows follow one another, so that their shared prefix (instructions +
    label) is computed once (the transformers backend's prefix runs, vLLM's prefix cache)."""
    rows = []
    for bench in [b for b in cfg.benchmarks if b in LOGPROB_VERSIONS]:
        for s in subs:
            it = items[(s["sae_id"], s["feature"])]
            texts = it.plain if bench == "detection_logprob" else it.fuzz
            for i, (text, truth) in enumerate(zip(texts, it.truth)):
                rows.append({
                    "request_id": f"{s['sae_id']}|{s['feature']}|{s['method']}|{bench}|{i}",
                    "messages": prompts.logprob_messages(bench, s["label"], text),
                    "max_tokens": 1, "temperature": 0.0, "stop": None, "constraint": prompts.LOGPROB_CONSTRAINT,
                    "sae_id": s["sae_id"], "layer": s["layer"], "feature": s["feature"], "method": s["method"],
                    "benchmark": bench, "label": s["label"], "truth": [truth],
                })
    return rows


def _logprob_scores(done: list[dict]) -> list[dict]:
    """Score rows of the log-prob benchmarks: AUROC of p_yes, and the binary metrics of
    p_yes > 0.5 (balanced accuracy at 0.5); failed prompts count in n_failed."""
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r["sae_id"], r["layer"], r["feature"], r["method"], r["benchmark"], r["label"]), []).append(r)
    out = []
    for (sae_id, layer, feat, method, bench, label), rs in sorted(groups.items(), key=lambda kv: kv[0][:5]):
        ok = [r for r in rs if r["pred"] is not None]
        truth, p = [r["truth"][0] for r in ok], [float(r["pred"]) for r in ok]
        m = binary_metrics(truth, [int(x > 0.5) for x in p]) if ok else {k: math.nan for k in ("balanced_accuracy", "accuracy", "precision", "recall", "f1")}
        m["auroc"] = auroc(p, truth) if ok else math.nan
        rs = sorted(rs, key=lambda r: int(r["request_id"].rsplit("|", 1)[1]))  # the excerpts in the order shown
        half_a, half_b = half_scores([r["truth"][0] for r in rs], [None if r["pred"] is None else float(r["pred"]) for r in rs], "auroc")
        out.append({
            "sae_id": sae_id, "layer": layer, "feature": feat, "method": method, "benchmark": bench, "label": label,
            "n_shown": len(rs), "n_failed": len(rs) - len(ok),
            **{k: (None if math.isnan(v) else v) for k, v in m.items()},
            "score_half_a": None if math.isnan(half_a) else half_a, "score_half_b": None if math.isnan(half_b) else half_b,
            "prompt_version": LOGPROB_VERSIONS[bench],
            "input_tokens": sum(r["input_tokens"] for r in rs), "output_tokens": sum(r["output_tokens"] for r in rs),
            "cost_usd": sum(r["cost_usd"] for r in rs),
        })
    return out


def _llm_scores(done: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in done:
        groups.setdefault((r["sae_id"], r["layer"], r["feature"], r["method"], r["benchmark"], r["label"]), []).append(r)
    out = []
    for (sae_id, layer, feat, method, bench, label), rs in sorted(groups.items(), key=lambda kv: kv[0][:5]):
        truth = [t for r in rs if r["pred"] is not None for t in r["truth"]]
        pred = [p for r in rs if r["pred"] is not None for p in r["pred"]]
        m = binary_metrics(truth, pred) if truth else {k: None for k in ("balanced_accuracy", "accuracy", "precision", "recall", "f1")}
        out.append({
            "sae_id": sae_id, "layer": layer, "feature": feat, "method": method, "benchmark": bench, "label": label,
            "n_shown": sum(len(r["truth"]) for r in rs),
            "n_failed": sum(len(r["truth"]) for r in rs if r["pred"] is None),
            **{k: (None if v is None or math.isnan(v) else v) for k, v in m.items()}, **_halves(rs),
            "prompt_version": prompts.DETECTION_VERSION if bench == "detection" else prompts.FUZZ_VERSION,
            "input_tokens": sum(r["input_tokens"] for r in rs), "output_tokens": sum(r["output_tokens"] for r in rs),
            "cost_usd": sum(r["cost_usd"] for r in rs),
        })
    return out


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


def _embedding_scores(subs: list[dict], items: dict, cfg: ScoreConfig, threads: int, batch_size: int = 256) -> list[dict]:
    rows = [{**s, "layer": int(s["layer"]), "texts": items[(s["sae_id"], s["feature"])].plain, "truth": items[(s["sae_id"], s["feature"])].truth} for s in subs]
    if not rows:
        return []
    import ray

    ds = ray.data.from_arrow(pa.Table.from_pylist(rows))
    with progress.bar("score:embedding", total=len(rows), unit="label"):
        out = gather(actor_map(ds, EmbedScorer, {"embedder": cfg.embedder, "threads": threads}, num_cpus=0.5, batch_size=batch_size))
    res = []
    for r in out.to_pylist():
        n = len(items[(r["sae_id"], r["feature"])].truth)
        # an excerpt whose similarity is NaN is left out of the metrics, and counted as failed
        res.append({**{k: r[k] for k in ("sae_id", "layer", "feature", "method", "label", "gap", "auroc", "score_half_a", "score_half_b")},
                    "benchmark": "embedding", "n_shown": n, "n_failed": r["n_dropped"], "prompt_version": EMBEDDING_VERSION,
                    "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    return res


def score_labels(tests: dict[tuple[str, int], list[dict]], labels: pa.Table, cfg: ScoreConfig, scorer: LLMConfig, seed: int = 0,
                 negatives: dict[tuple[str, int], list[dict]] | None = None, threads: int = 2) -> tuple[pa.Table, dict]:
    """Score every label of the features in `tests` ((sae_id, feature) → test examples)
    with each benchmark of `cfg`, plus the random-label control. Returns the SCORES table
    and counts for the manifest."""
    items = build_items(tests, cfg, seed, negatives)
    subs = subjects(labels, set(items), cfg, seed)
    rows = prompt_rows(subs, items, cfg) + logprob_prompt_rows(subs, items, cfg)
    log(f"[score] {len(items)} features, {len(subs)} labels (incl. control), {len(rows)} scorer prompts ({scorer.backend}:{scorer.model})")
    done = score_rounds(rows, scorer, cfg.max_retries)
    # (from_pylist takes its columns from the first row: each kind of row separately)
    parts = [_llm_scores([r for r in done if r["benchmark"] in LIST_BENCHMARKS]),
             _logprob_scores([r for r in done if r["benchmark"] in LOGPROB_VERSIONS]),
             _embedding_scores(subs, items, cfg, threads) if "embedding" in cfg.benchmarks else []]
    table = pa.concat_tables([schema.empty(schema.SCORES)] + [schema.conform(pa.Table.from_pylist(p), schema.SCORES) for p in parts if p])
    failed = [r for r in done if r["pred"] is None]
    info = {
        "features": len(items), "subjects": len(subs), "prompts": len(rows),
        "failed_prompts": len(failed), "retried_prompts": sum(1 for r in done if r["tries"] > 1),
        "scorer_input_tokens": sum(r["input_tokens"] for r in done), "scorer_output_tokens": sum(r["output_tokens"] for r in done),
        "scorer_cost_usd": sum(r["cost_usd"] for r in done),
    }
    return table, info
