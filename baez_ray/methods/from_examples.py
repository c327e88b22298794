"""An LLM reads a feature's top activation examples and names the feature.

    features ─map_batches(build prompts)─▶ prompt rows ─llm.rounds─▶ LABELS rows

* `eleuther_acts_topK` (tier 2): the top K examples, strongly active tokens in << >>,
  Delphi-style few-shot prompt; the answer's last line is `[EXPLANATION]: <label>`.
* `np_max_act` (tier 2) and `small_llm` (tier 1, `label.small_llm` or the explainer): the
  max-activating token of each of the top 10 examples in a ±24-token window; the answer
  ends `Explanation: <label>`.

The prompts of all features go to the backend together (one Ray Dataset); retry rounds
are `llm.rounds.label_rounds`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from baez_ray.llm import prompts
from baez_ray.llm.rounds import label_rounds, rows_table
from baez_ray.methods.registry import LabelContext, register

LABEL_ROW_TYPES = pa.schema([pa.field("layer", pa.int32())])


@dataclass(frozen=True)
class PromptStyle:
    build: Callable[[list[dict]], list[dict]]  # examples → chat messages
    marker: str
    version: str
    n_examples: int
    max_tokens: int


def prompt_style(name: str) -> PromptStyle:
    m = re.fullmatch(r"eleuther_acts_top(\d+)", name)
    if m:
        return PromptStyle(prompts.eleuther_messages, prompts.ELEUTHER_MARKER, prompts.ELEUTHER_VERSION, int(m.group(1)), 200)
    return PromptStyle(prompts.np_messages, prompts.NP_MARKER, prompts.NP_VERSION, 10, 40)


def prompt_rows(name: str, temperature: float = 0.0, max_tokens: int | None = None):
    """A map_batches function: FEATURES rows → one prompt row per feature (answers of at
    most `max_tokens`; None: the method's own)."""
    style = prompt_style(name)
    max_tokens = max_tokens or style.max_tokens

    def build(batch: pa.Table) -> pa.Table:
        rows = []
        for f in batch.select(["sae_id", "layer", "feature", "examples"]).to_pylist():
            examples = [e for e in f["examples"] if e["kind"] == "top"][: style.n_examples]
            rows.append({
                "request_id": f"{f['sae_id']}|{f['feature']}|{name}", "messages": style.build(examples),
                "max_tokens": max_tokens, "temperature": temperature, "stop": None, "constraint": None,
                "sae_id": f["sae_id"], "layer": f["layer"], "feature": f["feature"], "n_examples": len(examples),
            })
        return rows_table(rows, LABEL_ROW_TYPES)

    return build


def label_with_llm(features, name: str, llm, max_retries: int = 2, temperature: float = 0.0, dataset: bool = False,
                   lazy: bool = False):
    """Label every feature of `features` (a Ray Dataset of FEATURES rows) with the LLM
    method `name`; returns the LABELS table (with `dataset`: the Ray Dataset of its rows,
    which the label stage writes from the workers; `lazy`: unexecuted where the backend
    allows, llm.rounds.label_rounds). Answers are at most `llm.max_tokens` tokens (None:
    the method's own length)."""
    style = prompt_style(name)
    pending = features.map_batches(prompt_rows(name, temperature, llm.max_tokens), batch_format="pyarrow")
    return label_rounds(pending, name, style.marker, style.version, llm, max_retries, dataset=dataset, lazy=lazy)


@register(r"eleuther_acts_top(\d+)", tiers=(2,), needs=("explainer",), shown="eleuther_acts_topK")
def eleuther_acts(features, ctx: LabelContext) -> pa.Table:
    """Delphi-style: the explainer reads the top K examples with their active tokens marked << >>."""
    return label_with_llm(features, ctx.name, ctx.explainer, ctx.max_retries, dataset=True, lazy=ctx.stream)


@register("np_max_act", tiers=(2,), needs=("explainer",))
def np_max_act(features, ctx: LabelContext) -> pa.Table:
    """Neuronpedia-style: the max-activating token of each example with its ±24-token window; a 1-6 word label."""
    return label_with_llm(features, "np_max_act", ctx.explainer, ctx.max_retries, dataset=True, lazy=ctx.stream)


@register("small_llm", tiers=(1,), needs=("explainer",))
def small_llm(features, ctx: LabelContext) -> pa.Table:
    """A small local LLM (label.small_llm, else the explainer) with the np_max_act prompt: a cheap tier-1 label."""
    return label_with_llm(features, "small_llm", ctx.small_llm or ctx.explainer, ctx.max_retries, dataset=True, lazy=ctx.stream)
