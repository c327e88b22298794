"""`baez` and `baez_last` (SPEC §2): an LLM reads the AV's explanations of a feature's top
examples instead of the examples themselves. `baez_kN` / `baez_last_kN` read N explanations
(the plain names: the job's `av_examples`, a benchmark's train examples); near-duplicate
examples are verbalized and shown once (`av.dedup_window`).

    features ─top examples' residual vectors (kept by collect, or the residuals table)─▶
      AV actor pool of the feature's layer (one AV per layer: `av_sidecars`) ─▶ explanations
      ─▶ one prompt per feature: each explanation (baez_last: its last paragraph) with the
         example's activation as an integer 1-10 (ceil(10·act/max_act))
      ─llm.rounds─▶ LABELS rows (evidence: the explanations shown, evidence_scores: 1-10)

A feature uses every example that has a vector and an explanation; one without any (its
examples refused by the residuals stage, e.g. a token string that maps to no id; its SAE
at a layer no AV reads; the AV failed) gets its row with the reason, never dropped.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from baez_ray import schema
from baez_ray.av.prompt import last_paragraph
from baez_ray.av.sidecar import load_sidecar
from baez_ray.av.worker import verbalize
from baez_ray.config import AVRunConfig
from baez_ray.llm import prompts
from baez_ray.llm.rounds import label_rounds, rows_table
from baez_ray.methods.registry import LabelContext, register
from baez_ray.ray_pool import gather

LABEL_ROW_TYPES = pa.schema([pa.field("layer", pa.int32())])


def other_layer(layer: int, av_layers) -> str:
    """Why a feature got no AV explanation: no AV reads its layer."""
    layers = sorted(av_layers) if isinstance(av_layers, (list, tuple, set, dict)) else [av_layers]
    if len(layers) == 1:
        return f"no AV explanation: the AV reads layer-{layers[0]} vectors, this feature's SAE is at layer {layer}"
    return f"no AV explanation: no AV reads layer {layer} (AVs for layers {', '.join(map(str, layers))})"


def as_layers(sidecars) -> dict[int, str]:
    """A sidecar path, or {layer: path}, as {layer: path} (a path at its extraction layer)."""
    if isinstance(sidecars, (str, Path)):
        return {load_sidecar(sidecars).extraction_layer: str(sidecars)}
    return {int(k): str(v) for k, v in dict(sidecars).items()}


def _prompt_rows(expl: pa.Table, method: str, last_only: bool, max_tokens: int) -> list[dict]:
    by_feature: dict[tuple, list[dict]] = {}
    for r in expl.to_pylist() if expl.num_rows else []:
        by_feature.setdefault((r["sae_id"], r["layer"], r["feature"]), []).append(r)
    rows = []
    for (sae_id, layer, feat), rs in sorted(by_feature.items()):
        rs = sorted((r for r in rs if r["explanation"]), key=lambda r: r["rank"])
        texts = [last_paragraph(r["explanation"]) if last_only else r["explanation"] for r in rs]
        scores = [int(r["score"]) for r in rs]
        if texts:
            rows.append({
                "request_id": f"{sae_id}|{feat}|{method}", "messages": prompts.baez_messages(texts, scores), "max_tokens": max_tokens,
                "temperature": 0.0, "stop": None, "constraint": None, "sae_id": sae_id, "layer": layer, "feature": feat,
                "n_examples": len(texts), "evidence": texts, "evidence_scores": scores,
            })
    return rows


def label_baez(features, sidecars, llm, last_only: bool = False, n_examples: int = 10, max_retries: int = 2,
               av: AVRunConfig = AVRunConfig(), max_tokens: int | None = None, residuals_dir: str | Path | None = None,
               method: str | None = None) -> pa.Table:
    """`baez` (`baez_last`: only the last paragraph of each explanation) of every feature
    of `features` (a Ray Dataset of FEATURES rows), through the AV of its layer (`sidecars`:
    a sidecar path, or {layer: path}); vectors the examples do not carry come from the
    residuals table `residuals_dir`. The explainer's answers are at most `max_tokens`
    tokens (None: `llm.max_tokens`, else 200); `method`: the name its rows carry (default
    baez / baez_last)."""
    import ray

    max_tokens = max_tokens or llm.max_tokens or 200
    method = method or ("baez_last" if last_only else "baez")
    by_layer = as_layers(sidecars)
    parts = [verbalize(features, path, n_examples, av, str(residuals_dir) if residuals_dir else None) for path in by_layer.values()]
    parts = [p for p in parts if p.num_rows]
    expl = pa.concat_tables(parts, promote_options="default") if parts else pa.table({})
    rows = _prompt_rows(expl, method, last_only, max_tokens)
    labels = (label_rounds(ray.data.from_arrow(rows_table(rows, LABEL_ROW_TYPES)), method, prompts.ELEUTHER_MARKER,
                           prompts.BAEZ_VERSION, llm, max_retries) if rows else schema.empty(schema.LABELS))
    missing = _missing_rows(features, expl, {(r["sae_id"], r["feature"]) for r in rows}, method, by_layer)
    if missing:
        labels = pa.concat_tables([labels, schema.conform(pa.Table.from_pylist(missing), schema.LABELS)])
    return labels


def _missing_rows(features, expl: pa.Table, have: set, method: str, by_layer: dict[int, str]) -> list[dict]:
    """LABELS rows of the features without a prompt: the reason each got no explanation."""
    errors: dict[tuple, str] = {}
    empty: dict[tuple, int] = {}
    for r in expl.to_pylist() if expl.num_rows else []:
        if r["av_error"] and (r["sae_id"], r["feature"]) not in errors:
            errors[(r["sae_id"], r["feature"])] = r["av_error"]
        elif not r["av_error"] and not r["explanation"]:
            empty[(r["sae_id"], r["feature"])] = empty.get((r["sae_id"], r["feature"]), 0) + 1

    def why(k: dict) -> str:
        if k["layer"] not in by_layer:
            return other_layer(k["layer"], list(by_layer))
        key = (k["sae_id"], k["feature"])
        if key in errors:
            return f"no AV explanation: {errors[key]}"
        if key in empty:
            return f"no AV explanation: the AV's text was empty for each of its {empty[key]} examples"
        return "no AV explanation: the feature has no top example"

    return [{"sae_id": k["sae_id"], "layer": k["layer"], "feature": k["feature"], "method": method, "label": None,
             "prompt_version": prompts.BAEZ_VERSION, "n_examples": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0,
             "tries": 0, "error": why(k)}
            for k in gather(features.select_columns(["sae_id", "layer", "feature"])).to_pylist() if (k["sae_id"], k["feature"]) not in have]


def _sidecars(ctx: LabelContext) -> dict[int, str]:
    return dict(ctx.av_sidecars) if ctx.av_sidecars else as_layers(ctx.av_sidecar)


@register("baez", tiers=(3,), needs=("explainer", "av_sidecar", "residuals"))
def baez(features, ctx: LabelContext) -> pa.Table:
    """The explainer reads the AV's explanations of the top examples, each with its activation 1-10."""
    return label_baez(features, _sidecars(ctx), ctx.explainer, False, ctx.n_examples, ctx.max_retries, ctx.av, residuals_dir=ctx.residuals_dir)


