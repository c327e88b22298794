"""route vs the embedder's own throughput on the same window texts.

Synthetic features cut from real English text (the long descriptions of the installed
packages, as bench/collect.py uses), each with `--examples` top examples of 32 tokens
(16 before the top token): a third fire on one word (every occurrence is an example: input
features), a third on the token before one word (output features), a third at random
positions. They are written as a features table (schema.FEATURES) and routed by the real
stage (Ray Data, actor pool, all-MiniLM-L6-v2).

The bound: the same Embedder (same encode batch size, every core of the machine) encodes, in ONE
`encode` call in this process, exactly the window texts the stage embeds — input and
output windows of every feature, cross windows of the features that failed both tier-1
tests — duplicates included; bound features/s = features / that time (= the embedder's
texts/s divided by windows per feature). Stage and bound run alternately, twice each
(stage, bound, stage, bound), and the faster of each pair counts, as the machine is
shared. `features_per_s` is end to end: read, actor start and model
load, embedding, scoring, writing the routes table. As the machine may be shared, the JSON on stderr also has
the CPU seconds of each side (the bound's process; the driver and every process of the
local Ray cluster for the stage) and their ratio.

    .venv/bin/python bench/route.py [--features 2000] [--examples 20] [--num-actors 1] [--batch-size 512]
Last line: {"bench": "route", "features_per_s", "embedder_bound_features_per_s", "ratio", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import site
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from baez_ray import schema
from baez_ray.models.embedder import Embedder
from baez_ray.stages.route import RouteConfig, default_threads, route_dataset
from baez_ray.models.windows import TopExamples
from baez_ray.rundir import write_table

WINDOW, LEFT = 32, 16
TOKEN = re.compile(r"\s*(?:[A-Za-z]+|\d+|[^\sA-Za-z\d])")


def corpus_tokens() -> list[str]:
    """Prose lines of the installed packages' long descriptions, as word-level tokens with
    their leading space (" the", ","), the way decoded BPE tokens look."""
    toks: list[str] = []
    for sp in site.getsitepackages():
        for meta in sorted(Path(sp).glob("*.dist-info/METADATA")):
            text = meta.read_text(errors="ignore").split("\n\n", 1)[-1]
            if len(text) < 2000:
                continue
            for line in text.splitlines():
                letters = sum(c.isalpha() or c == " " for c in line)
                if len(line) > 40 and letters > 0.85 * len(line):  # prose, not code or tables
                    toks += TOKEN.findall(" " + " ".join(line.split()))
    return toks


def make_features(n_features: int, n_examples: int, seed: int = 0) -> pa.Table:
    toks = corpus_tokens()
    rng = random.Random(seed)
    where: dict[str, list[int]] = defaultdict(list)
    for i in range(LEFT, len(toks) - WINDOW):
        w = toks[i].strip().lower()
        if w.isalpha() and len(w) > 2:
            where[w].append(i)
    words = sorted(w for w, pos in where.items() if len(pos) >= n_examples)
    rows = []
    for f in range(n_features):
        kind = f % 3
        if kind == 0:  # input feature: fires on one word
            pos = rng.sample(where[rng.choice(words)], n_examples)
        elif kind == 1:  # output feature: fires on the token before one word
            pos = [p - 1 for p in rng.sample(where[rng.choice(words)], n_examples)]
        else:  # no pattern
            pos = [rng.randrange(LEFT, len(toks) - WINDOW) for _ in range(n_examples)]
        values = sorted((rng.uniform(1, 10) for _ in pos), reverse=True)
        exs = []
        for r, (p, v) in enumerate(zip(pos, values)):
            window = toks[p - LEFT : p - LEFT + WINDOW]
            acts = [0.0] * WINDOW
            acts[LEFT] = v
            exs.append({"kind": "top", "rank": r, "value": v, "top_index": LEFT, "token_strs": window, "acts": acts})
        rows.append({"sae_id": "bench/route", "model_id": "bench", "layer": 0, "feature": f, "n_tokens": len(toks),
                     "n_firing": n_examples, "max_activation": values[0], "examples": exs})
    return pa.Table.from_pylist(rows, schema=schema.FEATURES)


def embedded_texts(features: pa.Table, routes: pa.Table, cfg: RouteConfig) -> list[str]:
    phase1, phase2 = embedded_phases(features, routes, cfg)
    return phase1 + phase2


def embedded_phases(features: pa.Table, routes: pa.Table, cfg: RouteConfig) -> tuple[list[str], list[str]]:
    """The window texts the stage embeds (duplicates kept): in and out of every feature,
    cross of the features that failed both tier-1 tests."""
    ex = TopExamples(features, cfg.top_n)
    order = {f: i for i, f in enumerate(features.column("feature").to_pylist())}
    r = routes.to_pylist()
    need = np.zeros(features.num_rows, dtype=bool)
    for row in r:
        c_in, c_out = row["c_in"], row["c_out"]
        need[order[row["feature"]]] = not ((c_in is not None and c_in >= cfg.tau_in) or (c_out is not None and c_out >= cfg.tau_out))
    phase1 = [t for t in ex.texts(cfg.windows.input) + ex.texts(cfg.windows.output) if t]
    phase2 = [t for t in ex.texts(cfg.windows.cross, np.flatnonzero(need[ex.feat])) if t]
    return phase1, phase2


class TreeCPU:
    """CPU seconds (user + system) spent by this process and all its descendants — the
    local Ray cluster this driver started (GCS, raylet, workers, actors) — while running.
    Sampled every 0.5 s, so processes that end (the actor, when the dataset is done) still
    count, up to their last half second."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._start = self._sample()
        self._last = dict(self._start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> dict[int, float]:
        me = self._psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except self._psutil.Error:
                pass
        return out

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self._last.update(self._sample())

    def __enter__(self) -> "TreeCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        self.seconds = sum(v - self._start.get(pid, 0.0) for pid, v in self._last.items())


def unique_per_batch(features: pa.Table, routes: pa.Table, cfg: RouteConfig) -> int:
    """Texts the stage encodes: distinct per batch and phase (batches of cfg.batch_size)."""
    n = 0
    for start in range(0, features.num_rows, cfg.batch_size):
        f = features.slice(start, cfg.batch_size)
        keys = set(f.column("feature").to_pylist())
        r = routes.filter(pa.compute.is_in(routes.column("feature"), pa.array(sorted(keys), pa.int64())))
        phase1, phase2 = embedded_phases(f, r, cfg)
        n += len(set(phase1)) + len(set(phase2))
    return n


def run_stage(features_dir: Path, out_dir: Path, cfg: RouteConfig) -> tuple[pa.Table, float, float, float]:
    with TreeCPU() as cpu:
        t0 = time.perf_counter()
        t_first = None
        parts = []
        for b in route_dataset(features_dir, cfg).iter_batches(batch_format="pyarrow", batch_size=None):
            if t_first is None:
                t_first = time.perf_counter()
            parts.append(b)
        routes = schema.conform(pa.concat_tables(parts), schema.ROUTES)
        write_table(routes, out_dir)
        t1 = time.perf_counter()
    return routes, t1 - t0, t1 - (t_first or t0), cpu.seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, default=2000)
    ap.add_argument("--examples", type=int, default=20)
    ap.add_argument("--num-actors", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--encode-batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import ray

    cfg = RouteConfig(batch_size=args.batch_size, encode_batch_size=args.encode_batch_size, num_actors=args.num_actors, threads=args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_route_"))
    t = time.perf_counter()
    features = make_features(args.features, args.examples)
    write_table(features, tmp / "features")
    print(f"features: {features.num_rows} x {args.examples} examples in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    threads = default_threads(cfg)  # per stage actor
    # the bound gets every core of the machine, whatever the stage's actor count
    bound_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    emb = Embedder(cfg.embedder, device="cpu", batch_size=cfg.encode_batch_size, threads=bound_threads)

    def bound(texts: list[str]) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        emb.encode(texts)
        return time.perf_counter() - t, time.process_time() - c

    def note(what: str, wall: float, cpu: float) -> None:
        print(f"[bench] {what}: {wall:.1f} s wall, {cpu:.1f} CPU s, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

    ray.init(num_cpus=4, include_dashboard=False)  # as baez_ray.run.init_ray on a local machine
    ray.data.DataContext.get_current().enable_progress_bars = False
    # stage, bound, stage, bound (the first stage run also tells which features need cross
    # windows: the bound's texts); the better of each pair counts, as the machine is shared
    routes, s1, st1, sc1 = run_stage(tmp / "features", tmp / "routes", cfg)
    note("stage 1", s1, sc1)
    texts = embedded_texts(features, routes, cfg)
    b1, bc1 = bound(texts)
    note(f"bound 1 ({len(texts)} texts)", b1, bc1)
    routes2, s2, st2, sc2 = run_stage(tmp / "features", tmp / "routes", cfg)
    note("stage 2", s2, sc2)
    b2, bc2 = bound(texts)
    note("bound 2", b2, bc2)
    ray.shutdown()
    assert routes2.sort_by("feature").equals(routes.sort_by("feature")), "two stage runs disagree"
    stage_s = min(s1, s2)

    n = features.num_rows
    windows_per_feature = len(texts) / n
    bound_fps = n / min(b1, b2)
    fps = n / stage_s
    tiers = routes.column("tier").to_numpy()
    print(json.dumps({
        "features": n,
        "examples": args.examples,
        "num_actors": cfg.num_actors,
        "threads_per_actor": threads,
        "bound_threads": bound_threads,
        "batch_size": cfg.batch_size,
        "encode_batch_size": cfg.encode_batch_size,
        "windows_per_feature": round(windows_per_feature, 2),
        "unique_window_share": round(len(set(texts)) / max(len(texts), 1), 4),  # over all features
        "unique_window_share_per_batch": round(unique_per_batch(features, routes, cfg) / max(len(texts), 1), 4),  # what the stage encodes
        "tier_shares": {str(k): round(float((tiers == k).mean()), 3) for k in (1, 2, 3)},
        "embedder_texts_per_s": round(len(texts) / min(b1, b2), 1),
        "bound_seconds": [round(b1, 2), round(b2, 2)],
        "stage_seconds": [round(s1, 2), round(s2, 2)],
        # CPU seconds: the bound's process vs the whole stage (driver + every Ray process);
        # less sensitive than wall time to other work on a shared machine
        "bound_cpu_seconds": [round(bc1, 2), round(bc2, 2)],
        "stage_cpu_seconds": [round(sc1, 2), round(sc2, 2)],
        "cpu_ratio": round(min(bc1, bc2) / max(min(sc1, sc2), 1e-9), 3),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }), file=sys.stderr)
    print(json.dumps({"bench": "route", "features_per_s": round(fps, 2), "embedder_bound_features_per_s": round(bound_fps, 2), "ratio": round(fps / bound_fps, 3)}))


if __name__ == "__main__":
    main()
