"""The tier-3 trade: what each tier-3 policy costs and what it scores, measured on the
same features (paired) by the tier-3 benchmark (jobs/benchmark_tier3.yaml, the demo SAE): `baez` with 3, 5
and 10 explanations (`baez_k3`, `baez_k5`, `baez_k10`) and `nla_direct`, beside the tier-2
method (`eleuther_acts_top5`).

    baez-ray run jobs/benchmark_tier3.yaml --out runs/bench-tier3   (or --run DIR: a finished run)
      ─▶ per method: mean headline metric of each benchmark (the manifest's summary), AV
         explanations and explainer tokens per feature (labels/<method>.parquet)
      ─▶ per tier-3 policy: the paired difference against the baez with the most
         explanations and against the tier-2 method (the manifest's comparisons: mean, 95%
         bootstrap CI, Holm-corrected p)
      ─▶ the share of near-duplicate examples among each feature's top N train examples
         (`baez_ray.av.worker.distinct_examples`, the job's av.dedup_window)

`bench/capacity.py` prices every tier-3 policy from the recorded run and prints its quality
beside its routing saving.

    .venv/bin/python bench/tier3_trade.py [--run runs/bench-tier3] [--job jobs/benchmark_tier3.yaml] [--record]

`--record` appends the run to bench/results/tier3_trade-<machine>.json. Last line:
{"bench": "tier3_trade", "features", "means", "comparisons", "work", "duplicate_share", ...}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TIER3 = re.compile(r"(baez(_last)?(_k\d+)?|nla_direct)")


def run_job(job: str, out: Path) -> float:
    """`baez-ray run JOB --out OUT` in a child process (resumes a partial run); seconds."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "baez_ray.cli", "run", job, "--out", str(out)], cwd=ROOT)
    if p.returncode not in (0, 3):  # 3: finished with some failed rows (counted in the run)
        raise SystemExit(f"baez-ray run {job} exited {p.returncode}")
    return time.perf_counter() - t0


def comparisons(manifest: dict, policies: list[str], against: list[str]) -> list[dict]:
    """Each policy against each of `against` (policy − other), from the manifest's pairwise table."""
    out = []
    for c in manifest.get("comparisons", []):
        for p in policies:
            for a in against:
                if p == a or {c["method_a"], c["method_b"]} != {p, a}:
                    continue
                sign = 1 if c["method_a"] == p else -1
                lo, hi = (c["ci_low"], c["ci_high"]) if sign == 1 else (-c["ci_high"], -c["ci_low"])
                out.append({"method": p, "against": a, "benchmark": c["benchmark"], "metric": c["metric"], "n": c["n"],
                            "mean_diff": round(sign * c["mean_diff"], 4), "ci_low": round(lo, 4), "ci_high": round(hi, 4),
                            "p_holm": c.get("p_holm"), "interpretable": c.get("interpretable")})
    return out


def work(run: Path, methods: list[str]) -> dict:
    """Per method: features, labelled share, AV explanations shown, explainer tokens per feature."""
    import pyarrow.parquet as pq

    out = {}
    for m in methods:
        t = pq.read_table(run / "labels" / f"{m}.parquet", columns=["label", "n_examples", "input_tokens", "output_tokens"]).to_pydict()
        n = max(1, len(t["label"]))
        out[m] = {"features": len(t["label"]), "labelled_share": round(sum(x is not None for x in t["label"]) / n, 3),
                  "examples_shown_per_feature": round(sum(t["n_examples"]) / n, 2),
                  "input_tokens_per_feature": round(sum(t["input_tokens"]) / n, 1),
                  "output_tokens_per_feature": round(sum(t["output_tokens"]) / n, 1)}
        if m == "nla_direct":
            out[m]["av_calls_per_feature"] = 1.0
        elif m.startswith("baez"):
            out[m]["av_calls_per_feature"] = out[m]["examples_shown_per_feature"]
    return out


def duplicate_share(run: Path, ks: list[int], window: int) -> dict[str, float]:
    """Per N: the share of the top-N train examples that are near-duplicates of a higher one."""
    import pyarrow.parquet as pq

    from baez_ray.av.worker import distinct_examples

    feats = pq.read_table(run / "train", columns=["examples"]).column("examples").to_pylist()
    out = {}
    for k in ks:
        tops = [[e for e in ex if e["kind"] == "top"][:k] for ex in feats]
        total = sum(len(t) for t in tops)
        kept = sum(len(distinct_examples(t, window)) for t in tops)
        out[str(k)] = round(1 - kept / max(1, total), 4)
    return out


def trade(run: Path, spec) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    methods = list(spec.benchmark.methods)
    policies = [m for m in methods if TIER3.fullmatch(m)]
    tier2 = next((m for m in methods if m.startswith("eleuther_acts_top")), None)
    ks = sorted(int(m.rsplit("_k", 1)[1]) for m in policies if re.fullmatch(r"baez_k\d+", m))
    reference = f"baez_k{ks[-1]}" if ks else None
    means: dict[str, dict] = {}
    for r in manifest.get("summary", []):
        means.setdefault(r["method"], {})[r["benchmark"]] = r["mean"]
    return {
        "bench": "tier3_trade", "job": spec.name, "run": str(run), "features": manifest["stages"]["split"].get("sampled"),
        "train_examples": spec.benchmark.train_examples, "tier2": tier2, "reference": reference, "policies": policies,
        "benchmarks": list(spec.benchmark.score.benchmarks), "means": means,
        "comparisons": comparisons(manifest, policies, [a for a in (reference, tier2) if a]),
        "work": work(run, methods), "dedup_window": spec.benchmark.av.dedup_window,
        "duplicate_share": duplicate_share(run, ks or [spec.benchmark.train_examples], spec.benchmark.av.dedup_window),
        "stage_s": {k: round(v.get("seconds", 0), 1) for k, v in manifest["stages"].items() if k.startswith("label:")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="jobs/benchmark_tier3.yaml")
    ap.add_argument("--run", default=str(ROOT / "runs" / "bench-tier3"), help="the run folder (the job runs there unless finished)")
    ap.add_argument("--record", action="store_true", help="append the run to bench/results/tier3_trade-<machine>.json")
    args = ap.parse_args()
    from baez_ray.jobs import load_job

    spec = load_job(ROOT / args.job if not Path(args.job).exists() else Path(args.job))
    run = Path(args.run)
    manifest = run / "manifest.json"
    seconds = None
    if not manifest.exists() or "report" not in json.loads(manifest.read_text()).get("stages", {}):
        seconds = run_job(args.job, run)
    res = trade(run, spec)
    if seconds is not None:
        res["run_s"] = round(seconds, 1)
    for c in res["comparisons"]:
        print(f"{c['method']} − {c['against']} ({c['benchmark']}, n={c['n']}): {c['mean_diff']:+.3f} "
              f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] p_holm={c['p_holm']}")
    if args.record:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from record import append_run

        path = append_run("tier3_trade", "bench/tier3_trade.py", res, f"{args.job}: local models only (CPU)")
        print(f"recorded: {path.relative_to(ROOT)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
