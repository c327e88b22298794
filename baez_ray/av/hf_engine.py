"""The AV's transformers engine: `generate(inputs_embeds=...)` on CPU or GPU; the only
engine for a self-verbalizer that injects into the residual stream (`inject_layer > 0`).

    vectors [N, d] ─PromptEmbeddings─▶ [N, T, d] ─Generation─▶ token ids ─▶ explanations

What a call does not redo (`Generation`): the prompt's rows before the marker are the
same for every vector (the vector enters at the marker row, or at the marker position of
a deeper layer, and attention is causal), so their KV cache is computed once and copied
into each call (`cache: prefix`, the default); the stop-string criterion (which walks the
whole vocabulary) is built once, not per call. The first generated token is never one
whose text begins with the stop string (an AV that would stop at once writes something). `cache: static` hands the batch to HF's
static KV cache instead (which `generate` compiles on CUDA); `cache: dynamic` is the plain
`generate` call, the reference the others are tested and benchmarked against (greedy: the
same tokens).
"""

from __future__ import annotations

import copy
import inspect
from typing import Literal

import numpy as np
import torch

from baez_ray.av.prompt import PromptEmbeddings, parse_explanation, prompt_ids
from baez_ray.av.sidecar import Sidecar

CacheMode = Literal["prefix", "static", "dynamic"]
CACHE_MODES = ("prefix", "static", "dynamic")


class Generation:
    """The generate call of the transformers engine for one prompt (`PromptEmbeddings`):
    vectors in, generated token ids out (`[N, new]`, padded with `pad_id`)."""

    def __init__(self, model, prompt: PromptEmbeddings, sc: Sidecar, pad_id: int, stopping=None,
                 cache: CacheMode = "prefix", layers=None, stop_led: list[int] | None = None):
        if cache not in CACHE_MODES:
            raise ValueError(f"unknown AV cache mode {cache!r} (known: {', '.join(CACHE_MODES)})")
        self.model, self.prompt, self.sc, self.pad_id = model, prompt, sc, pad_id
        self.stopping, self.cache, self.layers = stopping, cache, layers
        self.stop_led = stop_led or None  # token ids banned at the first generated position
        # the cache's keyword: `cache` in newer transformers, `past_key_values` before
        self.cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        self._prefix = self._prefix_rows = None

    def prefix_cache(self, n: int):
        """The KV cache of the prompt rows before the marker, for a batch of n: computed
        once (batch 1), copied and repeated per call."""
        if self._prefix is None:
            rows = self.prompt.rows[: self.prompt.pos].unsqueeze(0).to(self.model.device)
            keep = None
            if self.layers is not None:  # the prefix's residual rows where the vector goes in ("auto" scales by them)

                def keep_rows(module, args, output):
                    self._prefix_rows = (output[0] if isinstance(output, tuple) else output)[0].detach().clone()

                keep = self.layers[self.sc.inject_layer - 1].register_forward_hook(keep_rows)
            try:
                out = self.model(inputs_embeds=rows, use_cache=True, logits_to_keep=1)
            finally:
                if keep is not None:
                    keep.remove()
            self._prefix = getattr(out, self.cache_kw)
        cache = copy.deepcopy(self._prefix)
        cache.batch_repeat_interleave(n)
        return cache

    def _inject_hook(self, v: torch.Tensor, start: int):
        """A forward hook that writes the vectors at the marker position of the prompt pass
        (the first forward of a call; it starts at position `start`)."""
        pos, scaled, state = self.prompt.pos - start, self.prompt.scaled, {"done": False}

        def replace(module, args, output):
            if not state["done"]:
                h = output[0] if isinstance(output, tuple) else output
                rows = torch.cat([self._prefix_rows.to(h.dtype), h[0]]) if start else h[0]  # the whole prompt's rows
                h[:, pos] = scaled(v, rows).to(h.dtype)
                state["done"] = True
            return output

        return self.layers[self.sc.inject_layer - 1].register_forward_hook(replace)

    def sampling(self, temperature: float) -> dict:
        # explicit, so that the checkpoint's generation_config (Gemma: top_k 64, top_p 0.95)
        # does not apply here and not in vLLM: both engines sample the same distribution
        return {"do_sample": temperature > 0, "temperature": temperature if temperature > 0 else None,
                "top_p": self.sc.top_p if temperature > 0 else None, "top_k": self.sc.top_k if temperature > 0 else None}

    def run(self, v: torch.Tensor, seed: int, temperature: float, max_new_tokens: int, min_new_tokens: int | None = None,
            cache: CacheMode | None = None) -> torch.Tensor:
        """Generated token ids `[N, new]` for the vectors `v` `[N, d]` (on the model's device)."""
        mode = cache or self.cache
        embeds = self.prompt.embeds(v)
        kwargs = self.sampling(temperature)
        start = 0
        if mode == "prefix" and self.prompt.pos > 0:
            kwargs[self.cache_kw], start = self.prefix_cache(len(v)), self.prompt.pos
        elif mode == "static":
            kwargs["cache_implementation"] = "static"
        hook = self._inject_hook(v, start) if self.sc.inject_layer > 0 else None
        torch.manual_seed(seed)
        try:
            return self.model.generate(
                inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
                max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stopping_criteria=self.stopping,
                pad_token_id=self.pad_id, begin_suppress_tokens=self.stop_led, **kwargs)
        finally:
            if hook is not None:
                hook.remove()


