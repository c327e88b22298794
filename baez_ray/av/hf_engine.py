"""The AV's transformers engine: `generate(inputs_embeds=...)` on CPU or GPU; the only
engine for a self-verbalizer that injects into the residual stream (`inject_layer > 0`)."""

from __future__ import annotations

import numpy as np
import torch

from baez_ray.av.prompt import PromptEmbeddings, parse_explanation, prompt_ids
from baez_ray.av.sidecar import Sidecar


class Verbalizer:
    """Transformers engine: builds the prompt embeddings and generates from them."""

    engine = "transformers"

    def __init__(self, sidecar: Sidecar, device: str = "cpu", source: str = "<sidecar>"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
