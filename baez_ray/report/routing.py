"""Routing report pieces (SPEC §4): tier shares overall and per SAE/layer, histograms of
the three correlation scores, and the LLM tokens saved against labelling every feature
with the tier-2 method.

A feature that never fired (no example: `n_examples` = 0) has no score and is routed to
tier 3; here it is its own class, "never fired": counted apart, left out of the tier and
kind shares and out of the tokens saved (no method would label it).

All functions take the routes table (schema.ROUTES; `read_routes` reads the columns they
use) as a pyarrow Table or a pandas DataFrame (converted), and count with pyarrow
aggregates: the summaries are small frames, never a Python object per feature.

Token estimate for the tier-2 method (`eleuther_acts_topK`), per feature:

    input_tokens  ≈ (fixed_chars + K · (len("Example i: ") + example_chars)) / 4
    output_tokens ≈ answer_tokens

fixed_chars = the characters of the system prompt and the few-shot turns
(baez_ray.llm.prompts.ELEUTHER_SYSTEM + ELEUTHER_FEWSHOT; about 2,000), example_chars = the
characters of one example line with its << >> marks (a 32-token window ≈ 150 characters),
and 4 characters per token (the usual rule for English with BPE tokenizers). With K = 20
that is ≈ 1,300 input tokens. The saving is

    saved = N·T − (n₂·T + n₁·T₁ + n₃·T₃)

with T = tokens per feature of the tier-2 method, n₁, n₂, n₃ the features per tier, T₁
the LLM tokens of the tier-1 method (0 for token_freq; a small local LLM costs no API
tokens either) and T₃ those spent on tier-3 features (0: they go to a human; set it to the
cost of a `baez` draft when an AV is configured).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from baez_ray.report.html import pyplot, save_figure, section
from baez_ray.report.layers import KINDS, as_table, score_values, write_layers_section

SCORES = (("c_in", "C_in (input window)", "tau_in"), ("c_out", "C_out (output window)", "tau_out"), ("c_cross", "C_cross (cross window)", "tau_cross"))
CHARS_PER_TOKEN = 4.0
DEFAULT_FIXED_CHARS = 2000
DEFAULT_EXAMPLE_CHARS = 150
DEFAULT_ANSWER_TOKENS = 60
ROUTE_COLUMNS = ["sae_id", "layer", "n_examples", "c_in", "c_out", "c_cross", "tier", "kind"]


def read_routes(path: str | Path) -> pa.Table:
    """The routes table's columns that the report reads (every one but `feature`)."""
    return pq.read_table(path, columns=ROUTE_COLUMNS)


# ------------------------------------------------------------------ tier shares
def by_depth(keys: list[str], key) -> tuple:
    """Sort key of a group: by layer first (shallow to deep) when `keys` has one."""
    key = key if isinstance(key, tuple) else (key,)
    return tuple(sorted(zip(keys, key), key=lambda kv: kv[0] != "layer"))


def tier_shares(routes, by: Sequence[str] | None = ("sae_id", "layer")):
    """Share of features per tier and per kind among those that fired: one row per group of
    `by` (None: one row, all features). Columns: the group keys, n (features that fired),
    never_fired (a count), tier1, tier2, tier3, input, output, cross, obscure (shares of n,
    in [0, 1])."""
    import pandas as pd

    t = as_table(routes)
    keys = list(by) if by else []
    counted = pa.table({**{k: t.column(k) for k in keys}, "fired": pc.greater(t.column("n_examples"), 0),
                        "tier": t.column("tier"), "kind": t.column("kind")})
    # a row per (group, fired, tier, kind) with its count: the shares are read off these few rows
    agg = counted.group_by(keys + ["fired", "tier", "kind"]).aggregate([([], "count_all")]).to_pandas()
    groups = sorted(agg.groupby(keys), key=lambda kg: by_depth(keys, kg[0])) if keys else [((), agg)]
    rows = []
    for key, g in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key))
        row["never_fired"] = int(g.loc[~g["fired"], "count_all"].sum())
        g = g[g["fired"]]
        n = row["n"] = int(g["count_all"].sum())
        for tier in (1, 2, 3):
            row[f"tier{tier}"] = float(g.loc[g["tier"] == tier, "count_all"].sum() / n) if n else math.nan
        for k in KINDS:
            row[k] = float(g.loc[g["kind"] == k, "count_all"].sum() / n) if n else math.nan
        rows.append(row)
    return pd.DataFrame(rows, columns=keys + ["n", "never_fired", "tier1", "tier2", "tier3", *KINDS])


