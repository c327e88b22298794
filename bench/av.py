"""The AV's two engines side by side on this machine: the same vectors through the
transformers engine (`baez_ray/av/hf_engine.py`: tuned, `cache: prefix`; and its plain
`generate` call, `cache: dynamic`, the reference) and the vLLM engine
(`baez_ray/av/vllm_engine.py`, prompt embeddings; run by the `make install-vllm` venv),
each over a sweep of batch sizes (vectors per `explain` call, as `label.av.batch_size`):
explanations/s and generated tokens/s, and the vLLM / transformers ratio at each engine's
best batch size (and per batch size).

The AV: Gemma 3 270M (PyPI) reading each vector at its input embeddings the way the real
Gemma AV does (`jobs/av/nla-gemma3-27b-L41.yaml`'s prompt, marker ㈜ between `>` and `</`,
other rows × √d, the marker row replaced by the vector at the mean norm of the others),
greedy, in `--dtype` (the real AV runs in bfloat16), at most `--new-tokens` tokens. The
stop string is one the model does not write, so nearly every explanation runs its full
length in both engines; the tokens counted are the engines' own (`generated_tokens`).
Each engine runs in a child process of its own venv (vLLM is not in the main one), one
after the other, on the same vectors; the texts of the two engines are compared
(`same_text_share`: greedy in the same dtype should give the same text, kernels apart).

    .venv/bin/python bench/av.py [--vectors 64] [--batch-sizes 8,16,32,64] [--new-tokens 64]
        [--dtype bfloat16] [--engines transformers,plain,vllm] [--vllm-python .venv-vllm/bin/python]
        [--record]

`--record` appends the run to bench/results/av-<machine>.json. Last line:
{"bench": "av", "vllm_over_transformers", "tuned_over_plain", "engines": {...}, ...}
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache (CPU build)

ROOT = Path(__file__).resolve().parent.parent
MODEL = "pypi:gemma3-270m"
ENGINES = {"transformers": ("transformers", "prefix"), "plain": ("transformers", "dynamic"),
           "static": ("transformers", "static"), "vllm": ("vllm", None)}


def sidecar(path: Path, dtype: str, new_tokens: int) -> Path:
    """The bench's AV sidecar: the NLA Gemma AV's prompt on Gemma 3 270M (no chat template
    in its GGUF: the template's text alone), injected at the input embeddings."""
    import yaml

    real = yaml.safe_load((ROOT / "jobs" / "av" / "nla-gemma3-27b-L41.yaml").read_text(encoding="utf-8"))
    sc = {
        "name": "gemma3-270m-nla-prompt", "av_model": MODEL, "base_model": MODEL, "extraction_layer": 12,
        "self_verbalizer": True, "chat": False, "prompt_template": real["prompt_template"],
        "marker": real["marker"], "marker_token_id": real["marker_token_id"], "marker_left_id": real["marker_left_id"],
        "marker_right_id": real["marker_right_id"], "injection_scale": "auto", "other_rows_scale": "sqrt_d_model",
        "inject_layer": 0, "temperature": 0.0, "max_new_tokens": new_tokens, "stop": "<<never>>", "dtype": dtype,
    }
    path.write_text(yaml.safe_dump(sc, allow_unicode=True))
    return path


def child(args) -> dict:
    """One engine over every batch size, in this process: load, warm up, time."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from baez_ray.av.sidecar import load_sidecar
    from baez_ray.av.worker import make_verbalizer

    torch.set_num_threads(args.threads)
    engine, cache = ENGINES[args.child]
    sc = load_sidecar(args.sidecar)
    t0 = time.perf_counter()
    kwargs = {"cache": cache} if cache else None
    v = make_verbalizer(sc, engine, "cpu", args.sidecar, kwargs)
    load_s = time.perf_counter() - t0
    vectors = np.load(args.vectors_file)
    v.explain(vectors[:2], max_new_tokens=4)  # warm-up
    runs, texts = [], None
    for b in args.batch_sizes:
        v.generated_tokens = 0
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(vectors), b):
            out += v.explain(vectors[i : i + b])
        dt = time.perf_counter() - t0
        runs.append({"batch": b, "seconds": round(dt, 2), "explanations": len(out), "generated_tokens": v.generated_tokens,
                     "explanations_per_s": round(len(out) / dt, 3), "generated_tokens_per_s": round(v.generated_tokens / dt, 1)})
        texts = texts or out
        print(json.dumps({"progress": args.child, **runs[-1]}), file=sys.stderr, flush=True)
    return {"engine": args.child, "av_engine": engine, "cache": cache, "load_s": round(load_s, 1), "runs": runs, "texts": texts}


def run_child(name: str, python: str, args, sc_path: Path, vec_path: Path) -> dict:
    out = sc_path.parent / f"{name}.json"  # a file: vLLM writes its logs to stdout
    cmd = [python, str(Path(__file__).resolve()), "--child", name, "--sidecar", str(sc_path), "--vectors-file", str(vec_path),
           "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--threads", str(args.threads), "--child-out", str(out)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"{name} engine failed ({python}):\n{(p.stderr or p.stdout)[-3000:]}")
    return json.loads(out.read_text())


def vectors(n: int, d: int, seed: int = 0):
    import numpy as np

    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def summarise(results: dict) -> dict:
    """Best rate per engine, ratios, and how many texts the engines share."""
    best = {k: max(r["runs"], key=lambda x: x["generated_tokens_per_s"]) for k, r in results.items()}
    out = {"engines": {k: {"best_batch": b["batch"], "generated_tokens_per_s": b["generated_tokens_per_s"],
                           "explanations_per_s": b["explanations_per_s"], "load_s": results[k]["load_s"],
                           "runs": results[k]["runs"]} for k, b in best.items()}}
    for num, den, key in (("vllm", "transformers", "vllm_over_transformers"), ("vllm", "plain", "vllm_over_plain"),
                          ("transformers", "plain", "tuned_over_plain"), ("static", "plain", "static_over_plain")):
        if num in best and den in best:
            out[key] = round(best[num]["generated_tokens_per_s"] / best[den]["generated_tokens_per_s"], 3)
            per = {a["batch"]: round(a["generated_tokens_per_s"] / b["generated_tokens_per_s"], 3)
                   for a, b in zip(results[num]["runs"], results[den]["runs"])}
            out[key + "_per_batch"] = per
    names = list(results)
    if len(names) > 1:
        ref = results[names[0]]["texts"]
        out["same_text_share"] = {k: round(sum(a == b for a, b in zip(ref, results[k]["texts"])) / len(ref), 3)
                                  for k in names[1:]}
        out["same_text_reference"] = names[0]
    out["sample_texts"] = {k: [t[:80] for t in r["texts"][:2]] for k, r in results.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=64, help="vectors verbalized per batch size")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64])
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens per explanation (the AV's max_new_tokens)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--engines", default="transformers,plain,vllm",
                    help="of transformers (tuned), plain (the plain generate call), static (HF static cache), vllm")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"),
                    help="the python of a venv with vllm (make install-vllm)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--record", action="store_true", help="append the run to bench/results/av-<machine>.json")
    ap.add_argument("--child", choices=list(ENGINES), help=argparse.SUPPRESS)
    ap.add_argument("--sidecar", help=argparse.SUPPRESS)
    ap.add_argument("--vectors-file", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args)))
        return
    import numpy as np

    names = [e for e in args.engines.split(",") if e]
    with tempfile.TemporaryDirectory(prefix="bench-av-") as tmp:
        sc_path = sidecar(Path(tmp) / "av.yaml", args.dtype, args.new_tokens)
        vec_path = Path(tmp) / "vectors.npy"
        np.save(vec_path, vectors(args.vectors, 640))  # Gemma 3 270M's d_model
        results = {}
        for name in names:
            python = args.vllm_python if ENGINES[name][0] == "vllm" else sys.executable
            results[name] = run_child(name, python, args, sc_path, vec_path)
            print(f"{name}: " + ", ".join(f"batch {r['batch']}: {r['generated_tokens_per_s']} tok/s" for r in results[name]["runs"]),
                  flush=True)
    res = {"bench": "av", "model": MODEL, "dtype": args.dtype, "vectors": args.vectors, "new_tokens": args.new_tokens,
           "threads": args.threads, **summarise(results)}
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from record import append_run

        path = append_run("av", "bench/av.py", res, f"{args.threads} threads per engine, engines one after the other; "
                          "Gemma 3 270M with the NLA AV's prompt, greedy")
        print(f"recorded: {path.relative_to(ROOT)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
