"""The AV prompt, engine-independent: its token ids (marker and neighbours checked against
the tokenizer), its embeddings with the vector at the marker row, and the explanation
parsed out of the generated text."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from baez_ray.av.sidecar import Sidecar


def parse_explanation(text: str, open_tag: str = "<explanation>", stop: str = "</explanation>") -> str:
    """The text between the tags (the opening tag may sit in the prompt, the closing one
    may be cut by the stop string)."""
    if open_tag in text:
        text = text.split(open_tag, 1)[1]
    return text.split(stop, 1)[0].strip()


def last_paragraph(text: str) -> str:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return paras[-1] if paras else ""


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


def embedding_rows(path: str | Path, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the input-embedding matrix of a safetensors checkpoint, read without
    loading the model (the vLLM engine builds its prompt from these)."""
    from safetensors import safe_open

    from baez_ray.models.lm import EMBED_SUFFIXES, checkpoint_weight_map

    root = Path(path)
    weight_map = checkpoint_weight_map(root)
    if not weight_map:
        raise FileNotFoundError(f"{root}: no safetensors files (the vllm AV engine reads the embedding matrix from them)")
    keys = [k for k in weight_map if k.endswith(EMBED_SUFFIXES) and "vision" not in k]
    if len(keys) != 1:
        raise ValueError(f"{root}: expected one input-embedding tensor (a key ending in {' / '.join(EMBED_SUFFIXES)}), found {keys}")
    with safe_open(str(weight_map[keys[0]]), framework="pt") as h:
        sl = h.get_slice(keys[0])
        rows = torch.stack([sl[i] for i in ids]) if ids else torch.empty(0)
    return rows.to(dtype)
