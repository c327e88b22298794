"""How to lay out collect's forward passes on a CPU node: one process with all the threads,
or one single-thread process per core (collect: `num_actors: N`, `model.num_cpus: 1`).

The bare forward of Gemma 3 270M to layer 12 (`ResidualReader`, float32, batches of 8 ×
128 tokens of random ids, BOS first) for `--seconds` in each layout, side by side in one
run, `--reps` times alternating: one process of `--threads` threads, then `--threads`
processes of one thread started together once all are loaded (rate: the sum of theirs).
Every process holds its freed memory as a CollectWorker does (`models.lm.hold_freed_memory`).
The residuals of the same batch in both layouts are compared bit for bit (collect's
exactness does not depend on the layout).

    python bench/forward_layout.py [--threads 2] [--seconds 25] [--reps 2]
Last line: {"bench": "forward_layout", "one_process_tokens_per_s", "single_thread_processes_tokens_per_s",
"ratio", "identical_residuals", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import side_by_side  # noqa: E402


def forward(threads: int, seconds: float, ready) -> tuple[float, object]:
    import torch

    from baez_ray.config import ModelConfig
    from baez_ray.models.lm import ResidualReader, hold_freed_memory

    torch.set_num_threads(threads)
    hold_freed_memory()  # as a CollectWorker runs
    lm = ResidualReader(ModelConfig(id="gemma-3-270m", path="pypi:gemma3-270m", layer=12))
    ids = torch.randint(10, 200_000, (8, 128), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    first = lm.residual(ids).numpy().copy()
    lm.residual(ids)
    ready()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        lm.residual(ids)
        n += ids.numel()
    return n / (time.perf_counter() - t0), first


def layout(processes: int, threads: int, seconds: float):
    out = side_by_side(forward, [(threads, seconds)] * processes)
    return sum(r for r, _ in out), out[0][1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=25.0)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    one, many, same = [], [], True
    for _ in range(args.reps):
        r1, x1 = layout(1, args.threads, args.seconds)
        rn, xn = layout(args.threads, 1, args.seconds)
        one.append(round(r1, 1))
        many.append(round(rn, 1))
        same = same and bool((x1 == xn).all())
        print(f"one process × {args.threads} threads: {r1:.0f} tok/s; {args.threads} processes × 1 thread: {rn:.0f} tok/s",
              flush=True)
    print(json.dumps({"bench": "forward_layout", "threads": args.threads, "one_process_tokens_per_s": one,
                      "single_thread_processes_tokens_per_s": many, "ratio": round(sum(many) / sum(one), 3),
                      "identical_residuals": same}))


if __name__ == "__main__":
    main()
