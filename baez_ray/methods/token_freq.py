"""token_freq: the tier-1 labeller without an LLM (SPEC §2, §4).

A tier-1 feature is one whose input or output windows look alike across its top examples,
so the tokens themselves are the label:

* input features: the top-activating token of each of the top-N examples;
* output features: the tokens of the output window (default t+1 … t+3), each distinct token
  counted once per example, plus the feature's top positive logits (`pos_tokens`) when the
  features table has them.

Tokens are normalised before counting: sentencepiece `▁` / byte-level `Ġ` markers become
spaces, then the token is stripped and lowercased; special tokens (`<bos>` ...) are not
counted; a token of whitespace only is shown as `\\n` (if it holds a newline) or `<space>`.

The label lists the most frequent tokens, most frequent first (ties: nearer the top token,
then higher summed activation, then alphabetical), separated by " / ": at most
`max_tokens`, leaving out tokens seen in fewer than max(`min_count`, `min_share`·N) of
the N examples (the first token is always kept). Input tokens are alternatives (one per
example), so the list also stops once it covers `coverage` of the examples; output tokens
co-occur, so a phrase shared after the top token comes out whole, in order:

    input: volcano / volcanoes
    output: statue / of / liberty; logits: statue / liberty / statues

The label stays short and plain because scorers (the embedding benchmark especially) read
it as text; the counts go into the labels row: `evidence` (tokens), `evidence_scores`
(their counts) and `raw` (JSON with the counts and the number of examples).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

from baez_ray import schema
from baez_ray.config import RouteConfig, RouteWindows
from baez_ray.methods.registry import LabelContext, register
from baez_ray.models.windows import TopExamples, token_text

METHOD = "token_freq"
PROMPT_VERSION = "none"


@dataclass(frozen=True)
class TokenFreqConfig:
    top_n: int = RouteConfig().top_n  # examples per feature: the job's route.top_n
    output_window: tuple[int, int] = RouteWindows().output  # the job's route.windows.output
    max_tokens: int = 3  # tokens in the label, per part
    coverage: float = 0.8  # input: stop adding tokens once they cover this share of the examples
    min_count: int = 2  # later tokens must be seen in at least this many examples
    min_share: float = 0.1  # ... and in at least this share of them
    max_logits: int = 3  # top positive logits shown for output features
    evidence_size: int = 10  # tokens kept with their counts in `evidence`


def normalise(tok: str | None) -> str:
    """A token → its counted form ("" for special tokens and empty strings)."""
    text = token_text(tok) if tok is not None else ""
    if not text:
        return ""
    norm = text.strip().lower()
    if norm:
        return norm
    return "\\n" if "\n" in text else "<space>"


class _Counter:
    """Examples per token, with the tie-break keys (mean distance to the top token, summed
    activation)."""

    def __init__(self):
        self.count: dict[str, int] = defaultdict(int)
        self.dist: dict[str, float] = defaultdict(float)
        self.act: dict[str, float] = defaultdict(float)

    def add(self, tokens_with_dist: Sequence[tuple[str, int]], act: float) -> None:
        seen: dict[str, int] = {}
        for tok, d in tokens_with_dist:
            norm = normalise(tok)
            if norm and norm not in seen:
                seen[norm] = d
        for norm, d in seen.items():
            self.count[norm] += 1
            self.dist[norm] += d
            self.act[norm] += act

    def ranked(self) -> list[tuple[str, int]]:
        key = lambda t: (-self.count[t], self.dist[t] / self.count[t], -self.act[t], t)  # noqa: E731
        return [(t, self.count[t]) for t in sorted(self.count, key=key)]


def pick(ranked: list[tuple[str, int]], n_examples: int, cfg: TokenFreqConfig, alternatives: bool = True) -> list[str]:
    """The label's tokens from a ranked (token, count) list (see the module docstring).
    `alternatives`: the tokens exclude each other (one top token per example), so stop
    once they cover `coverage` of the examples; output-window tokens co-occur (a phrase
    after the top token), so there only `max_tokens` and the minimum count apply."""
    out, covered = [], 0
    floor = max(cfg.min_count, cfg.min_share * n_examples)
    for tok, count in ranked:
        if out and (len(out) >= cfg.max_tokens or count < floor or (alternatives and covered >= cfg.coverage * n_examples)):
            break
        out.append(tok)
        covered += count
    return out


def top_logits(pos_tokens: Sequence[str] | None, pos_values: Sequence[float] | None, k: int) -> list[str]:
    """The k highest positive logits, normalised and without repeats."""
    if not pos_tokens:
        return []
    order = range(len(pos_tokens))
    if pos_values is not None and len(pos_values) == len(pos_tokens):
        order = sorted(order, key=lambda i: -(pos_values[i] if pos_values[i] is not None else -np.inf))
    out: list[str] = []
    for i in order:
        norm = normalise(pos_tokens[i])
        if norm and norm not in out:
            out.append(norm)
        if len(out) == k:
            break
    return out


def label_one(ex: TopExamples, f: int, kind: str, cfg: TokenFreqConfig, pos_tokens=None, pos_values=None) -> dict:
    """The token_freq label of feature f of `ex` as a dict: label, evidence, counts, raw."""
    counter = _Counter()
    rows = ex.rows_of(f)
    for e in rows:
        if kind == "input":
            start = ex.tok_offsets[e]
            t = int(ex.top_index[e])
            toks = [(ex.tokens[start + t], 0)] if 0 <= t < ex.tok_offsets[e + 1] - start else []
        else:
            a = max(cfg.output_window[0], -int(ex.top_index[e]))  # distance of the window's first token after clipping
            toks = [(tok, a + i) for i, tok in enumerate(ex.window_tokens(e, cfg.output_window))]
        counter.add(toks, float(ex.value[e]))
    ranked = counter.ranked()
    n = len(rows)
    chosen = pick(ranked, n, cfg, alternatives=kind == "input")
    logits = top_logits(pos_tokens, pos_values, cfg.max_logits) if kind == "output" else []
    label = f"{kind}: " + (" / ".join(chosen) if chosen else "(no tokens)")
    if logits:
        label += "; logits: " + " / ".join(logits)
    evidence = ranked[: cfg.evidence_size]
    raw = {"n_examples": n, "counts": dict(evidence), "logits": logits}
    return {
        "label": label,
        "evidence": [t for t, _ in evidence],
        "evidence_scores": [int(c) for _, c in evidence],
        "raw": json.dumps(raw, ensure_ascii=False),
        "n_examples": n,
        "error": None if chosen else "no countable tokens in the window",
    }


def label_batch(batch: pa.Table, cfg: TokenFreqConfig = TokenFreqConfig()) -> pa.Table:
    """Features rows (FEATURES columns) joined with their route (`kind`, and `tier` when
    present) → LABELS rows, one per feature. Features of kind cross/obscure are labelled
    as input features would be (token_freq is meant for tier 1; the caller filters)."""
    ex = TopExamples(batch, cfg.top_n)
    kinds = batch.column("kind").to_pylist()
    tiers = batch.column("tier").to_pylist() if "tier" in batch.column_names else [1] * batch.num_rows
    pos_t = batch.column("pos_tokens").to_pylist() if "pos_tokens" in batch.column_names else [None] * batch.num_rows
    pos_v = batch.column("pos_values").to_pylist() if "pos_values" in batch.column_names else [None] * batch.num_rows
    rows = []
    for f in range(batch.num_rows):
        kind = kinds[f] if kinds[f] in ("input", "output") else "input"
        one = label_one(ex, f, kind, cfg, pos_t[f], pos_v[f])
        rows.append(
            {
                "method": METHOD,
                "tier": tiers[f],
                "kind": kinds[f],
                "prompt_version": PROMPT_VERSION,
                "backend": None,
                "model": None,
                "input_tokens": 0,
                "output_tokens": 0,
                "cost_usd": 0.0,
                "tries": 1,
                **one,
            }
        )
    extra = pa.Table.from_pylist(rows) if rows else None
    cols = {n: batch.column(n) for n in ("sae_id", "layer", "feature")}
    out = pa.table({**cols, **({n: extra.column(n) for n in extra.column_names} if extra else {})})
    return schema.conform(out, schema.LABELS)


def token_freq_labels(features: pa.Table, routes: pa.Table, cfg: TokenFreqConfig = TokenFreqConfig(), tier: int | None = 1) -> pa.Table:
    """Label the features routed to `tier` (default 1; None: all routed features) with
    token_freq: features table + routes table → LABELS rows."""
    key = lambda t: zip(*(t.column(c).to_pylist() for c in ("sae_id", "layer", "feature")))  # noqa: E731
    route = {k: (tr, kd) for k, tr, kd in zip(key(routes), routes.column("tier").to_pylist(), routes.column("kind").to_pylist())}
    take, tiers, kinds = [], [], []
    for i, k in enumerate(key(features)):
        hit = route.get(k)
        if hit is not None and (tier is None or hit[0] == tier):
            take.append(i)
            tiers.append(hit[0])
            kinds.append(hit[1])
    if not take:
        return schema.empty(schema.LABELS)
    cols = [c for c in ("sae_id", "layer", "feature", "examples", "pos_tokens", "pos_values") if c in features.column_names]
    joined = features.select(cols).take(pa.array(take, pa.int64()))
    joined = joined.append_column("tier", pa.array(tiers, pa.int8())).append_column("kind", pa.array(kinds, pa.string()))
    return label_batch(joined, cfg)


def _label_features(batch: pa.Table, routes_dir: str, cfg: TokenFreqConfig) -> pa.Table:
    """A map_batches function: FEATURES rows → their token_freq LABELS rows, the kind of
    each feature read from the routes table (the rows of the batch's features only)."""
    import pyarrow.parquet as pq

    if not batch.num_rows:
        return schema.empty(schema.LABELS)
    feats = sorted(set(batch.column("feature").to_pylist()))
    routes = pq.read_table(routes_dir, columns=["sae_id", "layer", "feature", "tier", "kind"], filters=[("feature", "in", feats)])
    return token_freq_labels(batch, routes, cfg, tier=None)


@register("token_freq", tiers=(1,), description="No LLM: the most frequent tokens of the input (or output) window across the top examples")
def token_freq(features, ctx: LabelContext):
    """No LLM: the most frequent normalised tokens of the top examples' input or output window.

    Counts over the job's `route.top_n` examples and its output window; the kind
    (input/output) of each feature comes from the routes table. Returns
    the Ray Dataset of the LABELS rows (labelled in the workers; `methods.label` gathers)."""
    if ctx.routes_dir is None:
        raise ValueError("token_freq reads each feature's kind from the routes table: route the features first")
    cfg = TokenFreqConfig(top_n=ctx.route.top_n, output_window=tuple(ctx.route.windows.output))
    return features.map_batches(_label_features, batch_format="pyarrow", fn_kwargs={"routes_dir": str(ctx.routes_dir), "cfg": cfg})
