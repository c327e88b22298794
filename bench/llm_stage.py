"""An LLM labelling stage through the transformers backend vs the same prompts in one plain
batched `generate` loop with the same batch size, on SmolLM2-135M-Instruct (PyPI).

The prompts are the np_max_act prompts of synthetic features (real English windows). The
stage runs on N and 3N features; its marginal rate (2N prompts over the difference of the
two wall times) cancels the fixed start-up (Ray actor, model load). The bare loop runs the
same 2N prompts, greedy, same max_tokens, same batch size, in this process.

    .venv/bin/python bench/llm_stage.py [--features 64] [--batch-size 16]
Last line: {"bench": "llm_stage", "prompts_per_s", "bare_prompts_per_s", "ratio", ...}
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

import pyarrow as pa
import torch

SENTENCES = [
    "The committee met on Tuesday to discuss the budget for the coming year",
    "She poured the coffee slowly and watched the steam rise from the cup",
    "In 1887 the railway reached the small town on the edge of the valley",
    "The function returns a list of integers sorted in ascending order",
    "Rain fell all night and by morning the river had burst its banks",
    "He signed the letter with a pen his grandfather had given him",
]


def features(n: int, seed: int = 0) -> pa.Table:
    from baez_ray import schema

    rng = random.Random(seed)
    rows = []
    for f in range(n):
        ex = []
        for r in range(10):
            toks = [(" " if i else "") + w for i, w in enumerate(rng.choice(SENTENCES).split())]
            t = rng.randrange(len(toks))
            acts = [0.0] * len(toks)
            acts[t] = 5.0 - 0.2 * r
            ex.append({"kind": "top", "rank": r, "value": acts[t], "top_index": t, "token_strs": toks, "acts": acts})
        rows.append({"sae_id": "bench", "model_id": "bench", "layer": 0, "feature": f, "n_tokens": 0, "n_firing": 0,
                     "max_activation": 5.0, "examples": ex})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import ray

    from baez_ray.config import LLMConfig
    from baez_ray.methods.from_examples import label_with_llm, prompt_style

    torch.set_num_threads(args.threads)
    llm = LLMConfig(backend="transformers", model="pypi:smollm2-135m", batch_size=args.batch_size, num_cpus=args.threads)
    method = prompt_style("np_max_act")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)

    times, tables = {}, {}
    # the N run is the first N features of the 3N run: the marginal 2N prompts are the
    # last 2N features, which the bare loop below sends
    full = features(3 * args.features, seed=0)
    for n in (args.features, 3 * args.features):
        tables[n] = full.slice(0, n)
        t0 = time.perf_counter()
        labels = label_with_llm(ray.data.from_arrow(tables[n]), "np_max_act", llm, max_retries=0)
        times[n] = time.perf_counter() - t0
        assert labels.num_rows == n
    stage_rate = 2 * args.features / (times[3 * args.features] - times[args.features])

    # bare: 2N of the same prompts, same batch size, same max_tokens, greedy
    from baez_ray.llm.backends.transformers_backend import TransformersChat

    chat = TransformersChat(llm.model_dump())
    feats = full.to_pylist()[args.features :]
    texts = [chat.prompt_text(method.build([e for e in f["examples"]][: method.n_examples])) for f in feats]
    chat.generate(texts[: args.batch_size], [method.max_tokens] * args.batch_size, 0.0)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(texts), args.batch_size):
        chunk = texts[i : i + args.batch_size]
        chat.generate(chunk, [method.max_tokens] * len(chunk), 0.0)
    bare_rate = len(texts) / (time.perf_counter() - t0)
    print(json.dumps({
        "bench": "llm_stage", "model": "SmolLM2-135M-Instruct", "method": "np_max_act",
        "prompts": [args.features, 3 * args.features], "batch_size": args.batch_size,
        "prompts_per_s": round(stage_rate, 3), "bare_prompts_per_s": round(bare_rate, 3),
        "ratio": round(stage_rate / bare_rate, 3), "wall_s": [round(times[args.features], 1), round(times[3 * args.features], 1)],
    }))


if __name__ == "__main__":
    main()
