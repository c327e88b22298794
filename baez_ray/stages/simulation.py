"""The `simulation` benchmark (Bills et al. 2023, "Language models can explain neurons in
language models"; the score Neuronpedia reports): from the label alone, the scorer predicts
the feature's activation at every token of an excerpt.

    a feature's excerpts (its test examples, top and decile samples, and its negatives:
       stages/score.py's items, in the order shown; `simulation_excerpts` caps each kind)
    × its subjects (labels + the random-label control) ─▶ one scorer prompt per (label,
       excerpt): the label, the excerpt, its tokens numbered, all in one call, asking for
       `index: value` lines, 0-10 (llm/prompts.py; output constraint `activation_lines:N`,
       which the local backends enforce: transformers token by token, vLLM as a regex),
       with the top log-probs of every answer token (`top_logprobs`, where the backend
       gives them)
    ─▶ per token, the expected value of the scorer's digits (`expected_values`), or the
       written integer where there are no log-probs (anthropic) or the value's token does
       not carry the number; an unreadable answer is retried (llm.rounds.ask_until_parsed),
       then counted as failed
    ─▶ score = Pearson correlation (metrics.simulation_correlation) of predicted and true
       activations over every token of the feature's answered excerpts

True activations: a positive's are the feature's own, normalised to 0-10 by the largest
among the feature's excerpts (what the scorer is asked for; the correlation does not depend
on it); a negative's are 0 (`negatives: corpus`: windows where the feature does not fire;
`other_features`: other features' examples, where this feature's activation is not
recorded and taken as 0, the usual assumption for random text and a sparse feature).
Special tokens (BOS) are left out of the excerpt. Chance is 0.

Expected values: the value's first answer token is found by its place in the answer text;
its top log-probs give P(k) for each whole number k = 0..10 written as one token (the
token's text after what precedes the value in it, e.g. a space). Tokenizers that write 10
as "1" "0" (Gemma, Llama 2, SmolLM) put the mass of 10 on "1": when the scorer wrote "1",
the next token's P("0") splits it into 1 and 10; when it wrote another digit that split is
unknown and the "1" mass counts as 1. E = Σ k P(k) / Σ P(k).
"""

from __future__ import annotations

import math

from baez_ray.config import ScoreConfig
from baez_ray.llm import prompts
from baez_ray.llm.backends import TOP_LOGPROBS
from baez_ray.metrics import simulation_correlation, split_halves
from baez_ray.models.windows import token_text

BENCHMARK = "simulation"
SCALE = 10.0  # activations on 0..SCALE


def excerpt(example: dict, own: bool) -> dict:
    """An excerpt to simulate: its tokens as text, special tokens left out, and the feature's
    activation at each (`own`: the feature's example; otherwise 0 everywhere)."""
    keep = [(token_text(t), a) for t, a in zip(example["token_strs"], example["acts"]) if token_text(t)]
    return {"token_strs": [t for t, _ in keep], "acts": [float(max(a, 0.0)) if own else 0.0 for _, a in keep]}


def selected(truth: list[int], cap: int | None) -> list[int]:
    """Indices of the excerpts simulated: all, or the first `cap` positives and the first
    `cap` negatives in the order shown."""
    if cap is None:
        return list(range(len(truth)))
    pos = [i for i, t in enumerate(truth) if t][:cap]
    neg = [i for i, t in enumerate(truth) if not t][:cap]
    return sorted(pos + neg)


def prompt_rows(item: dict, subjects: list[dict], cfg: ScoreConfig) -> list[dict]:
    """Scorer prompt rows (score.SCORE_PROMPTS fields + `acts`) of one feature's item
    (its `excerpts` and `truth`, in the order shown) for each of its subjects."""
    which = selected(item["truth"], cfg.simulation_excerpts)
    peak = max((a for i in which for a in item["excerpts"][i]["acts"]), default=0.0)
    rows = []
    for s in subjects:
        for i in which:
            ex = item["excerpts"][i]
            n = len(ex["token_strs"])
            rows.append({"sae_id": s["sae_id"], "layer": s["layer"], "feature": s["feature"], "method": s["method"],
                         "benchmark": BENCHMARK, "label": s["label"], "request_id": f"{s['sae_id']}|{s['feature']}|{s['method']}|{BENCHMARK}|{i}",
                         "messages": prompts.simulation_messages(s["label"], ex["token_strs"]), "max_tokens": 8 * n + 16,
                         "temperature": 0.0, "stop": None, "constraint": f"activation_lines:{n}", "top_logprobs": TOP_LOGPROBS,
                         "truth": [item["truth"][i]], "acts": [SCALE * a / peak if peak > 0 else 0.0 for a in ex["acts"]]})
    return rows


