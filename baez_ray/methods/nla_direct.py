"""`nla_direct` (SPEC §2): the AV reads the feature's own SAE decoder row; its explanation
is the label, or, with `label.av.nla_direct_shorten`, the explainer condenses it into one.

    feature keys ─DecoderRows actor (W_dec[feature])─▶ AV actor pool ─▶ explanation
      ─▶ label = explanation            (default)
      └▶ explainer prompt ─llm.rounds─▶ label   (nla_direct_shorten)

Every row keeps the AV's text (`evidence`, one item) and the prompt version
`nla_direct/v1+av:<sidecar name>`; a feature whose decoder row or explanation failed gets
its row with the error.
"""

from __future__ import annotations

import pyarrow as pa

from baez_ray import schema
from baez_ray.av.sidecar import load_sidecar
from baez_ray.av.worker import verbalize_vectors
from baez_ray.config import AVRunConfig, SAEConfig
from baez_ray.llm import prompts
from baez_ray.llm.rounds import label_rounds, rows_table
from baez_ray.methods.av_explanations import as_layers, other_layer
from baez_ray.methods.registry import LabelContext, register
from baez_ray.ray_pool import actor_map, gather


class DecoderRows:
    """Ray Data actor: feature keys in; `vector` (the decoder row W_dec[feature] of the
    feature's SAE, which the AV then reads) and `decoder_error` added (a feature of an SAE
    at another layer than the AV's extraction layer gets an error). Loads each SAE of the
    job once, when a feature of it first comes, and keeps only its W_dec."""

    def __init__(self, saes: list[dict], av_layer: int):
        self.cfgs = {s["id"]: SAEConfig(**s) for s in saes}
        self.w_dec: dict[str, object] = {}
        self.av_layer = av_layer

    def _decoder(self, sae_id: str):
        import torch

        from baez_ray.models.sae import load_sae

        if sae_id not in self.w_dec:
            with torch.no_grad():
                model = load_sae(self.cfgs[sae_id], "cpu")
                self.w_dec[sae_id] = model.W_dec.detach().float().cpu().numpy()  # [d_sae, d_in]
            del model
        return self.w_dec[sae_id]

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors, errors = [], []
        for s, f in zip(batch.column("sae_id").to_pylist(), batch.column("feature").to_pylist()):
            w_dec = self._decoder(s) if s in self.cfgs and self.cfgs[s].layer == self.av_layer else None
            if s not in self.cfgs:
                vectors.append(None)
                errors.append(f"feature of SAE {s!r}, but the job's SAEs are {sorted(self.cfgs)}")
            elif w_dec is None:
                vectors.append(None)
                errors.append(other_layer(self.cfgs[s].layer, self.av_layer))
            elif not 0 <= f < len(w_dec):
                vectors.append(None)
                errors.append(f"feature {f} is not in the SAE (it has {len(w_dec)} features)")
            else:
                vectors.append(w_dec[f])
                errors.append(None)
        col = pa.array([v.tolist() if v is not None else None for v in vectors], pa.list_(pa.float32()))
        return batch.append_column("vector", col).append_column("decoder_error", pa.array(errors, pa.string()))


def _rows(expl: pa.Table, shorten: bool, engine: str, av_model: str, version: str, max_tokens: int) -> tuple[list[dict], list[dict]]:
    """(finished LABELS rows, explainer prompt rows) from the AV's explanations."""
    base = {"method": "nla_direct", "prompt_version": version, "n_examples": 0, "input_tokens": 0, "output_tokens": 0,
            "cost_usd": 0.0, "tries": 0}
    out, prompt_rows = [], []
    for r in expl.to_pylist() if expl.num_rows else []:
        key = {"sae_id": r["sae_id"], "layer": r["layer"], "feature": r["feature"]}
        text = r["explanation"]
        if r["decoder_error"]:
            out.append({**base, **key, "label": None, "error": r["decoder_error"]})
        elif r["av_error"] or not text:
            out.append({**base, **key, "label": None, "backend": f"av:{engine}", "model": av_model, "tries": 1,
                        "error": r["av_error"] or "the AV wrote no explanation", "raw": text, "evidence": [text] if text else None})
        elif not shorten:
            out.append({**base, **key, "label": text, "backend": f"av:{engine}", "model": av_model, "tries": 1, "error": None,
                        "raw": text, "evidence": [text]})
        else:
            prompt_rows.append({"request_id": f"{r['sae_id']}|{r['feature']}|nla_direct", "messages": prompts.nla_direct_messages(text),
                                "max_tokens": max_tokens, "temperature": 0.0, "stop": None, "constraint": None, **key,
                                "n_examples": 0, "evidence": [text]})
    return out, prompt_rows


