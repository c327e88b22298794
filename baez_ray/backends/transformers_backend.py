"""Local causal LM (transformers) in a Ray actor pool: chat template, left-padded batched
generation, greedy (temperature 0) or sampled; CPU or GPU."""

from __future__ import annotations

import math

import pyarrow as pa
import torch

from baez_ray.backends import cut_at_stop, with_answers
from baez_ray.config import LLMConfig


class TransformersChat:
    def __init__(self, cfg: dict):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from baez_ray.models.base import DTYPES, pick_device, resolve_model_path

        self.cfg = LLMConfig(**cfg)
        torch.set_num_threads(max(1, math.ceil(self.cfg.num_cpus)))
        path = resolve_model_path(self.cfg.model)
        self.device = pick_device(self.cfg.device)
        self.tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[self.cfg.dtype]).to(self.device).eval()
        # the chat template's end-of-turn token ends generation too
        self.eos = {t for t in (self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>"), self.tok.convert_tokens_to_ids("<end_of_turn>")) if isinstance(t, int) and t >= 0 and t != self.tok.unk_token_id}

    def prompt_text(self, messages: list[dict]) -> str:
        if messages and messages[-1]["role"] == "assistant":  # a prefill: continue that turn
            return self.tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def generate(self, texts: list[str], max_tokens: list[int], temperature: float) -> tuple[list[str], list[int], list[int]]:
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        kw = dict(do_sample=temperature > 0, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        out = self.model.generate(
            **enc, max_new_tokens=max(max_tokens), pad_token_id=self.tok.pad_token_id,
            eos_token_id=sorted(self.eos), top_p=None, top_k=None, **kw,
        )
        gen = out[:, enc["input_ids"].shape[1] :].tolist()
        answers, n_out = [], []
        for row, limit in zip(gen, max_tokens):
            row = row[:limit]
            cut = next((i for i, t in enumerate(row) if t in self.eos), None)
            kept = row if cut is None else row[: cut + 1]
            n_out.append(len(kept))
            answers.append(self.tok.decode(kept, skip_special_tokens=True))
        n_in = enc["attention_mask"].sum(1).tolist()
        return answers, n_in, n_out

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["messages", "max_tokens", "temperature", "stop"]).to_pylist()
        n = len(rows)
        answers: list[str | None] = [None] * n
        n_in, n_out, errors = [0] * n, [0] * n, [None] * n
        # one generate call per sampling temperature (a stage's prompts usually share one)
        groups: dict[float, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(round(float(r["temperature"]), 6), []).append(i)
        for temp, idx in groups.items():
            try:
                texts = [self.prompt_text(rows[i]["messages"]) for i in idx]
                a, ti, to = self.generate(texts, [int(rows[i]["max_tokens"]) for i in idx], temp)
            except Exception as e:  # recorded on the rows it touched, never dropped
                for i in idx:
                    errors[i] = f"{type(e).__name__}: {e}"
                continue
            for j, i in enumerate(idx):
                answers[i], n_in[i], n_out[i] = cut_at_stop(a[j], rows[i]["stop"]), ti[j], to[j]
        return with_answers(batch, answers, n_in, n_out, errors, self.cfg)


def generate(ds, cfg: LLMConfig):
    import ray

    return ds.map_batches(
        TransformersChat,
        fn_constructor_kwargs={"cfg": cfg.model_dump()},
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus or None,
    )
