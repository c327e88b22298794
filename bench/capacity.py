"""Capacity plan: GPU-hours, API tokens and dollars to label a whole SAE dictionary (default
262,144 features: Gemma Scope 2 on Gemma-3-27B-IT layer 41, SPEC §7) with a `label` job
(default jobs/gemma27b_l41_label.yaml), with tier routing under every tier-3 policy and
without routing (every feature to the job's tier-2 method), on N GPUs.

    bench/results/*.json ─┐ (the benches' recorded runs: bench/record.py)
    a run's manifest ─────┼─▶ figures, each with its source ─▶ cost per feature per method
    the job file ─────────┘                                  ─▶ plan per tier-3 policy
                                                                and per tier-3 share

No figure is typed in here. Each comes from a file, and the output prints which:

* `bench/results/*.json` (`--results`): the latest recorded run of each bench:
  `capacity_measure_gpu` (`measure-gpu` below, on a GPU: collect, the AV generating, the
  embedder), `av` (bench/av.py: the vLLM / transformers ratio of the AV engines on one
  machine), `tier3_trade` (bench/tier3_trade.py: the benchmark demo's tier-3 policies,
  their scores paired against `baez_k10` and the tier-2 method, and the share of
  near-duplicate top examples), `demo` (a `make demo` run's route counts: the tier shares);
* `--manifest RUN/manifest.json`: a label run's route counts (the tier shares), instead;
* the job file (`--job`): the tier methods, the tier-3 policy, `av_examples`, the AV
  engine and its explanation cap, the explainer's prices and Message Batches mode;
* what nothing measures is an assumption with a flag, printed under `assumptions`.

Cost per feature (F features, live share l, tier shares s1/s2/s3 of the live ones):

    route         GPU s = texts per feature / (embedder texts/s)
    tier 1        token_freq: nothing; small_llm: GPU s = 1 / (features per GPU-s, an assumption)
    tier 2        API tokens = prompt (its real prompt, chars / chars per token) + answer, × (1 + retry share)
    tier 3        manual: nothing
                  nla_direct: GPU s = tokens of one explanation / (AV generated tokens/s)
                  baez_kN: GPU s = N·(1 − duplicate share) explanations × their tokens / (AV tokens/s),
                           API tokens = the baez prompt of those explanations + answer
    labelling     with routing: l·F·(route + s1·tier 1 + s2·tier 2 + s3·tier 3)
                  without routing: l·F·tier 2;   saving = without / with
    shared        collect (tokens / collect tokens/s per GPU) and scoring a sample: in both plans,
                  outside the saving

    .venv/bin/python bench/capacity.py [--job jobs/gemma27b_l41_label.yaml] [--gpus 8]
        [--features 262144] [--manifest RUN/manifest.json] [--shares s1,s2,s3] [--tier3 POLICY] ...
    python3 bench/capacity.py measure-gpu [--record]   # on a GPU machine (torch, transformers)

Last line: {"bench": "capacity", ...}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# ---- the target (SPEC §7) ----------------------------------------------------------------
GEMMA3_27B = dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                  num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
                  sliding_window=1024)
LAYER = 41
D_SAE = 262_144
H100_BF16_DENSE_FLOPS = 989e12
NLA_PROMPT_TOKENS, NLA_MARKER_AT = 108, 93  # jobs/av/nla-gemma3-27b-L41.yaml through the Gemma 3 chat template
GPU_BENCHES = ("capacity_measure_gpu",)  # measure-gpu's runs
POLICIES = ("manual", "nla_direct", "baez_k3", "baez_k5", "baez_k10")


# ---- inputs: results files, a manifest, the job ------------------------------------------


def load_results(folder: Path) -> dict[str, list[dict]]:
    """bench → every recorded run of it in `folder`/*.json (with its file and machine),
    oldest first."""
    out: dict[str, list[dict]] = {}
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for i, run in enumerate(data.get("runs") or []):
            out.setdefault(data["bench"], []).append({**run, "file": _shown(path), "machine": data.get("machine"), "order": i})
    for runs in out.values():
        runs.sort(key=lambda r: (r.get("date") or "", r["order"]))
    return out


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def latest(results: dict, *benches: str) -> dict | None:
    """The latest run of any of `benches` (their result under "result")."""
    runs = sorted((r for b in benches for r in results.get(b, [])), key=lambda r: (r.get("date") or "", r["order"]))
    return runs[-1] if runs else None


def cite(run: dict) -> str:
    what = run.get("command") or run.get("script") or "?"
    commit = f", commit {run['commit']}" if run.get("commit") else ""
    return f"{run['file']} ({what}; {run.get('date')}{commit})"


@dataclass
class Figures:
    """Every figure the plan uses, with where it comes from."""

    sources: dict[str, str] = field(default_factory=dict)
    assumptions: dict[str, object] = field(default_factory=dict)

    def measured(self, name: str, value, source: str):
        self.sources[name] = source
        return value

    def assumed(self, name: str, value, why: str):
        self.assumptions[name] = f"{value} ({why})"
        return value


def load_label_job(path: str):
    from baez_ray.config import read_yaml_mapping, validate

    path = str(path if Path(path).exists() else ROOT / path)
    spec = validate(read_yaml_mapping(path, "job file"), path)
    if spec.job != "label":
        raise SystemExit(f"{path}: a label job is planned, this is a {spec.job} job")
    return spec


def tier_shares(args, results: dict, fig: Figures) -> tuple[float, float, float]:
    """Tier shares of live features: --shares, a label run's manifest, or the latest
    recorded `make demo` run (its route counts over the features that fired)."""
    if args.shares:
        s = [float(x) for x in args.shares.split(",")]
        fig.measured("tier_shares", None, "given (--shares)")
    else:
        if args.manifest:
            route, src = json.loads(Path(args.manifest).read_text())["stages"]["route"], f"route stage of {args.manifest}"
        else:
            run = latest(results, "demo")
            if run is None:
                raise SystemExit("tier shares: give --shares s1,s2,s3, --manifest RUN/manifest.json, or record a demo run in bench/results")
            route, src = run["result"]["route"], f"route counts of {cite(run)}"
        s = [route["tier1"], route["tier2"], route["tier3"]]
        fig.measured("tier_shares", None, f"{src}: tier 1/2/3 = {s[0]:,}/{s[1]:,}/{s[2]:,} features that fired")
    tot = sum(s) or 1.0
    return s[0] / tot, s[1] / tot, s[2] / tot


# ---- rates ---------------------------------------------------------------------------------


def gemma_params_to_layer(cfg: dict, layer: int) -> float:
    """Parameters that a forward pass up to the output of block `layer` multiplies with."""
    d, h, kv, hd, ff = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * ff
    return (layer + 1) * per_layer


def collect_rate(args, gpu: dict | None, fig: Figures) -> float:
    """Collect tokens/s per GPU: measure-gpu's (a full running state: most of a long
    corpus), else a FLOPs estimate at an assumed MFU."""
    r = (gpu or {}).get("result", {})
    if r.get("collect_full_state_tokens_per_s"):
        return fig.measured("collect_gpu", r["collect_full_state_tokens_per_s"],
                            f"{cite(gpu)}: {r.get('device')}, Gemma-3-27B shape to L{LAYER}, 262k SAE, collect's worker code, "
                            f"running top-k/reservoir full ({r.get('collect_tokens_per_s')} tok/s while they fill)")
    if r.get("collect_tokens_per_s"):
        return fig.measured("collect_gpu", r["collect_tokens_per_s"], f"{cite(gpu)}: collect's worker code")
    flops = 2 * gemma_params_to_layer(GEMMA3_27B, LAYER) + 2 * GEMMA3_27B["hidden_size"] * D_SAE
    fig.assumed("mfu", args.mfu, "collect: model FLOPs utilisation of H100 bf16 peak, no GPU measurement (--mfu)")
    return fig.measured("collect_gpu", H100_BF16_DENSE_FLOPS * args.mfu / flops, f"estimate: {flops:.3g} FLOPs/token at MFU {args.mfu}")


def av_rate(args, engine: str, gpu: dict | None, av: dict | None, fig: Figures) -> float:
    """The AV's generated tokens/s per GPU for `engine`: measured on a GPU when measure-gpu
    timed that engine; else the GPU's plain `generate` figure × the ratio of that engine to
    plain `generate` that bench/av.py measured on one machine (an estimate, said so)."""
    if args.av_tokens_per_s:
        return fig.assumed("av_tokens_per_s", args.av_tokens_per_s, "given (--av-tokens-per-s)")
    r = (gpu or {}).get("result", {})
    key = {"transformers": "av_tuned_tokens_per_s", "vllm": "av_vllm_tokens_per_s"}[engine]
    if r.get(key):
        return fig.measured("av_gpu", r[key], f"{cite(gpu)}: {r.get('device')}, Gemma-3-27B shape, {engine} engine, batch {r.get('av_batch')}")
    plain = r.get("av_plain_tokens_per_s") or r.get("av_generated_tokens_per_s")
    if not plain:
        return fig.assumed("av_tokens_per_s", 2500.0, "no GPU measurement of the AV (--av-tokens-per-s)")
    where = f"{cite(gpu)}: {r.get('device')}, Gemma-3-27B shape, plain transformers generate, batch {r.get('av_batch')}"
    ratio_key = {"transformers": "tuned_over_plain", "vllm": "vllm_over_plain"}[engine]
    ratio = (av or {}).get("result", {}).get(ratio_key)
    if not ratio:
        return fig.measured("av_gpu", plain, where + f" (the {engine} engine itself not measured: taken as plain generate)")
    return fig.measured("av_gpu", plain * ratio, f"estimate: {plain} tok/s ({where}) × {ratio} ({ratio_key} of {cite(av)}, "
                                                 f"{av['result'].get('model')} on {av['machine']})")


def embedder_rate(gpu: dict | None, fig: Figures) -> float | None:
    r = (gpu or {}).get("result", {})
    if not r.get("embedder_texts_per_s"):
        return None
    return fig.measured("route_gpu", r["embedder_texts_per_s"],
                        f"{cite(gpu)}: {r.get('device')}, MiniLM-L6 shape, {r.get('embedder_tokens')} tokens per text, fp32")


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
    from baez_ray.llm import prompts

    chars = []
    for exs in examples_per_feature:
        top = sorted((e for e in exs if e["kind"] == "top"), key=lambda e: e["rank"])[:n_examples]
        build = prompts.eleuther_messages if method.startswith("eleuther") else prompts.np_messages
        chars.append(sum(len(m["content"]) for m in build(top)))
    return sum(chars) / len(chars)


def baez_prompt_chars(n: float, explanation_chars: int) -> float:
    """Characters of a baez prompt of n explanations (n may be a mean: linear in n)."""
    from baez_ray.llm import prompts

    text = ("The state encodes a continuation of a technical description in which a number follows. " * 40)[:explanation_chars]

    def size(k: int) -> int:
        return sum(len(m["content"]) for m in prompts.baez_messages([text] * k, [10 - i % 10 for i in range(k)]))

    return size(1) + (n - 1) * (size(2) - size(1))


def scoring_prompt_chars(example_chars: float, per_prompt: int, label_chars: int = 40) -> float:
    from baez_ray.llm import prompts

    texts = ["x" * int(example_chars)] * per_prompt
    return float(sum(len(m["content"]) for m in prompts.scorer_messages("detection", "y" * label_chars, texts)))


def example_features(args, fig: Figures) -> list[list[dict]]:
    if args.features_table:
        import pyarrow.parquet as pq

        rows = pq.read_table(args.features_table, columns=["examples"]).slice(0, 400).to_pylist()
        feats = [r["examples"] for r in rows if sum(e["kind"] == "top" for e in r["examples"]) >= 2]
        fig.measured("prompt_examples", None, f"examples of {args.features_table} ({len(feats)} features)")
        return feats
    fig.measured("prompt_examples", None, f"synthetic English windows of {args.window} tokens (the job's collect.window)")
    return [synthetic_examples(20, args.window, seed=i) for i in range(20)]


# ---- cost per feature --------------------------------------------------------------------


@dataclass
class Cost:
    """What labelling one feature costs: GPU seconds and API tokens."""

    gpu_s: float = 0.0
    tin: float = 0.0
    tout: float = 0.0

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.gpu_s + o.gpu_s, self.tin + o.tin, self.tout + o.tout)

    def __mul__(self, k: float) -> "Cost":
        return Cost(self.gpu_s * k, self.tin * k, self.tout * k)

    def api_usd(self, price: dict) -> float:
        return (self.tin * price["input_per_mtok"] + self.tout * price["output_per_mtok"]) / 1e6 * price["multiplier"]

    def usd(self, price: dict) -> float:
        return self.api_usd(price) + self.gpu_s / 3600 * price["gpu_usd_per_hour"]


def prices(args, spec, fig: Figures) -> dict:
    """The explainer's price table and mode from the job (flags override), $/GPU-hour."""
    ex = spec.label.explainer
    pin = args.input_per_mtok if args.input_per_mtok is not None else ex.price.input_per_mtok
    pout = args.output_per_mtok if args.output_per_mtok is not None else ex.price.output_per_mtok
    batches = args.batches if args.batches is not None else ex.mode == "batches"
    mult = ex.price.batch_discount if batches else 1.0
    fig.measured("prices", None, f"{args.job}: label.explainer {ex.model}, ${pin}/${pout} per Mtok"
                                 f"{f', Message Batches (x{mult})' if batches else ''}")
    fig.assumed("gpu_usd_per_hour", args.gpu_usd_per_hour, "p5.48xlarge on demand ≈ $55/h for 8 H100 (--gpu-usd-per-hour)")
    return {"input_per_mtok": pin, "output_per_mtok": pout, "multiplier": mult, "batches": batches,
            "gpu_usd_per_hour": args.gpu_usd_per_hour}


def tier3_cost(policy: str, av_s_per_expl: float, baez_tokens: dict, nla_short: Cost | None, dup: dict, answer: float,
               retry: float, cpt: float) -> Cost:
    """Cost of one tier-3 feature under `policy`: manual | nla_direct | baez_kN (baez: the
    job's av_examples, given as baez_k<av_examples>)."""
    if policy == "manual":
        return Cost()
    if policy == "nla_direct":
        return Cost(gpu_s=av_s_per_expl) + (nla_short or Cost())
    n = int(policy.rsplit("_k", 1)[1])
    shown = n * (1 - dup.get(n, 0.0))  # near-duplicates verbalized and shown once
    tin = baez_prompt_chars(shown, baez_tokens["chars"]) / cpt
    return Cost(gpu_s=shown * av_s_per_expl, tin=tin * (1 + retry), tout=answer * (1 + retry))


def duplicate_shares(trade: dict | None, fig: Figures) -> dict[int, float]:
    """Share of a feature's top-N examples that are near-duplicates (verbalized once), as
    bench/tier3_trade.py measured it on the benchmark demo's examples; 0 without it."""
    shares = {int(k): v for k, v in ((trade or {}).get("result", {}).get("duplicate_share") or {}).items()}
    if shares:
        fig.measured("duplicate_share", None, f"{cite(trade)}: {shares} of the top-N examples "
                                              f"(window {trade['result'].get('dedup_window')} tokens), on the demo's corpus")
    else:
        fig.assumed("duplicate_share", 0.0, "no near-duplicate examples (no tier3_trade record)")
    return shares


def quality(trade: dict | None, policy: str) -> list[dict]:
    """The paired differences of `policy` against the others in the benchmark demo."""
    if trade is None:
        return []
    return [c for c in trade["result"].get("comparisons", []) if c["method"] == policy]


def per_feature_costs(args, spec, results: dict, fig: Figures) -> dict:
    """Cost per live feature of the route stage, each tier's method, and each tier-3 policy."""
    from baez_ray.av.sidecar import load_sidecar

    gpu, av, trade = latest(results, *GPU_BENCHES), latest(results, "av"), latest(results, "tier3_trade")
    lab, cpt, retry, answer = spec.label, args.chars_per_token, args.retry_share, args.answer_tokens
    fig.assumed("chars_per_token", cpt, "as baez_ray/report/routing.py")
    fig.assumed("answer_tokens", answer, "explainer answer tokens (reasoning + label)")
    fig.assumed("retry_share", retry, "share of prompts sent again after a parse failure")
    feats = example_features(args, fig)
    k2 = int(lab.tier2.rsplit("top", 1)[1]) if "top" in lab.tier2 else 10
    t2 = Cost(tin=prompt_chars(lab.tier2, feats, k2) / cpt * (1 + retry), tout=answer * (1 + retry))
    emb = embedder_rate(gpu, fig)
    route_text = Cost(gpu_s=1 / emb) if emb else Cost()  # one window text embedded
    t1 = Cost()
    if lab.tier1 == "small_llm":
        t1 = Cost(gpu_s=1 / fig.assumed("small_llm_features_per_gpu_s", args.small_llm_features_per_gpu_s,
                                        "tier 1 small_llm on vLLM: one np_max_act prompt per feature; not measured"))
    sc = load_sidecar(ROOT / lab.av_sidecar) if lab.av_sidecar else None
    cap = lab.av.max_new_tokens or (sc.max_new_tokens if sc else 200)
    mean = fig.assumed("av_mean_tokens", min(args.av_tokens, cap), "tokens of an NLA explanation: pinned near 148 by the AV's training "
                                                                      "(issue #27), capped by the job's av.max_new_tokens; not measured here")
    billed = cap if lab.av.engine == "transformers" else mean  # a transformers batch runs until its longest row
    rate = av_rate(args, lab.av.engine, gpu, av, fig)
    nla_short = None
    if lab.av.nla_direct_shorten:
        from baez_ray.llm import prompts

        chars = sum(len(m["content"]) for m in prompts.nla_direct_messages("x" * int(mean * cpt)))
        nla_short = Cost(tin=chars / cpt * (1 + retry), tout=answer * (1 + retry))
    dup = duplicate_shares(trade, fig)
    policies = list(dict.fromkeys([*POLICIES, policy_name(lab)]))
    t3 = {p: tier3_cost(p, billed / rate, {"chars": int(mean * cpt)}, nla_short, dup, answer, retry, cpt) for p in policies}
    res_s = residual_s(args, gpu, fig)
    t3 = {p: t + Cost(gpu_s=int(p.rsplit("_k", 1)[1]) * res_s) if p.startswith("baez") else t for p, t in t3.items()}
    ex_chars = sum(len("".join(e["token_strs"])) for f in feats for e in f[:5]) / max(1, sum(len(f[:5]) for f in feats))
    return {"route_text": route_text, "route_top_n": args.route_top_n, "example_chars": ex_chars, "tier1": t1, "tier2": t2, "tier3": t3, "av_rate": rate, "av_tokens_billed": billed,
            "engine": lab.av.engine, "trade": trade, "gpu": gpu}


def residual_s(args, gpu: dict | None, fig: Figures) -> float:
    """GPU s of one residual vector from the residuals stage (the base model on an example's
    left context, as far as the SAE's layer), at measure-gpu's forward rate; 0 with --residuals kept."""
    if args.residuals == "kept":
        return fig.assumed("residual_gpu_s", 0.0, "collect kept the residuals (--residuals kept)")
    r = (gpu or {}).get("result", {})
    if not r.get("forward_tokens_per_s"):
        return fig.assumed("residual_gpu_s", 0.0, "no forward rate measured (measure-gpu): the residuals stage not counted")
    fig.measured("residuals_gpu", r["forward_tokens_per_s"], f"{cite(gpu)}: forward_tokens_per_s × {args.residual_tokens} "
                                                                f"left-context tokens per example (--residual-tokens)")
    return args.residual_tokens / r["forward_tokens_per_s"]


def policy_name(lab) -> str:
    """The job's tier-3 policy as the plan names it (baez: baez_k<av_examples>)."""
    if not lab.av_sidecar:
        return "manual"
    if lab.tier3 in ("baez", "baez_last"):
        return f"baez_k{lab.av_examples}"
    return lab.tier3.replace("baez_last_k", "baez_k")


def labelling(c: dict, shares: tuple[float, float, float], policy: str) -> Cost:
    """Cost per live feature of labelling with routing under `policy` (tier-3)."""
    s1, s2, s3 = shares
    route = c["route_text"] * (c["route_top_n"] * (3 - s1))  # input + output windows; cross for the features not in tier 1
    return route + c["tier1"] * s1 + c["tier2"] * s2 + c["tier3"][policy] * s3


def rate_for_saving(c: dict, shares: tuple[float, float, float], policy: str, price: dict, saving: float) -> float | None:
    """The AV's generated tokens/s per GPU at which `policy` reaches `saving` (the AV's GPU
    time scales as 1 / rate, the rest stays): 0 when it needs no AV or already reaches it
    at any rate above the plan's; None when the rest alone costs more than the target."""
    with_ = labelling(c, shares, policy)
    av = Cost(gpu_s=c["tier3"][policy].gpu_s * shares[2])
    target = c["tier2"].usd(price) / saving
    rest = with_.usd(price) - av.usd(price)
    if av.gpu_s == 0:
        return 0.0 if rest <= target else None
    return round(c["av_rate"] * av.usd(price) / (target - rest), 1) if target > rest else None


def shared_costs(args, spec, c: dict, n_live: float, price: dict, fig: Figures) -> dict:
    """Collect and scoring a sample: the same with routing or without."""
    rate = collect_rate(args, c["gpu"], fig)
    fig.assumed("collect_tokens", args.collect_tokens, "tokens collect reads (jobs/gemma27b_l41_collect.yaml: 1e8)")
    collect = Cost(gpu_s=args.collect_tokens / rate)
    per_prompt, cpt = args.score_per_prompt, args.chars_per_token
    prompts_per_feature = 2 * (args.score_positives + args.score_negatives) / per_prompt  # detection + fuzz
    sc_in = prompts_per_feature * scoring_prompt_chars(c["example_chars"], per_prompt) / cpt
    score = Cost(tin=sc_in, tout=prompts_per_feature * (2 * per_prompt + 2)) * min(args.score_sample, n_live)
    fig.assumed("score_sample", args.score_sample, "features scored, detection + fuzz, real scorer prompts")
    return {"collect_gpu_hours": round(collect.gpu_s / 3600, 2), "collect_usd": round(collect.usd(price), 2),
            "scoring_api_usd": round(score.api_usd(price), 2), "collect_tokens_per_s_per_gpu": rate}


# ---- the plan ----------------------------------------------------------------------------


def totals(cost: Cost, price: dict, without: Cost | None = None) -> dict:
    out = {"gpu_hours": round(cost.gpu_s / 3600, 2), "api_input_tokens": int(cost.tin), "api_output_tokens": int(cost.tout),
           "api_usd": round(cost.api_usd(price), 2), "gpu_usd": round(cost.gpu_s / 3600 * price["gpu_usd_per_hour"], 2),
           "labelling_usd": round(cost.usd(price), 2)}
    if without is not None:
        out["saving"] = round(without.usd(price) / max(cost.usd(price), 1e-9), 2)
    return out


def plan(args) -> dict:
    fig = Figures()
    results = load_results(args.results)
    spec = load_label_job(args.job)
    shares = tier_shares(args, results, fig)
    live = fig.assumed("live_share", args.live_share, "share of the dictionary with enough examples to label (--live-share)")
    n_live = args.features * live
    price = prices(args, spec, fig)
    c = per_feature_costs(args, spec, results, fig)
    default = args.tier3 or policy_name(spec.label)
    if default not in c["tier3"]:
        c["tier3"][default] = tier3_cost(default, c["tier3"]["nla_direct"].gpu_s, {"chars": int(args.av_tokens * args.chars_per_token)},
                                         None, {}, args.answer_tokens, args.retry_share, args.chars_per_token)
    without = c["tier2"] * n_live
    policies = {p: {**totals(labelling(c, shares, p) * n_live, price, without), "quality": quality(c["trade"], p),
                    "av_tokens_per_s_for_3x": rate_for_saving(c, shares, p, price, 3.0)} for p in c["tier3"]}
    by_share = []
    for s3 in sorted({0.1, 0.3, 0.5, 0.7, 0.9, round(shares[2], 3)}):
        rest = (shares[0] + shares[1]) or 1.0
        sh = ((1 - s3) * shares[0] / rest, (1 - s3) * shares[1] / rest, s3)
        by_share.append({"tier3_share": s3, **{p: totals(labelling(c, sh, p) * n_live, price, without)["saving"] for p in c["tier3"]}})
    trade = c["trade"]
    return {
        "bench": "capacity", "job": args.job, "features": args.features, "gpus": args.gpus, "live_features": int(n_live),
        "tier_shares": [round(s, 4) for s in shares], "tier1": spec.label.tier1, "tier2": spec.label.tier2,
        "tier3_default": default, "av_engine": c["engine"], "av_generated_tokens_per_s": round(c["av_rate"], 1),
        "av_tokens_per_explanation": c["av_tokens_billed"],
        "per_feature": {"tier2_input_tokens": round(c["tier2"].tin), "tier2_output_tokens": round(c["tier2"].tout),
                        **{f"{p}_gpu_s": round(t.gpu_s, 3) for p, t in c["tier3"].items()},
                        **{f"{p}_input_tokens": round(t.tin) for p, t in c["tier3"].items()}},
        "price": price, "without_routing": totals(without, price), "policies": policies,
        "saving_default": policies[default]["saving"], "by_tier3_share": by_share,
        "quality_source": cite(trade) if trade else None, "quality_features": trade["result"].get("features") if trade else None,
        "shared": shared_costs(args, spec, c, n_live, price, fig),
        "wall_hours_on_n_gpus": round(policies[default]["gpu_hours"] / args.gpus, 2),
        "sources": fig.sources, "assumptions": fig.assumptions,
    }


def _diff(cmp: dict) -> str:
    return f"{cmp['mean_diff']:+.3f} [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]{' *' if cmp.get('p_holm', 1) < 0.05 else ''}"


def print_quality(p: dict) -> None:
    if not p["quality_source"]:
        print("quality: no bench/results tier3_trade record (bench/tier3_trade.py --record)")
        return
    print(f"quality, paired on the benchmark demo's {p['quality_features']} features (mean difference of the headline metric, 95% CI, "
          f"* Holm p < 0.05): {p['quality_source']}")
    for name, row in p["policies"].items():
        by_against: dict[str, list[str]] = {}
        for cmp in row["quality"]:
            by_against.setdefault(cmp["against"], []).append(f"{cmp['benchmark']} {_diff(cmp)}")
        for against, parts in by_against.items():
            print(f"  {name} − {against}: " + "; ".join(parts))


def print_plan(p: dict) -> None:
    s1, s2, s3 = p["tier_shares"]
    print(f"Capacity plan: label {p['features']:,} features ({p['live_features']:,} live) with {p['job']} on {p['gpus']} GPUs")
    print(f"tier shares of live features: tier 1 {s1:.1%} ({p['tier1']}), tier 2 {s2:.1%} ({p['tier2']}), tier 3 {s3:.1%}")
    print(f"AV: {p['av_engine']} engine, {p['av_generated_tokens_per_s']:,} generated tokens/s per GPU, "
          f"{p['av_tokens_per_explanation']} tokens per explanation")
    print()
    wo = p["without_routing"]
    print(f"{'tier-3 policy':32}{'GPU-h':>9}{'API $':>10}{'GPU $':>10}{'labelling $':>13}{'saving':>9}{'AV tok/s for 3x':>17}")
    for name, r in p["policies"].items():
        mark = "  <- the job's" if name == p["tier3_default"] else ""
        need = r["av_tokens_per_s_for_3x"]
        need = "unreachable" if need is None else ("-" if need == 0 else f"{need:,.0f}")
        print(f"{name:32}{r['gpu_hours']:>9,.1f}{r['api_usd']:>10,.0f}{r['gpu_usd']:>10,.0f}{r['labelling_usd']:>13,.0f}"
              f"{r['saving']:>8.2f}x{need:>17}{mark}")
    print(f"{'no routing (' + p['tier2'] + ')':32}{wo['gpu_hours']:>9,.1f}{wo['api_usd']:>10,.0f}{wo['gpu_usd']:>10,.0f}"
          f"{wo['labelling_usd']:>13,.0f}{1:>8.2f}x")
    print(f"routing saving with the job's tier-3 policy ({p['tier3_default']}): {p['saving_default']:.2f}x "
          f"(labelling every feature with {p['tier2']} costs {p['saving_default']:.2f} times what routing does)")
    print()
    print_quality(p)
    print()
    names = list(p["policies"])
    print("routing saving by tier-3 share (tiers 1 and 2 keep their ratio):")
    print(f"{'tier-3 share':>14}" + "".join(f"{n:>12}" for n in names))
    for r in p["by_tier3_share"]:
        print(f"{r['tier3_share']:>14.1%}" + "".join(f"{r[n]:>11.2f}x" for n in names))
    print()
    sh = p["shared"]
    print(f"shared by every plan (not in the saving): collect {sh['collect_gpu_hours']:,} GPU-hours (${sh['collect_usd']:,.0f}), "
          f"scoring a sample ${sh['scoring_api_usd']:,.0f}")
    pr = p["price"]
    print(f"prices: ${pr['input_per_mtok']}/${pr['output_per_mtok']} per Mtok (x{pr['multiplier']}), ${pr['gpu_usd_per_hour']}/GPU-hour")
    print()
    print("sources:")
    for k, v in p["sources"].items():
        print(f"  {k}: {v}")
    print("assumptions:")
    for k, v in p["assumptions"].items():
        print(f"  {k}: {v}")


# ---- measure-gpu: the target shapes on one GPU -------------------------------------------


class _Device:
    """The device measure-gpu times on, and how it builds random models there."""

    def __init__(self, tiny: bool):
        import torch

        self.torch = torch
        self.dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.tiny = tiny or self.dev == "cpu"
        self.shape = dict(GEMMA3_27B)
        if self.tiny:  # a smoke test of these code paths on a CPU
            self.shape.update(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)

    def sync(self) -> None:
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def build(self, cls, config):  # random weights, made on the device in bf16
        torch = self.torch
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(self.dev):
                return cls(config).eval()
        finally:
            torch.set_default_dtype(torch.float32)

    def free(self) -> None:
        if self.dev == "cuda":
            self.torch.cuda.empty_cache()


def _collect_worker(d: _Device, lm, layer: int, d_sae: int, batch: int):
    """collect's worker (CollectWorker) around a random model and a random JumpReLU-like SAE."""
    import torch

    from baez_ray.config import CollectConfig
    from baez_ray.stages.collect import CollectWorker, _Dictionary

    class LM:  # what CollectWorker uses of baez_ray.models.lm.ResidualReader
        def __init__(self, model):
            self.model, self.device = model, d.dev

        @torch.inference_mode()
        def residual(self, ids):
            return self.model.model(input_ids=ids).last_hidden_state

        def residuals(self, ids):
            return {layer: self.residual(ids)}

    class SAE:
        def __init__(self, d_in, n):
            self.W = (torch.randn(d_in, n, device=d.dev) / d_in**0.5).to(torch.bfloat16)
            self.b = torch.zeros(n, device=d.dev, dtype=torch.bfloat16)
            self.threshold = None

        def parameters(self):
            yield self.W

        def encode(self, x):
            pre = x @ self.W + self.b
            if self.threshold is None:  # ~ 64 active features per token (l0_small-like)
                self.threshold = torch.quantile(pre[0, :32].float().flatten(), 1 - 64 / self.W.shape[1]).to(pre.dtype)
            return pre * (pre > self.threshold)

    cfg = CollectConfig(top_k=40, window=64, window_left=48, reservoir=100, samples_per_decile=5, keep_residual=True,
                        residual_top_n=15, batch_size=batch)
    w = CollectWorker.__new__(CollectWorker)
    w.cfg, w.lm, w.device = cfg, LM(lm), d.dev
    w.dicts = [_Dictionary(SAE(d.shape["hidden_size"], d_sae), layer, d_sae, 0, cfg, d.dev)]
    w.F, w.seed, w.bos_id = d_sae, 0, 2
    return w


def measure_collect(args, d: _Device) -> dict:
    """collect's actor work per token: Gemma-3-27B to layer 41 in bf16, a 262k SAE, and
    collect's own merge code (CollectWorker._part); the bare forward beside it."""
    import numpy as np
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    d_sae, layer, ctx, batch = (512, 2, 64, 2) if d.tiny else (D_SAE, LAYER, 1024, 8)
    t0 = time.perf_counter()
    lm = d.build(Gemma3ForCausalLM, Gemma3TextConfig(**{**d.shape, "num_hidden_layers": layer + 1}))
    out = {"init_s": round(time.perf_counter() - t0, 1)}
    w, rng = _collect_worker(d, lm, layer, d_sae, batch), np.random.default_rng(0)

    def part(i):
        toks = rng.integers(3, d.shape["vocab_size"], size=(8 * batch, ctx)).astype(np.int64)
        toks[:, 0] = 2
        return toks, np.arange(i * 8 * batch, (i + 1) * 8 * batch, dtype=np.int64)

    def timed_parts(first: int, n: int) -> tuple[float, int]:
        t0, rows = time.perf_counter(), 0
        for i in range(first, first + n):
            rows += sum(t.num_rows for t in w._part(*part(i), i))
        d.sync()
        return time.perf_counter() - t0, rows

    with d.torch.inference_mode():
        ids = d.torch.from_numpy(part(0)[0][:batch]).to(d.dev)
        w.lm.residual(ids)  # warm-up
        d.sync()
        t0, n_fwd = time.perf_counter(), args.parts * 8 // 2
        for _ in range(n_fwd):
            w.lm.residual(ids)
        d.sync()
        out["forward_tokens_per_s"] = round(n_fwd * batch * ctx / (time.perf_counter() - t0), 1)
        w._part(*part(0), 0)  # warm-up, fills the running top-k a little
        d.sync()
        dt, rows = timed_parts(1, args.parts)
        out["collect_tokens_per_s"], out["collect_candidate_rows_per_part"] = round(args.parts * 8 * batch * ctx / dt, 1), round(rows / args.parts)
        if args.steady_parts:
            # late in a long corpus the running top-k and reservoir are full and almost
            # nothing enters them: model them as full of keys no new context beats
            w.dicts[0].top_key.fill_(3.0e38)
            w.dicts[0].smp_key.fill_(0.0)
            dt, rows = timed_parts(args.parts + 1, args.steady_parts)
            out["collect_full_state_tokens_per_s"] = round(args.steady_parts * 8 * batch * ctx / dt, 1)
            out["collect_full_state_rows_per_part"] = round(rows / args.steady_parts)
    out["collect_shape"] = {"layers": layer + 1, "d_model": d.shape["hidden_size"], "d_sae": d_sae, "context": ctx, "batch": batch}
    return out  # the model and the worker go with this frame


def measure_av(args, d: _Device) -> dict:
    """The AV's transformers engine as a label job runs it (`av.hf_engine.Generation`, the
    template's KV computed once: `cache: prefix`), against the plain `generate` call
    (`dynamic`) and HF's static cache (`static`, compiled on CUDA), on the whole 27B
    shape with random weights, the real AV prompt's length and marker position, greedy,
    a fixed number of new tokens, per batch size."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from baez_ray.av.hf_engine import Generation
    from baez_ray.av.prompt import PromptEmbeddings
    from baez_ray.av.sidecar import Sidecar

    av = d.build(Gemma3ForCausalLM, Gemma3TextConfig(**d.shape))
    T, pos = (16, 13) if d.tiny else (NLA_PROMPT_TOKENS, NLA_MARKER_AT)
    new, batches = (8, [2, 4]) if d.tiny else (args.av_new_tokens, args.av_batches)
    marker = 5
    ids = torch.randint(6, d.shape["vocab_size"], (T,)).tolist()
    ids[pos] = marker
    sc = Sidecar(name="random-27b-shape", av_model="-", base_model="-", extraction_layer=LAYER, prompt_template="㈜", chat=False,
                 marker="㈜", marker_token_id=marker, injection_scale=60000, other_rows_scale="sqrt_d_model", temperature=0.0,
                 max_new_tokens=new, dtype="bfloat16")
    prompt = PromptEmbeddings(sc, ids, av.get_input_embeddings().weight[torch.tensor(ids, device=d.dev)])
    gen = Generation(av, prompt, sc, pad_id=0)
    out: dict = {"av_prompt_tokens": T, "av_marker_at": pos, "av_new_tokens": new, "av_runs": []}
    with torch.inference_mode():
        for mode in args.av_modes:
            for b in batches:
                v = torch.randn(b, d.shape["hidden_size"], device=d.dev)
                gen.run(v, 0, 0.0, 4, 4, cache=mode)  # warm-up (static: the compile)
                d.sync()
                t0 = time.perf_counter()
                gen.run(v, 0, 0.0, new, new, cache=mode)
                d.sync()
                out["av_runs"].append({"cache": mode, "batch": b, "generated_tokens_per_s": round(b * new / (time.perf_counter() - t0), 1)})
    best = {m: max((r for r in out["av_runs"] if r["cache"] == m), key=lambda r: r["generated_tokens_per_s"]) for m in args.av_modes}
    if "dynamic" in best:
        out["av_plain_tokens_per_s"], out["av_plain_batch"] = best["dynamic"]["generated_tokens_per_s"], best["dynamic"]["batch"]
    if "prefix" in best:
        out["av_tuned_tokens_per_s"], out["av_batch"] = best["prefix"]["generated_tokens_per_s"], best["prefix"]["batch"]
    if "static" in best:
        out["av_static_tokens_per_s"], out["av_static_batch"] = best["static"]["generated_tokens_per_s"], best["static"]["batch"]
    del av, gen
    d.free()
    return out


def measure_embedder(d: _Device) -> dict:
    """MiniLM-L6-H384 shape, fp32 like sentence-transformers' default."""
    import torch
    from transformers import BertConfig, BertModel

    with torch.device(d.dev):
        emb = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)).eval()
    n_txt, L = (64, 8) if d.tiny else (512, 24)
    ids = torch.randint(1000, 30000, (n_txt, L), device=d.dev)
    with torch.inference_mode():
        emb(input_ids=ids)
        d.sync()
        t0 = time.perf_counter()
        for _ in range(20):
            emb(input_ids=ids).last_hidden_state.mean(1)
        d.sync()
    return {"embedder_texts_per_s": round(20 * n_txt / (time.perf_counter() - t0), 1), "embedder_tokens": L, "embedder_batch": n_txt}


def measure_gpu(args) -> dict:
    """Time, on this machine's GPU, with random weights of the real shapes (no download):
    collect's actor work per token, the AV's transformers engine, and the embedder."""
    import torch

    d = _Device(args.tiny)
    torch.manual_seed(0)
    out: dict = {"bench": "capacity_measure_gpu", "device": torch.cuda.get_device_name() if d.dev == "cuda" else "cpu", "tiny": d.tiny}
    if "collect" in args.parts_to_time:
        out.update(measure_collect(args, d))
        d.free()
    if "av" in args.parts_to_time:
        out.update(measure_av(args, d))
    if "embedder" in args.parts_to_time:
        out.update(measure_embedder(d))
    return out


# ---- command line ------------------------------------------------------------------------


def measure_gpu_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="capacity.py measure-gpu")
    ap.add_argument("--parts", type=int, default=6, help="contexts parts (8 batches each) timed through collect's worker")
    ap.add_argument("--steady-parts", type=int, default=3, help="then parts timed with a full top-k and reservoir (late in a corpus)")
    ap.add_argument("--av-batches", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128],
                    help="AV batch sizes (vectors per explain call)")
    ap.add_argument("--av-new-tokens", type=int, default=148, help="tokens per explanation (an NLA explanation's length)")
    ap.add_argument("--av-modes", type=lambda s: s.split(","), default=["prefix", "dynamic", "static"],
                    help="the AV engine's cache modes timed (prefix: the engine's default; dynamic: plain generate)")
    ap.add_argument("--time", dest="parts_to_time", type=lambda s: s.split(","), default=["collect", "av", "embedder"],
                    help="what to time, of collect,av,embedder")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke test of the code paths)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--record", action="store_true", help="append the run to bench/results/capacity_measure_gpu-<machine>.json")
    return ap


def measure_gpu_main(argv: list[str]) -> None:
    args = measure_gpu_parser().parse_args(argv)
    res = measure_gpu(args)
    line = json.dumps(res)
    if args.out:
        Path(args.out).write_text(line + "\n")
    if args.record and not res["tiny"]:
        from record import append_run

        path = append_run("capacity_measure_gpu", "bench/capacity.py measure-gpu", res, "random weights of the target shapes", res["device"])
        print(f"recorded: {_shown(path)}")
    print(line)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="jobs/gemma27b_l41_label.yaml", help="the label job planned (tier methods, AV, prices)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of the benches' results files")
    ap.add_argument("--features", type=int, default=262_144, help="features in the dictionary")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs the job runs on (wall time = GPU-hours / N)")
    ap.add_argument("--collect-tokens", type=float, default=1e8, help="tokens collect reads (jobs/gemma27b_l41_collect.yaml: 1e8)")
    ap.add_argument("--manifest", help="a label run's manifest.json: its route counts give the tier shares")
    ap.add_argument("--shares", help="tier shares of live features s1,s2,s3 (instead of a run's)")
    ap.add_argument("--live-share", type=float, default=1.0, help="share of features with enough examples to label")
    ap.add_argument("--tier3", help="the tier-3 policy marked as the job's (default: the job's own)")
    ap.add_argument("--features-table", help="a features/ table whose examples size the prompts")
    ap.add_argument("--window", type=int, default=64, help="tokens per example window (synthetic examples)")
    ap.add_argument("--chars-per-token", type=float, default=4.0, help="as baez_ray/report/routing.py")
    ap.add_argument("--answer-tokens", type=float, default=60.0, help="explainer answer tokens (reasoning + label)")
    ap.add_argument("--retry-share", type=float, default=0.05, help="share of prompts sent again after a parse failure")
    ap.add_argument("--av-tokens", type=float, default=148.0, help="mean tokens of an AV explanation (NLA: ~148)")
    ap.add_argument("--av-tokens-per-s", type=float, help="AV generated tokens/s per GPU (default: from the results files)")
    ap.add_argument("--residuals", choices=["stage", "kept"], default="stage",
                    help="stage: the residuals stage computes tier 3's vectors; kept: collect.keep_residual stored them")
    ap.add_argument("--residual-tokens", type=int, default=512,
                    help="mean left-context tokens per residual (a collect's: about half its context; an export's: its window)")
    ap.add_argument("--small-llm-features-per-gpu-s", type=float, default=20.0, help="tier 1 small_llm: features per GPU-second")
    ap.add_argument("--mfu", type=float, default=0.4, help="collect: model FLOPs utilisation when no GPU measurement exists")
    ap.add_argument("--route-top-n", type=int, default=20, help="route.top_n")
    ap.add_argument("--score-sample", type=int, default=1000, help="features scored (detection + fuzz)")
    ap.add_argument("--score-positives", type=int, default=10)
    ap.add_argument("--score-negatives", type=int, default=10)
    ap.add_argument("--score-per-prompt", type=int, default=5)
    ap.add_argument("--input-per-mtok", type=float, help="$ per million input tokens (default: the job's explainer price)")
    ap.add_argument("--output-per-mtok", type=float, help="$ per million output tokens (default: the job's explainer price)")
    ap.add_argument("--batches", action=argparse.BooleanOptionalAction, default=None,
                    help="Message Batches price (default: the job's explainer mode)")
    ap.add_argument("--gpu-usd-per-hour", type=float, default=6.88, help="$ per GPU-hour (p5.48xlarge on demand ≈ $55/h for 8 H100)")
    return ap


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "measure-gpu":
        measure_gpu_main(sys.argv[2:])
        return
    p = plan(parser().parse_args())
    print_plan(p)
    print(json.dumps(p))


if __name__ == "__main__":
    main()