# ------------------------------------------------------------------ plots
def _group_label(key) -> str:
    key = key if isinstance(key, tuple) else (key,)
    return " L".join(str(k) for k in key)


def score_histograms(routes, path: str | Path, taus: dict[str, float] | None = None, by: Sequence[str] = ("sae_id", "layer"), max_groups: int = 8) -> Path:
    """PNG: one panel per score (C_in, C_out, C_cross), a step histogram per SAE/layer
    (when there are several, up to `max_groups`; else all features), thresholds dashed.
    C_cross only exists for the features that failed both tier-1 tests."""
    plt = pyplot()
    t = as_table(routes)
    taus = taus or {}
    keys = list(by) if by else []
    distinct = [tuple(r[k] for k in keys) for r in t.group_by(keys).aggregate([]).to_pylist()] if keys else []
    groups = [("all", None)]
    if 1 < len(distinct) <= max_groups:
        groups = [(key, _where(t, keys, key)) for key in sorted(distinct, key=lambda k: by_depth(keys, k))]
    bins = np.linspace(-0.2, 1.0, 49)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.4), sharey=False)
    for ax, (col, title, tau_key) in zip(axes, SCORES):
        for key, mask in groups:
            vals = score_values(t, col, mask)
            if len(vals):
                ax.hist(np.clip(vals, bins[0], bins[-1]), bins=bins, histtype="step", linewidth=1.4, label=f"{_group_label(key)} (n={len(vals)})")
        if tau_key in taus:
            ax.axvline(taus[tau_key], color="k", linestyle="--", linewidth=1, label=f"τ = {taus[tau_key]:g}")
        ax.set_title(title)
        ax.set_xlabel("mean pairwise cosine")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("features")
    return save_figure(fig, path)


def _where(t: pa.Table, keys: list[str], key: tuple):
    """The mask of the rows of group `key` (values of `keys`)."""
    mask = pc.equal(t.column(keys[0]), key[0])
    for k, v in zip(keys[1:], key[1:]):
        mask = pc.and_(mask, pc.equal(t.column(k), v))
    return mask