# ---- the scorer's answer -----------------------------------------------------------------

def _numbers(top: list[dict], prefix: str) -> dict[int, float]:
    """P(k) of each whole number 0..10 among a token's top log-probs: candidates whose text
    starts with `prefix` (what precedes the value in the chosen token) and then is k."""
    mass: dict[int, float] = {}
    for c in top or []:
        text, lp = c.get("token"), c.get("logprob")
        if text is None or lp is None or not math.isfinite(lp) or not text.startswith(prefix):
            continue
        rest = text[len(prefix):].strip()
        if rest.isdigit() and (rest == "0" or not rest.startswith("0")) and int(rest) <= 10:
            mass[int(rest)] = mass.get(int(rest), 0.0) + math.exp(lp)
    return mass


def expected_value(tokens: list[dict], j: int, prefix: str) -> float | None:
    """E[value] of the number whose first character is in answer token j, `prefix` the part
    of that token before it (see the module docstring); None when no number is among its
    top log-probs."""
    mass = _numbers(tokens[j]["top"], prefix)
    if not mass:
        return None
    if (tokens[j]["token"] or "")[len(prefix):].strip() == "1" and j + 1 < len(tokens) and 1 in mass:
        q = sum(math.exp(c["logprob"]) for c in tokens[j + 1]["top"] or []
                if c.get("token") is not None and c.get("logprob") is not None and c["token"].strip() == "0")
        one = mass.pop(1)
        mass[1], mass[10] = one * (1 - min(q, 1.0)), mass.get(10, 0.0) + one * min(q, 1.0)
    total = sum(mass.values())
    return sum(k * p for k, p in mass.items()) / total if total > 0 else None


def expected_values(tokens: list[dict], n: int) -> dict[int, float]:
    """Token index (1..n) → expected value, for the `index: value` lines found in the text of
    the answer tokens whose value's token carries a number among its top log-probs."""
    starts, at = [], 0
    for t in tokens:
        starts.append(at)
        at += len(t["token"] or "")
    text = "".join(t["token"] or "" for t in tokens)
    out: dict[int, float] = {}
    j = 0
    for m in prompts.SIMULATION_LINE.finditer(text):
        i, c = int(m.group(1)), m.start(2)
        while j + 1 < len(tokens) and starts[j + 1] <= c:
            j += 1
        if 1 <= i <= n and i not in out:
            ev = expected_value(tokens, j, text[starts[j]:c])
            if ev is not None:
                out[i] = ev
    return out


def parse(row: dict, attempt: int):
    """A simulation answer → ([predicted activation of each token], None) — the expected
    values where the answer has token log-probs, the written integers elsewhere — or
    (None, problem)."""
    n = len(row["acts"])
    ints, problem = prompts.parse_simulation(row["answer"], n)
    if ints is None:
        return None, problem
    ev = expected_values(row.get("token_logprobs") or [], n)
    return [ev.get(i + 1, float(v)) for i, v in enumerate(ints)], None


def retry(row: dict, problem: str, attempt: int) -> list:
    return list(row["messages"]) + [{"role": "assistant", "content": row["answer"] or ""},
                                    {"role": "user", "content": prompts.SIMULATION_RETRY_TEMPLATE.format(problem=problem, n=len(row["acts"]))}]


# ---- the score of one (feature, method) ----------------------------------------------------

def _correlation(rs: list[dict]) -> float:
    truth = [a for r in rs for a in r["acts"]]
    pred = [p for r in rs for p in r["pred"]]
    return simulation_correlation(truth, pred) if truth else math.nan


def score_row(rs: list[dict]) -> dict:
    """SCORES fields of one (feature, method)'s simulation rows (`acts`: true activations,
    `pred`: predictions or None when failed, `truth`: [1] positive / [0] negative): the
    correlation over the answered excerpts' tokens, and on each half of the excerpts
    (metrics.split_halves, in the order shown); failed excerpts count in n_failed."""
    rs = sorted(rs, key=lambda r: int(r["request_id"].rsplit("|", 1)[1]))
    ok = [r for r in rs if r["pred"] is not None]
    half = split_halves([r["truth"][0] for r in rs]) if rs else []
    halves = [_correlation([r for r, h in zip(rs, half) if h == k and r["pred"] is not None]) for k in (0, 1)]
    none = lambda v: None if v is None or math.isnan(v) else v  # noqa: E731
    return {"n_shown": len(rs), "n_failed": len(rs) - len(ok), "correlation": none(_correlation(ok)),
            "score_half_a": none(halves[0]), "score_half_b": none(halves[1]), "prompt_version": prompts.SIMULATION_VERSION}