def stop_led_ids(tok, stop: str) -> list[int]:
    """The vocabulary's tokens whose text begins with `stop`: generated first, they would
    end the explanation before it starts (the demo's self-verbalizer stops at a newline
    and, on some vectors, would write one first)."""
    if not stop:
        return []
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    return [i for i, p in enumerate(pieces) if p is not None and tok.convert_tokens_to_string([p]).startswith(stop)]


class Verbalizer:
    """Transformers engine: builds the prompt embeddings and generates from them."""

    engine = "transformers"

    def __init__(self, sidecar: Sidecar, device: str = "cpu", source: str = "<sidecar>", cache: CacheMode = "prefix"):
        if cache not in CACHE_MODES:
            raise ValueError(f"{source}: unknown AV cache mode {cache!r} (known: {', '.join(CACHE_MODES)})")
        from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteriaList, StopStringCriteria

        from baez_ray.models.lm import DTYPES, decoder_layers, resolve_model_path

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
        # stop generation at the stop string when the vocabulary can spell it; the text is
        # cut at it afterwards in any case
        stop_ids = self.tok(sidecar.stop, add_special_tokens=False)["input_ids"]
        stopping = (StoppingCriteriaList([StopStringCriteria(self.tok, [sidecar.stop])])
                    if stop_ids and self.tok.unk_token_id not in stop_ids else None)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        layers = decoder_layers(self.model) if sidecar.inject_layer > 0 else None
        self.gen = Generation(self.model, self.prompt, sidecar, self.pad_id, stopping, cache, layers,
                              stop_led=stop_led_ids(self.tok, sidecar.stop))
        self.generated_tokens = 0  # over every call: the bench's tokens/s

    def prompt_ids(self) -> list[int]:
        return prompt_ids(self.sc, self.tok, self.source)

    def embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        """[N, d] vectors → [N, T, d] prompt embeddings with each vector at the marker row."""
        return self.prompt.embeds(vectors)

    def scaled(self, vectors: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.prompt.scaled(vectors, rows)

    @torch.inference_mode()
    def explain(self, vectors: np.ndarray | torch.Tensor, seed: int = 0, temperature: float | None = None,
                max_new_tokens: int | None = None, cache: CacheMode | None = None) -> list[str]:
        """One explanation per vector (the text inside the explanation tags), of at most
        `max_new_tokens` tokens (None: the sidecar's); `cache` overrides the engine's mode
        for this call."""
        v = torch.as_tensor(np.asarray(vectors), dtype=torch.float32, device=self.device)
        self.prompt.check(v, self.source)
        temp = self.sc.temperature if temperature is None else temperature
        out = self.gen.run(v, seed, temp, max_new_tokens or self.sc.max_new_tokens, cache=cache)
        self.generated_tokens += int((out != self.pad_id).sum())
        texts = self.tok.batch_decode(out, skip_special_tokens=True)
        return [parse_explanation(t, self.sc.open_tag, self.sc.stop) for t in texts]