@register("baez_last", tiers=(3,), needs=("explainer", "av_sidecar", "residuals"))
def baez_last(features, ctx: LabelContext) -> pa.Table:
    """As baez, with only the last paragraph of each AV explanation (the one about the final token)."""
    return label_baez(features, _sidecars(ctx), ctx.explainer, True, ctx.n_examples, ctx.max_retries, ctx.av, residuals_dir=ctx.residuals_dir)


def explanations_of(ctx: LabelContext) -> int:
    """N of a `baez_kN` / `baez_last_kN` name; the context's `n_examples` for the plain names."""
    k = ctx.name.rsplit("_k", 1)[1] if "_k" in ctx.name else ""
    return int(k) if k.isdigit() else ctx.n_examples


@register(r"baez_k(\d+)", tiers=(3,), needs=("explainer", "av_sidecar", "residuals"), shown="baez_kN")
def baez_k(features, ctx: LabelContext) -> pa.Table:
    """As baez, from N explanations (baez_k3: the top 3 examples), whatever av_examples says."""
    return label_baez(features, _sidecars(ctx), ctx.explainer, False, explanations_of(ctx), ctx.max_retries, ctx.av,
                      residuals_dir=ctx.residuals_dir, method=ctx.name)


@register(r"baez_last_k(\d+)", tiers=(3,), needs=("explainer", "av_sidecar", "residuals"), shown="baez_last_kN")
def baez_last_k(features, ctx: LabelContext) -> pa.Table:
    """As baez_last, from N explanations."""
    return label_baez(features, _sidecars(ctx), ctx.explainer, True, explanations_of(ctx), ctx.max_retries, ctx.av,
                      residuals_dir=ctx.residuals_dir, method=ctx.name)