def tier_share_plot(routes, path: str | Path, by: Sequence[str] = ("sae_id", "layer")) -> Path:
    """PNG: stacked bars of the kinds (input, output, cross, obscure) per SAE/layer, in
    layer order, to read the early/middle/late hypothesis off."""
    plt = pyplot()
    shares = tier_shares(routes, by)
    labels = [_group_label(tuple(r[k] for k in by)) for _, r in shares.iterrows()] if by else ["all"]
    colors = {"input": "#4c72b0", "output": "#55a868", "cross": "#dd8452", "obscure": "#8c8c8c"}
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 2), 3.6))
    bottom = np.zeros(len(shares))
    for k in KINDS:
        vals = shares[k].to_numpy(dtype=float)
        ax.bar(range(len(shares)), vals, bottom=bottom, color=colors[k], label=k)
        bottom += vals
    ax.set_xticks(range(len(shares)), labels, rotation=45 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center", fontsize=8)
    ax.set_ylabel("share of features")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


# ------------------------------------------------------------------ tokens saved
def eleuther_tokens_per_feature(
    k: int = 20,
    example_chars: float = DEFAULT_EXAMPLE_CHARS,
    answer_tokens: float = DEFAULT_ANSWER_TOKENS,
    fixed_chars: float | None = None,
) -> dict[str, float]:
    """Estimated tokens of one eleuther_acts_topK request (formula in the module docstring)."""
    if fixed_chars is None:
        fixed_chars = _eleuther_fixed_chars()
    per_line = len("Example 10: ") + example_chars
    input_tokens = (fixed_chars + k * per_line) / CHARS_PER_TOKEN
    return {"input_tokens": input_tokens, "output_tokens": float(answer_tokens), "total": input_tokens + answer_tokens}


def _eleuther_fixed_chars() -> float:
    try:
        from baez_ray.llm import prompts

        msgs = prompts.eleuther_messages([])
        return float(sum(len(m["content"]) for m in msgs))
    except Exception:  # prompts module absent or changed: the documented typical size
        return float(DEFAULT_FIXED_CHARS)


def tokens_saved(
    routes,
    tokens_per_feature: float | dict[str, float],
    tier1_tokens_per_feature: float = 0.0,
    tier3_tokens_per_feature: float = 0.0,
    price: dict[str, float] | None = None,
) -> dict[str, float]:
    """LLM tokens (and, with `price` = {"input_per_mtok", "output_per_mtok"} in USD, cost)
    saved by routing against sending every feature that fired to the tier-2 method (those
    that never fired are counted in `never_fired`, nothing else).
    `tokens_per_feature`: a number (total tokens) or the dict of `eleuther_tokens_per_feature`."""
    t = as_table(routes)
    fired = pc.greater(t.column("n_examples"), 0)
    tiers = t.column("tier").filter(fired).to_numpy()
    n = len(tiers)
    never_fired = t.num_rows - n
    n1, n2, n3 = (int((tiers == k).sum()) for k in (1, 2, 3))
    if isinstance(tokens_per_feature, dict):
        t_in, t_out = float(tokens_per_feature["input_tokens"]), float(tokens_per_feature["output_tokens"])
    else:
        t_in, t_out = float(tokens_per_feature), 0.0
    t = t_in + t_out
    baseline = n * t
    routed = n2 * t + n1 * tier1_tokens_per_feature + n3 * tier3_tokens_per_feature
    out = {
        "features": n,
        "never_fired": never_fired,
        "tier1": n1,
        "tier2": n2,
        "tier3": n3,
        "tokens_per_feature": t,
        "baseline_tokens": baseline,
        "routed_tokens": routed,
        "saved_tokens": baseline - routed,
        "saved_share": (baseline - routed) / baseline if baseline else math.nan,
    }
    if price:
        per_tok = (t_in * price.get("input_per_mtok", 0.0) + t_out * price.get("output_per_mtok", 0.0)) / 1e6
        frac_saved = out["saved_share"] if baseline else 0.0
        out["baseline_usd"] = n * per_tok
        out["saved_usd"] = n * per_tok * frac_saved
    return out


# ------------------------------------------------------------------ all of it
def write_routing_report(routes, out_dir: str | Path, taus: dict[str, float] | None = None, tokens_per_feature: float | dict | None = None,
                         seed: int = 0, **saved_kwargs) -> dict[str, Any]:
    """Write scores.png, tiers.png and routing.json into out_dir, and the layers section
    (report/layers.py: layers.png, layers.json); return the summary with an HTML fragment
    (`html`) for report/index.html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = as_table(routes)
    overall = tier_shares(t, None).iloc[0].to_dict()
    per_layer = tier_shares(t, ("sae_id", "layer"))
    tokens = eleuther_tokens_per_feature() if tokens_per_feature is None else tokens_per_feature
    saved = tokens_saved(t, tokens, **saved_kwargs)
    score_histograms(t, out_dir / "scores.png", taus)
    tier_share_plot(t, out_dir / "tiers.png")
    summary = {
        "overall": {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v) for k, v in overall.items()},
        "per_layer": json.loads(per_layer.to_json(orient="records")),
        "tokens": saved,
        "taus": taus or {},
    }
    (out_dir / "routing.json").write_text(json.dumps(summary, indent=2))
    summary["html"] = section("routing", summary) + write_layers_section(t, out_dir, seed)["html"]
    return summary
