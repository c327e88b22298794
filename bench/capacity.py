"""Capacity plan: GPU-hours, API tokens and dollars to label a whole SAE dictionary (default
262,144 features: Gemma Scope 2 on Gemma-3-27B-IT layer 41, SPEC §7) with the `label` job,
with tier routing and without it (every feature to the tier-2 frontier method), on N GPUs.

Every per-stage figure comes from a measurement, and the output says which:

* the JSON last lines of the benchmarks, given as files: `--collect` (bench/collect.py),
  `--route` (bench/route.py), `--llm-stage` (bench/llm_stage.py), `--score`
  (bench/score.py, when it exists), `--gpu` (`bench/capacity.py measure-gpu`, below);
* a run's `manifest.json` (`--manifest`, e.g. runs/demo/manifest.json): the tier shares
  of its route stage, the share of features with too few examples, the route rate, and
  the explainer tokens per tier-3 (`baez`) feature of its label stage;
* without a file, the figures the README records for the same benchmarks and the demo
  run (each marked "README" in the output), unless `--no-readme-defaults`;
* what nothing measures is an assumption with a flag to change it, listed as such.

Per-stage model (F features, live share l, tier shares s1/s2/s3 of the live ones):

    collect       GPU s = tokens / (collect tokens/s per GPU)           [same in both plans]
    route         GPU s = l·F · texts per feature / (embedder texts/s)  [routing only]
    tier 1        token_freq: CPU, no tokens (small_llm: CPU s from bench/llm_stage.py)
    tier 2        API tokens = l·F·s2 · (prompt chars / chars per token, answer tokens) · (1 + retry share)
    tier 3        GPU s = l·F·s3 · av_examples · AV tokens / (AV generated tokens/s)
                  + the residuals stage: l·F·s3 · av_examples · left-context tokens / (forward tokens/s)
                    (0 with collect.keep_residual: --residuals kept)
                  API tokens = l·F·s3 · baez prompt (the AV explanations) + answer
    no routing    API tokens = l·F · tier-2 tokens
    scoring       a sample of features (--score-sample), detection + fuzz prompts   [same in both]

Prompt sizes are measured on the real prompts (baez_ray.llm.prompts) of the examples of a
features table (`--features-table`), or of synthetic examples of the job's window.

    .venv/bin/python bench/capacity.py [--gpus 8] [--features 262144] [--collect-tokens 1e8]
        [--collect F] [--route F] [--llm-stage F] [--score F] [--gpu F] [--manifest F]
        [--shares s1,s2,s3] [--batches] [--input-per-mtok 3] [--output-per-mtok 15] ...
    python3 bench/capacity.py measure-gpu [--out gpu.json]   # on a GPU machine (torch, transformers)

Last line: {"bench": "capacity", ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ---- figures recorded in the README (bench/collect.py; the demo run's manifest) ----------
README = {
    "collect": {"tokens_per_s": 942.0, "bare_tokens_per_s": 1007.0, "ratio": 0.94,
                "what": "Gemma 3 270M L12 + 4k SAE, 2-core CPU"},
    "manifest": {"route": {"features": 2048, "seconds": 51.299, "tier1": 136, "tier2": 139, "tier3": 1773},
                 "label": {"skipped_few_examples": 1213, "by_tier": {"1": 136, "2": 48, "3": 12}, "input_tokens": 34580,
                           "output_tokens": 5537},
                 "what": "demo run: Gemma 3 270M L12, demo SAE (2,048 features), 65k tokens, tau_cross 0.25 (make demo)"},
    # `python3 bench/capacity.py measure-gpu` (and `--parts 3 --steady-parts 3 --collect-only`)
    # on one NVIDIA H200, 2026-11-26: torch 2.11 + cu130, transformers 5.17
    "gpu": {"device": "NVIDIA H200", "forward_tokens_per_s": 13050.6, "collect_tokens_per_s": 3340.1,
            "collect_full_state_tokens_per_s": 10057.0, "av_generated_tokens_per_s": 438.0, "av_batch": 64,
            "embedder_texts_per_s": 58395.4, "embedder_tokens": 24},
}

# ---- the target (SPEC §7) ----------------------------------------------------------------
GEMMA3_27B = dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                  num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
                  sliding_window=1024)
LAYER = 41
D_SAE = 262_144
H100_BF16_DENSE_FLOPS = 989e12


def last_json(path: str | None) -> dict | None:
    """The last line of a file that parses as a JSON object (a benchmark's output)."""
    if not path:
        return None
    for line in reversed(Path(path).read_text().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise SystemExit(f"{path}: no JSON line (the last line of a bench/*.py run)")


def gemma_params_to_layer(cfg: dict, layer: int) -> float:
    """Parameters that a forward pass up to the output of block `layer` multiplies with."""
    d, h, kv, hd, ff = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * ff
    return (layer + 1) * per_layer


# ---- prompt sizes ------------------------------------------------------------------------

# the sentences of bench/llm_stage.py, whose prompts the measured rates are for
from llm_stage import SENTENCES  # noqa: E402  (bench/ is the script's directory)


def synthetic_examples(n: int, window: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    words = " ".join(SENTENCES).split()
    out = []
    for r in range(n):
        start = rng.randrange(len(words))
        toks = [" " + words[(start + i) % len(words)] for i in range(window)]
        acts = [0.0] * window
        t = window * 3 // 4
        acts[t], acts[t - 1] = 5.0 - 0.1 * r, 2.0
        out.append({"kind": "top", "rank": r, "value": acts[t], "top_index": t, "token_strs": toks, "acts": acts})
    return out


def prompt_chars(method: str, examples_per_feature: list[list[dict]], n_examples: int) -> float:
    """Mean characters of the method's prompt (all messages) over the given features."""
    sys.path.insert(0, str(ROOT))
    from baez_ray.llm import prompts

    chars = []
    for exs in examples_per_feature:
        top = sorted((e for e in exs if e["kind"] == "top"), key=lambda e: e["rank"])[:n_examples]
        build = prompts.eleuther_messages if method.startswith("eleuther") else prompts.np_messages
        chars.append(sum(len(m["content"]) for m in build(top)))
    return sum(chars) / len(chars)


def baez_prompt_chars(n: int, explanation_chars: int) -> float:
    sys.path.insert(0, str(ROOT))
    from baez_ray.llm import prompts

    text = ("The state encodes a continuation of a technical description in which a number follows. " * 40)[:explanation_chars]
    return float(sum(len(m["content"]) for m in prompts.baez_messages([text] * n, [10 - i % 10 for i in range(n)])))


def scoring_prompt_chars(example_chars: float, per_prompt: int, label_chars: int = 40) -> float:
    sys.path.insert(0, str(ROOT))
    from baez_ray.llm import prompts

    texts = ["x" * int(example_chars)] * per_prompt
    return float(sum(len(m["content"]) for m in prompts.scorer_messages("detection", "y" * label_chars, texts)))


# ---- the plan ----------------------------------------------------------------------------


def plan(args) -> dict:
    sources: dict[str, str] = {}
    assumptions: dict[str, object] = {}
    use_readme = not args.no_readme_defaults

    def figure(name: str, measured, readme, what: str):
        if measured is not None:
            sources[name] = f"measured: {what}"
            return measured
        if readme is not None and use_readme:
            sources[name] = f"README: {what}"
            return readme
        sources[name] = "not measured"
        return None

    collect_b, route_b, llm_b, score_b = (last_json(p) for p in (args.collect, args.route, args.llm_stage, args.score))
    gpu_b: dict = {}
    for path in args.gpu or []:  # several measure-gpu outputs: later files add or override figures
        gpu_b.update(last_json(path))
    gpu_files = "measured: " + " + ".join(args.gpu or [])
    if not gpu_b and use_readme:
        gpu_b, gpu_files = dict(README["gpu"]), "README: bench/capacity.py measure-gpu"
    man = json.loads(Path(args.manifest).read_text())["stages"] if args.manifest else None

    F, N = args.features, args.gpus
    # -- tier shares and live share (route stage of a run) --
    if args.shares:
        s1, s2, s3 = (float(x) for x in args.shares.split(","))
        tot = s1 + s2 + s3
        s1, s2, s3 = s1 / tot, s2 / tot, s3 / tot
        sources["tier_shares"] = "given (--shares)"
        live = args.live_share if args.live_share is not None else 1.0
    else:
        m = man or (README["manifest"] if use_readme else None)
        if m is None:
            raise SystemExit("tier shares: give --shares s1,s2,s3 or --manifest RUN/manifest.json")
        r, lab = m["route"], m.get("label", {})
        skipped = lab.get("skipped_few_examples", 0)
        # the few-example features are in routes/ (mostly tier 3): take them out of tier 3
        n1, n2, n3 = r["tier1"], r["tier2"], max(0, r["tier3"] - skipped)
        s1, s2, s3 = (x / max(1, n1 + n2 + n3) for x in (n1, n2, n3))
        src = f"{args.manifest}" if man else README["manifest"]["what"]
        sources["tier_shares"] = f"{'measured' if man else 'README'}: {src}"
        measured_live = (r["features"] - skipped) / r["features"]
        live = args.live_share if args.live_share is not None else 1.0
        assumptions["live_share_of_that_run"] = round(measured_live, 3)
    assumptions["live_share"] = live
    n_live = F * live
    n1, n2, n3 = n_live * s1, n_live * s2, n_live * s3

    # -- collect (GPU) --
    params = gemma_params_to_layer(GEMMA3_27B, LAYER)
    flops_tok = 2 * params + 2 * GEMMA3_27B["hidden_size"] * D_SAE  # forward to L41 + SAE encode
    collect_rate = None
    if gpu_b.get("collect_full_state_tokens_per_s"):
        # most of a long corpus runs with a full running top-k and reservoir; the first
        # parts (an empty state: every firing context enters) are slower
        collect_rate = gpu_b["collect_full_state_tokens_per_s"]
        sources["collect_gpu"] = (f"{gpu_files} ({gpu_b.get('device')}: Gemma-3-27B shape to L{LAYER}, 262k SAE, collect's worker code, "
                                  f"full top-k/reservoir; {gpu_b.get('collect_tokens_per_s')} tok/s while they fill, bare forward "
                                  f"{gpu_b.get('forward_tokens_per_s')} tok/s)")
    elif gpu_b.get("collect_tokens_per_s"):
        collect_rate = gpu_b["collect_tokens_per_s"]
        sources["collect_gpu"] = f"{gpu_files} ({gpu_b.get('device')}: Gemma-3-27B shape to L{LAYER}, 262k SAE, collect's worker code)"
    else:
        ratio = figure("collect_overhead", collect_b and collect_b.get("ratio"), README["collect"]["ratio"], README["collect"]["what"] + ", collect / bare forward")
        collect_rate = H100_BF16_DENSE_FLOPS * args.mfu / flops_tok * (ratio or 1.0)
        sources["collect_gpu"] = f"estimate: FLOPs/token {flops_tok:.3g} at MFU {args.mfu} of H100 bf16 peak × collect/bare ratio"
        assumptions["mfu"] = args.mfu
    collect_gpu_s = args.collect_tokens / collect_rate

    # -- route (embedder) --
    texts_per_feature = args.route_top_n * (2 + (1 - s1))  # in + out windows; cross for the non-tier-1
    emb_rate = gpu_b.get("embedder_texts_per_s")
    if emb_rate:
        sources["route_gpu"] = f"{gpu_files} ({gpu_b.get('device')}, MiniLM-L6 shape, {gpu_b.get('embedder_tokens')} tokens per text, fp32)"
        route_gpu_s = n_live * texts_per_feature / emb_rate
    else:
        route_gpu_s = None
    route_cpu_rate = None
    if route_b:
        route_cpu_rate = route_b["features_per_s"]
        sources["route_cpu"] = f"measured: {args.route} (bench/route.py, features/s end to end)"
    elif man or use_readme:
        rr = (man or README["manifest"])["route"]
        route_cpu_rate = rr["features"] / rr["seconds"]
        sources["route_cpu"] = f"{'measured' if man else 'README'}: route stage of {args.manifest or README['manifest']['what']}"
    route_cpu_h = n_live / route_cpu_rate / 3600 if route_cpu_rate else None

    # -- prompt sizes --
    if args.features_table:
        import pyarrow.parquet as pq

        rows = pq.read_table(args.features_table, columns=["examples"]).slice(0, 400).to_pylist()
        feats = [r["examples"] for r in rows if sum(e["kind"] == "top" for e in r["examples"]) >= 2]
        sources["prompt_examples"] = f"measured: examples of {args.features_table} ({len(feats)} features)"
    else:
        feats = [synthetic_examples(20, args.window, seed=i) for i in range(20)]
        sources["prompt_examples"] = f"synthetic English windows of {args.window} tokens (the job's collect.window)"
    k = int(args.tier2.rsplit("top", 1)[1]) if "top" in args.tier2 else 10
    t2_in = prompt_chars(args.tier2, feats, k) / args.chars_per_token
    t2_out = args.answer_tokens
    retry = args.retry_share
    t2_in, t2_out = t2_in * (1 + retry), t2_out * (1 + retry)  # a retry resends the prompt (+ answer, ≈ small)
    assumptions.update(chars_per_token=args.chars_per_token, answer_tokens=args.answer_tokens, retry_share=retry)

    # tier 3: AV explanations + a baez draft
    av_rate = gpu_b.get("av_generated_tokens_per_s")
    if args.av_tokens_per_s:
        av_rate = args.av_tokens_per_s
        sources["av_gpu"] = "given (--av-tokens-per-s)"
        assumptions["av_tokens_per_s"] = av_rate
    elif av_rate:
        sources["av_gpu"] = (f"{gpu_files} ({gpu_b.get('device')}, Gemma-3-27B shape, transformers generate, batch "
                             f"{gpu_b.get('av_batch')}: the AV's transformers engine; vLLM batches far better)")
    else:
        av_rate = 2500.0
        sources["av_gpu"] = "assumption: 2500 tokens/s per GPU (--av-tokens-per-s)"
        assumptions["av_tokens_per_s"] = av_rate
    baez_in = baez_prompt_chars(args.av_examples, int(args.av_tokens * args.chars_per_token)) / args.chars_per_token
    baez_out = args.answer_tokens
    av_per_feature = args.av_examples * args.av_tokens / av_rate
    if args.tier3 == "manual":  # no AV configured: tier 3 goes to a human, no GPU, no tokens
        av_per_feature, baez_in, baez_out = 0.0, 0.0, 0.0
        sources["tier3"] = "manual (--tier3 manual): flagged for a human only"
    av_gpu_s = n3 * av_per_feature
    # the residuals stage: the base model on each example the AV reads, cut after its top
    # token (the forward rate of measure-gpu: the 27B model as far as layer 41)
    fwd_rate = gpu_b.get("forward_tokens_per_s") or 0.0
    res_gpu_s = 0.0 if args.residuals == "kept" or args.tier3 == "manual" or not fwd_rate else \
        n3 * args.av_examples * args.residual_tokens / fwd_rate
    sources["residuals_gpu"] = ("none: collect kept the residuals (--residuals kept)" if args.residuals == "kept" else
                                f"{gpu_files} forward_tokens_per_s ({fwd_rate} tok/s) x {args.residual_tokens} left-context tokens per example")
    assumptions["residual_tokens_per_example"] = args.residual_tokens
    measured_baez = None
    if man and man.get("label", {}).get("by_tier", {}).get("3") and not man["label"]["by_tier"].get("2"):
        lab = man["label"]
        measured_baez = lab["input_tokens"] / max(1, sum(lab["by_tier"].values()))
        assumptions["baez_input_tokens_in_that_run"] = round(measured_baez)
    assumptions.update(av_examples=args.av_examples, av_tokens_per_explanation=args.av_tokens)

    # tier 1 small_llm (CPU) if asked
    t1_cpu_h = None
    if args.tier1 == "small_llm":
        rate = figure("small_llm_cpu", llm_b and llm_b.get("prompts_per_s"), None, "bench/llm_stage.py")
        t1_cpu_h = n1 / rate / 3600 if rate else None

    # scoring a sample
    ex_chars = sum(len("".join(e["token_strs"])) for f in feats for e in f[:5]) / max(1, sum(len(f[:5]) for f in feats))
    per_prompt = args.score_per_prompt
    prompts_per_feature = 2 * (args.score_positives + args.score_negatives) / per_prompt  # detection + fuzz
    if score_b and score_b.get("input_tokens_per_feature"):
        sc_in, sc_out = score_b["input_tokens_per_feature"], score_b.get("output_tokens_per_feature", 0)
        sources["scoring"] = f"measured: {args.score}"
    else:
        sources["scoring"] = "real scorer prompts of the examples above; answers: one 0/1 list"
        if score_b and score_b.get("prompts") and score_b.get("features"):  # bench/score.py
            prompts_per_feature = score_b["prompts"] / score_b["features"]
            sources["scoring"] += f"; {prompts_per_feature:g} prompts per feature measured by {args.score}"
        sc_in = prompts_per_feature * scoring_prompt_chars(ex_chars, per_prompt) / args.chars_per_token
        sc_out = prompts_per_feature * (2 * per_prompt + 2)
    score_n = min(args.score_sample, n_live)

    price_in, price_out = args.input_per_mtok, args.output_per_mtok
    mult = args.batch_discount if args.batches else 1.0

    def usd(tin, tout):
        return (tin * price_in + tout * price_out) / 1e6 * mult

    def scenario(routing: bool) -> dict:
        gpu_s = {"collect": collect_gpu_s}
        cpu_h = {}
        if routing:
            if route_gpu_s is not None:
                gpu_s["route"] = route_gpu_s
            elif route_cpu_h is not None:
                cpu_h["route"] = route_cpu_h
            gpu_s["av_tier3"] = av_gpu_s
            gpu_s["residuals_tier3"] = res_gpu_s
            if t1_cpu_h is not None:
                cpu_h["small_llm_tier1"] = t1_cpu_h
            tok_in = n2 * t2_in + n3 * baez_in
            tok_out = n2 * t2_out + n3 * baez_out
        else:
            tok_in, tok_out = n_live * t2_in, n_live * t2_out
        tok_in += score_n * sc_in
        tok_out += score_n * sc_out
        gpu_h = sum(gpu_s.values()) / 3600
        return {
            "gpu_hours": round(gpu_h, 2),
            "gpu_hours_by_stage": {k: round(v / 3600, 2) for k, v in gpu_s.items()},
            "cpu_hours_by_stage": {k: round(v, 2) for k, v in cpu_h.items()},
            "wall_hours_on_n_gpus": round(gpu_h / N, 2),
            "api_input_tokens": int(tok_in),
            "api_output_tokens": int(tok_out),
            "api_usd": round(usd(tok_in, tok_out), 2),
            "gpu_usd": round(gpu_h * args.gpu_usd_per_hour, 2),
            "total_usd": round(usd(tok_in, tok_out) + gpu_h * args.gpu_usd_per_hour, 2),
        }

    with_r, without_r = scenario(True), scenario(False)
    assumptions.update(gpu_usd_per_hour=args.gpu_usd_per_hour, collect_tokens=args.collect_tokens, score_sample=args.score_sample,
                       route_texts_per_feature=round(texts_per_feature, 1))
    # how the answer moves with the tier-2 share (tiers 1 and 3 keep their ratio)
    sens = []
    for share2 in (0.0, 0.25, 0.5, 0.75, 1.0):
        rest = (s1 + s3) or 1.0
        a1, a3 = (1 - share2) * s1 / rest, (1 - share2) * s3 / rest
        if s1 + s3 == 0:
            a1, a3 = 0.0, 1 - share2
        tin = n_live * (share2 * t2_in + a3 * baez_in) + score_n * sc_in
        tout = n_live * (share2 * t2_out + a3 * baez_out) + score_n * sc_out
        gh = (collect_gpu_s + (route_gpu_s or 0) + n_live * a3 * av_per_feature) / 3600
        sens.append({"tier2_share": share2, "tier1_share": round(a1, 3), "tier3_share": round(a3, 3), "gpu_hours": round(gh, 1),
                     "api_usd": round(usd(tin, tout), 0), "total_usd": round(usd(tin, tout) + gh * args.gpu_usd_per_hour, 0)})
    return {
        "bench": "capacity", "features": F, "gpus": N, "live_features": int(n_live),
        "tier_shares": [round(s1, 4), round(s2, 4), round(s3, 4)],
        "per_feature": {"tier2_input_tokens": round(t2_in), "tier2_output_tokens": round(t2_out), "baez_input_tokens": round(baez_in),
                        "baez_output_tokens": round(baez_out), "score_input_tokens": round(sc_in), "score_output_tokens": round(sc_out)},
        "rates": {"collect_tokens_per_s_per_gpu": round(collect_rate, 1), "embedder_texts_per_s": emb_rate,
                  "route_cpu_features_per_s": round(route_cpu_rate, 2) if route_cpu_rate else None, "av_generated_tokens_per_s": av_rate},
        "price": {"input_per_mtok": price_in, "output_per_mtok": price_out, "batches": args.batches,
                  "multiplier": mult, "gpu_usd_per_hour": args.gpu_usd_per_hour},
        "with_routing": with_r, "without_routing": without_r,
        "routing_saves_usd": round(without_r["total_usd"] - with_r["total_usd"], 2),
        "routing_saves_api_tokens": without_r["api_input_tokens"] + without_r["api_output_tokens"] - with_r["api_input_tokens"] - with_r["api_output_tokens"],
        "tier2_share_sensitivity": sens,
        "sources": sources, "assumptions": assumptions,
    }


def print_plan(p: dict) -> None:
    w, wo = p["with_routing"], p["without_routing"]
    s1, s2, s3 = p["tier_shares"]
    print(f"Capacity plan: label {p['features']:,} features ({p['live_features']:,} live) on {p['gpus']} GPUs")
    print(f"tier shares of live features: tier 1 {s1:.1%}, tier 2 {s2:.1%}, tier 3 {s3:.1%}")
    print()
    print(f"{'':34}{'with routing':>16}{'without routing':>18}")
    rows = [
        ("GPU-hours", "gpu_hours", "{:,.1f}"), ("wall hours on N GPUs", "wall_hours_on_n_gpus", "{:,.2f}"),
        ("API input tokens", "api_input_tokens", "{:,}"), ("API output tokens", "api_output_tokens", "{:,}"),
        ("API $", "api_usd", "{:,.0f}"), ("GPU $", "gpu_usd", "{:,.0f}"), ("total $", "total_usd", "{:,.0f}"),
    ]
    for label, key, fmt in rows:
        print(f"{label:34}{fmt.format(w[key]):>16}{fmt.format(wo[key]):>18}")
    print(f"{'  GPU-hours by stage':34}{json.dumps(w['gpu_hours_by_stage']):>16}  {json.dumps(wo['gpu_hours_by_stage'])}")
    if w["cpu_hours_by_stage"]:
        print(f"{'  CPU-hours by stage':34}{json.dumps(w['cpu_hours_by_stage'])}")
    print(f"routing saves ${p['routing_saves_usd']:,.0f} and {p['routing_saves_api_tokens']:,} API tokens (negative: it costs more)")
    print()
    print("per feature: " + ", ".join(f"{k} {v:,}" for k, v in p["per_feature"].items()))
    print("rates: " + ", ".join(f"{k} {v}" for k, v in p["rates"].items()))
    pr = p["price"]
    print(f"prices: ${pr['input_per_mtok']}/${pr['output_per_mtok']} per Mtok (x{pr['multiplier']}{', Message Batches' if pr['batches'] else ''}), "
          f"${pr['gpu_usd_per_hour']}/GPU-hour")
    print()
    print("tier-2 share   tier 1   tier 3   GPU-h      API $    total $")
    for r in p["tier2_share_sensitivity"]:
        print(f"{r['tier2_share']:>12.0%} {r['tier1_share']:>8.1%} {r['tier3_share']:>8.1%} {r['gpu_hours']:>7,.1f} {r['api_usd']:>10,.0f} {r['total_usd']:>10,.0f}")
    print()
    print("sources:")
    for k, v in p["sources"].items():
        print(f"  {k}: {v}")
    print("assumptions:")
    for k, v in p["assumptions"].items():
        print(f"  {k}: {v}")


# ---- measure-gpu: the target shapes on one GPU -------------------------------------------


def measure_gpu(args) -> dict:
    """Time, on this machine's GPU, with random weights of the real shapes (no download):
    collect's actor work per token (Gemma-3-27B to layer 41 in bf16, a 262k JumpReLU SAE,
    and collect's own merge code, CollectWorker._part), the AV's generation (the whole
    27B model, transformers generate), and the embedder (MiniLM-L6 shape)."""
    import numpy as np
    import torch
    from transformers import BertConfig, BertModel, Gemma3ForCausalLM, Gemma3TextConfig

    sys.path.insert(0, str(ROOT))
    from baez_ray.config import CollectConfig
    from baez_ray.stages.collect import CollectWorker, _Dictionary

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny or dev == "cpu"
    shape = dict(GEMMA3_27B)
    d_sae, layer, ctx, batch = D_SAE, LAYER, 1024, 8
    if tiny:  # a smoke test of this code path on a CPU
        shape.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
        d_sae, layer, ctx, batch = 512, 2, 64, 2
    out: dict = {"bench": "gpu_stages", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "tiny": tiny}
    torch.manual_seed(0)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    # -- collect: forward to layer L (a model of L+1 blocks), SAE, merge --
    def build(cls, config):  # random weights, made on the device in bf16
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(dev):
                return cls(config).eval()
        finally:
            torch.set_default_dtype(torch.float32)

    t0 = time.perf_counter()
    lm = build(Gemma3ForCausalLM, Gemma3TextConfig(**{**shape, "num_hidden_layers": layer + 1}))
    out["init_s"] = round(time.perf_counter() - t0, 1)

    class LM:  # what CollectWorker uses of baez_ray.models.lm.ResidualReader
        def __init__(self, model):
            self.model, self.device = model, dev

        @torch.inference_mode()
        def residual(self, ids):
            return self.model.model(input_ids=ids).last_hidden_state

        def residuals(self, ids):
            return {layer: self.residual(ids)}

    class SAE:
        def __init__(self, d_in, d):
            self.W = (torch.randn(d_in, d, device=dev) / d_in**0.5).to(torch.bfloat16)
            self.b = torch.zeros(d, device=dev, dtype=torch.bfloat16)
            self.threshold = None

        def parameters(self):
            yield self.W

        def encode(self, x):
            pre = x @ self.W + self.b
            if self.threshold is None:  # ~ 64 active features per token (l0_small-like)
                q = 1 - 64 / self.W.shape[1]
                self.threshold = torch.quantile(pre[0, :32].float().flatten(), q).to(pre.dtype)
            return pre * (pre > self.threshold)

    cfg = CollectConfig(top_k=40, window=64, window_left=48, reservoir=100, samples_per_decile=5, keep_residual=True,
                        residual_top_n=15, batch_size=batch)
    w = CollectWorker.__new__(CollectWorker)
    w.cfg, w.lm, w.device = cfg, LM(lm), dev
    w.dicts = [_Dictionary(SAE(shape["hidden_size"], d_sae), layer, d_sae, 0, cfg, dev)]
    w.F, w.seed, w.bos_id = d_sae, 0, 2
    rng = np.random.default_rng(0)

    def part(i):
        toks = rng.integers(3, shape["vocab_size"], size=(8 * batch, ctx)).astype(np.int64)
        toks[:, 0] = 2
        return toks, np.arange(i * 8 * batch, (i + 1) * 8 * batch, dtype=np.int64)

    with torch.inference_mode():
        ids = torch.from_numpy(part(0)[0][:batch]).to(dev)
        w.lm.residual(ids)  # warm-up
        sync()
        t0 = time.perf_counter()
        n_fwd = args.parts * 8 // 2
        for _ in range(n_fwd):
            w.lm.residual(ids)
        sync()
        out["forward_tokens_per_s"] = round(n_fwd * batch * ctx / (time.perf_counter() - t0), 1)
        w._part(*part(0), 0)  # warm-up, fills the running top-k a little
        sync()
        t0 = time.perf_counter()
        rows = 0
        for i in range(1, args.parts + 1):
            rows += sum(t.num_rows for t in w._part(*part(i), i))
        sync()
        dt = time.perf_counter() - t0
        out["collect_tokens_per_s"] = round(args.parts * 8 * batch * ctx / dt, 1)
        out["collect_candidate_rows_per_part"] = round(rows / args.parts)
        if args.steady_parts:
            # late in a long corpus the running top-k and reservoir are full and almost
            # nothing enters them: model them as full of keys no new context beats
            w.dicts[0].top_key.fill_(3.0e38)
            w.dicts[0].smp_key.fill_(0.0)
            t0 = time.perf_counter()
            rows = 0
            for i in range(args.parts + 1, args.parts + 1 + args.steady_parts):
                rows += sum(t.num_rows for t in w._part(*part(i), i))
            sync()
            out["collect_full_state_tokens_per_s"] = round(args.steady_parts * 8 * batch * ctx / (time.perf_counter() - t0), 1)
            out["collect_full_state_rows_per_part"] = round(rows / args.steady_parts)
    out["collect_shape"] = {"layers": layer + 1, "d_model": shape["hidden_size"], "d_sae": d_sae, "context": ctx, "batch": batch}
    del lm, w
    if dev == "cuda":
        torch.cuda.empty_cache()
    if args.collect_only:
        return out

    # -- AV: the whole model generating (transformers; vLLM would batch better) --
    av = build(Gemma3ForCausalLM, Gemma3TextConfig(**shape))
    B, prompt, new = (4, 16, 8) if tiny else (args.av_batch, 256, args.av_new_tokens)
    ids = torch.randint(3, shape["vocab_size"], (B, prompt), device=dev)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        av.generate(ids[:, :16], **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})
        sync()
        t0 = time.perf_counter()
        av.generate(ids, **gen)
        sync()
        dt = time.perf_counter() - t0
    out["av_generated_tokens_per_s"] = round(B * new / dt, 1)
    out["av_batch"], out["av_prompt_tokens"], out["av_new_tokens"] = B, prompt, new
    del av
    if dev == "cuda":
        torch.cuda.empty_cache()

    # -- embedder: MiniLM-L6-H384 shape, fp32 like sentence-transformers' default --
    with torch.device(dev):
        emb = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)).eval()
    n_txt, L = (64, 8) if tiny else (512, 24)
    ids = torch.randint(1000, 30000, (n_txt, L), device=dev)
    with torch.inference_mode():
        emb(input_ids=ids)
        sync()
        t0 = time.perf_counter()
        for _ in range(20):
            emb(input_ids=ids).last_hidden_state.mean(1)
        sync()
    out["embedder_texts_per_s"] = round(20 * n_txt / (time.perf_counter() - t0), 1)
    out["embedder_tokens"] = L
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure-gpu":
        ap = argparse.ArgumentParser(prog="capacity.py measure-gpu")
        ap.add_argument("--parts", type=int, default=6, help="contexts parts (8 batches each) timed through collect's worker")
        ap.add_argument("--av-batch", type=int, default=64)
        ap.add_argument("--av-new-tokens", type=int, default=128)
        ap.add_argument("--steady-parts", type=int, default=0, help="then parts timed with a full top-k and reservoir (late in a corpus)")
        ap.add_argument("--collect-only", action="store_true", help="time collect only")
        ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the code path)")
        ap.add_argument("--out", help="also write the JSON here")
        args = ap.parse_args(sys.argv[2:])
        res = measure_gpu(args)
        line = json.dumps(res)
        if args.out:
            Path(args.out).write_text(line + "\n")
        print(line)
        return

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=int, default=262_144, help="features in the dictionary")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs the job runs on (wall time = GPU-hours / N)")
    ap.add_argument("--collect-tokens", type=float, default=1e8, help="tokens collect reads (jobs/gemma27b_l41_collect.yaml: 1e8)")
    for name in ("collect", "route", "llm-stage", "score"):
        ap.add_argument(f"--{name}", help=f"output of bench/{name.replace('-', '_')}.py")
    ap.add_argument("--gpu", nargs="+", help="outputs of `capacity.py measure-gpu` (later files add to earlier ones)")
    ap.add_argument("--manifest", help="a label run's manifest.json: tier shares, live share, route rate, tier-3 tokens")
    ap.add_argument("--no-readme-defaults", action="store_true", help="use no README figure for what no file gives")
    ap.add_argument("--shares", help="tier shares of live features s1,s2,s3 (instead of a run's)")
    ap.add_argument("--live-share", type=float, help="share of features with enough examples to label (default 1)")
    ap.add_argument("--features-table", help="a features/ table whose examples size the prompts")
    ap.add_argument("--window", type=int, default=64, help="tokens per example window (synthetic examples)")
    ap.add_argument("--tier1", choices=["token_freq", "small_llm"], default="token_freq")
    ap.add_argument("--tier2", default="eleuther_acts_top5")
    ap.add_argument("--tier3", choices=["baez", "manual"], default="baez", help="baez: AV explanations + a draft label (an AV configured)")
    ap.add_argument("--chars-per-token", type=float, default=4.0, help="as baez_ray/report/routing.py")
    ap.add_argument("--answer-tokens", type=float, default=60.0, help="explainer answer tokens (reasoning + label)")
    ap.add_argument("--retry-share", type=float, default=0.05, help="share of prompts sent again after a parse failure")
    ap.add_argument("--av-examples", type=int, default=10, help="label.av_examples")
    ap.add_argument("--av-tokens", type=int, default=200, help="tokens per AV explanation (the AV's max_new_tokens)")
    ap.add_argument("--residuals", choices=["stage", "kept"], default="stage",
                    help="stage: the residuals stage computes the tier-3 vectors; kept: collect.keep_residual stored them")
    ap.add_argument("--residual-tokens", type=int, default=512,
                    help="mean left-context tokens per residual (a collect's: about half the context; an export's: its window)")
    ap.add_argument("--av-tokens-per-s", type=float, help="AV generated tokens/s per GPU (default: --gpu's measurement, else 2500)")
    ap.add_argument("--mfu", type=float, default=0.4, help="collect: model FLOPs utilisation when --gpu gives no rate")
    ap.add_argument("--route-top-n", type=int, default=20, help="route.top_n")
    ap.add_argument("--score-sample", type=int, default=1000, help="features scored (detection + fuzz)")
    ap.add_argument("--score-positives", type=int, default=10)
    ap.add_argument("--score-negatives", type=int, default=10)
    ap.add_argument("--score-per-prompt", type=int, default=5)
    ap.add_argument("--input-per-mtok", type=float, default=3.0, help="$ per million input tokens (Claude Sonnet 4.5: 3)")
    ap.add_argument("--output-per-mtok", type=float, default=15.0, help="$ per million output tokens (Claude Sonnet 4.5: 15)")
    ap.add_argument("--batches", action="store_true", help="Message Batches API (price × --batch-discount)")
    ap.add_argument("--batch-discount", type=float, default=0.5)
    ap.add_argument("--gpu-usd-per-hour", type=float, default=6.88, help="$ per GPU-hour (p5.48xlarge on demand ≈ $55/h for 8 H100)")
    args = ap.parse_args()
    p = plan(args)
    print_plan(p)
    print(json.dumps(p))


if __name__ == "__main__":
    main()
