"""The base model steered along SAE decoder directions (the `intervention` benchmark).

    neutral prompts ─▶ base model ─ hook on block L: residual + scale · ‖r̄_L‖ · d_f ─▶ greedy continuations

For a feature f of an SAE reading the residual stream after block L, d_f is its decoder row
W_dec[f] made a unit vector. Steering adds `scale · r̄_L · d_f` to the output of block L at
every position (the prompt's tokens, pads included, and each generated token), where r̄_L
is the mean norm of the unsteered residual after block L over the neutral prompts' tokens
(BOS and pads left out; the BOS residual of Gemma models is ~7x the others'). One
number per layer, measured once when the model is loaded: `scale` is then a fraction of
a typical residual's length, comparable across layers and models.

Greedy decoding makes a prompt's unsteered continuation one fixed text, computed once per
actor and shared by every feature. `kl` measures how hard a feature was pushed: the mean
KL divergence KL(clean ‖ steered) of the next-token distributions over the prompts'
tokens (BOS and pads left out), the quantity Gur-Arieh et al. (2025) fix (0.25 and 0.5)
when they choose a steering strength per feature.
"""

from __future__ import annotations

import torch

from baez_ray.config import ModelConfig, SAEConfig


class Steerer:
    """A causal LM with a steering hook on the block of each SAE's layer: `continue_`
    generates greedy continuations of `prompts` (`new_tokens` each) steered along decoder
    rows; `unsteered` holds the prompts' own continuations."""

    def __init__(self, model: ModelConfig, saes: list[SAEConfig], prompts: list[str], new_tokens: int, device: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from baez_ray.models.lm import DTYPES, decoder_layers, pick_device, resolve_model_path
        from baez_ray.models.sae import load_sae

        self.device = device or pick_device(model.device)
        path = resolve_model_path(model.path)
        kw = {"gguf_file": model.gguf_file} if model.gguf_file else {}
        self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code, **kw)
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[model.dtype], trust_remote_code=model.trust_remote_code,
                                                          **kw).to(self.device).eval()
        self.dtype = next(self.model.parameters()).dtype
        self.decoders: dict[str, tuple[int, torch.Tensor]] = {}  # SAE id → (layer, W_dec)
        for c in saes:
            sae = load_sae(c, self.device)
            self.decoders[c.id] = (c.layer, sae.W_dec.detach().to(self.dtype))
            del sae
        blocks = decoder_layers(self.model)
        self._add: dict[int, torch.Tensor] = {}  # layer → [B, 1, d] added to the block's output
        self._seen: dict[int, torch.Tensor] = {}
        for layer in sorted({layer for layer, _ in self.decoders.values()}):
            blocks[layer].register_forward_hook(self._hook(layer))
        self.prompts, self.new_tokens = list(prompts), new_tokens
        self.enc = self.tok(self.prompts, return_tensors="pt", padding=True).to(self.device)
        self.norms, self.clean = self._measure()
        self.unsteered = self._generate({}, 1)

    def _hook(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self._seen[layer] = hidden
            add = self._add.get(layer)
            if add is None:
                return None
            hidden = hidden + add
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def _tokens(self) -> torch.Tensor:
        """[P, T] mask of the prompts' own tokens: not pads, not BOS."""
        ids, mask = self.enc["input_ids"], self.enc["attention_mask"].bool()
        return mask & (ids != self.tok.bos_token_id) if self.tok.bos_token_id is not None else mask

    @torch.inference_mode()
    def _measure(self) -> tuple[dict[int, float], torch.Tensor]:
        """The mean residual norm after each steered block over the prompts' tokens, and the
        clean next-token log-probs at every prompt position."""
        self._add, self._seen = {}, {}
        logits = self.model(**self.enc).logits.float().log_softmax(-1)
        keep = self._tokens()
        norms = {layer: float(h.float().norm(dim=-1)[keep].mean()) for layer, h in self._seen.items()}
        self._seen = {}
        return norms, logits

    def directions(self, sae_id: str, features: list[int], scale: float) -> tuple[int, torch.Tensor]:
        """(layer, [F, d] steering vectors: scale · r̄_layer · W_dec[f] / ‖W_dec[f]‖)."""
        layer, w = self.decoders[sae_id]
        rows = w[torch.as_tensor(features, dtype=torch.long, device=w.device)].float()
        unit = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return layer, (scale * self.norms[layer] * unit).to(self.dtype)

    @torch.inference_mode()
    def kl(self, layer: int, vectors: torch.Tensor) -> list[float]:
        """Per steering vector, the mean KL(clean ‖ steered) of the next-token distributions
        over the prompts' tokens."""
        keep = self._tokens()
        out = []
        for v in vectors:
            self._add = {layer: v.view(1, 1, -1)}
            try:
                steered = self.model(**self.enc).logits.float().log_softmax(-1)
            finally:
                self._add = {}
            kl = (self.clean.exp() * (self.clean - steered)).sum(-1)
            out.append(float(kl[keep].mean()))
        return out

    def continue_(self, layer: int, vectors: torch.Tensor) -> list[list[str]]:
        """For each steering vector ([F, d], at block `layer`), the greedy continuations of
        every prompt: one generate call for the F × prompts rows (feature-major)."""
        n = len(self.prompts)
        add = {layer: vectors.repeat_interleave(n, dim=0).view(len(vectors) * n, 1, -1)}
        texts = self._generate(add, len(vectors))
        return [texts[i * n : (i + 1) * n] for i in range(len(vectors))]

    @torch.inference_mode()
    def _generate(self, add: dict[int, torch.Tensor], copies: int) -> list[str]:
        """Greedy continuations of the prompts repeated `copies` times, with `add` ({layer:
        [B, 1, d]}) on the residual."""
        ids = self.enc["input_ids"].repeat(copies, 1)
        mask = self.enc["attention_mask"].repeat(copies, 1)
        self._add = add
        try:
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.new_tokens, do_sample=False,
                                      top_p=None, top_k=None, pad_token_id=self.tok.pad_token_id)
        finally:
            self._add = {}
        return self.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