def label_nla_direct(features, sidecar_path: str, saes: list[SAEConfig], llm=None, shorten: bool | None = None,
                     max_retries: int = 2, av: AVRunConfig = AVRunConfig(), max_tokens: int | None = None) -> pa.Table:
    """`nla_direct` of every feature of `features` (a Ray Dataset with sae_id, layer,
    feature); `shorten` defaults to `av.nla_direct_shorten`; the explainer's answers are
    at most `max_tokens` tokens (None: `llm.max_tokens`, else 200)."""
    import ray

    sc = load_sidecar(sidecar_path)
    shorten = av.nla_direct_shorten if shorten is None else shorten
    if shorten and llm is None:
        raise ValueError("nla_direct with shorten needs an explainer LLM")
    version = f"{prompts.NLA_DIRECT_VERSION}+av:{sc.name}"
    max_tokens = max_tokens or (llm.max_tokens if llm is not None else None) or 200
    keys = features.select_columns(["sae_id", "layer", "feature"])
    rows = actor_map(keys, DecoderRows, {"saes": [s.model_dump() for s in saes], "av_layer": sc.extraction_layer}, num_cpus=0.5, batch_size=max(64, av.batch_size))
    # one pass: rows without a decoder row reach the AV actor too, which skips them
    expl = gather(verbalize_vectors(rows, sidecar_path, av).drop_columns(["vector"]))
    out, prompt_rows = _rows(expl, shorten, av.engine, sc.av_model, version, max_tokens)
    parts = [schema.conform(pa.Table.from_pylist([{f: r.get(f) for f in schema.LABELS.names} for r in out]), schema.LABELS)] if out else []
    if prompt_rows:
        pending = ray.data.from_arrow(rows_table(prompt_rows, pa.schema([pa.field("layer", pa.int32())])))
        parts.append(label_rounds(pending, "nla_direct", prompts.ELEUTHER_MARKER, version, llm, max_retries))
    return pa.concat_tables(parts) if parts else schema.empty(schema.LABELS)


@register("nla_direct", tiers=(3,), needs=("av_sidecar", "sae"))
def nla_direct(features, ctx: LabelContext) -> pa.Table:
    """The AV of the feature's layer reads its SAE decoder row; the explanation is the label
    (one AV call per feature; a feature at a layer no AV reads gets its row with the reason)."""
    by_layer = dict(ctx.av_sidecars) if ctx.av_sidecars else as_layers(ctx.av_sidecar)
    if len(by_layer) == 1:
        (path,) = by_layer.values()
        return label_nla_direct(features, path, list(ctx.saes), ctx.explainer, max_retries=ctx.max_retries, av=ctx.av)
    parts = [label_nla_direct(features.filter(lambda r, layer=layer: r["layer"] == layer), path, list(ctx.saes), ctx.explainer,
                              max_retries=ctx.max_retries, av=ctx.av) for layer, path in by_layer.items()]
    rest = gather(features.select_columns(["sae_id", "layer", "feature"]).filter(lambda r: r["layer"] not in by_layer))
    if rest.num_rows:
        n = rest.num_rows
        parts.append(schema.conform(pa.table({
            "sae_id": rest.column("sae_id"), "layer": rest.column("layer"), "feature": rest.column("feature"),
            "method": pa.array(["nla_direct"] * n), "n_examples": pa.array([0] * n, pa.int32()), "input_tokens": pa.array([0] * n),
            "output_tokens": pa.array([0] * n), "cost_usd": pa.array([0.0] * n), "tries": pa.array([0] * n, pa.int32()),
            "error": pa.array([other_layer(x, list(by_layer)) for x in rest.column("layer").to_pylist()])}), schema.LABELS))
    return pa.concat_tables([schema.conform(p, schema.LABELS) for p in parts])
