"""One interface for every LLM: a Ray Dataset of prompt rows (schema.PROMPTS columns, plus
any others, passed through untouched) in; the same rows with schema.ANSWER_FIELDS out.

    from baez_ray.llm.backends import generate
    answers = generate(prompts_ds, llm_cfg)

Backends: `transformers` (local model in an actor pool, batched generation), `vllm` (Ray
Data LLM), `anthropic` (Messages API with retries, or the Message Batches API), `openai`
(any OpenAI-compatible chat endpoint). A request that fails after the backend's retries
gets `answer = null` and its `error`; the other rows are unaffected. A conversation that
ends with an assistant message is a prefill: the answer continues that message.

Log-prob rows: a row with `constraint = "logprob:A,B"` (e.g. `logprob:1,0`) asks for one
answer token and gets `p_yes` = P(A) / (P(A) + P(B)) for that first token, read from the
model's logits (transformers) or its top log-probs (vllm: `SamplingParams(logprobs=k)`;
openai: `logprobs`, `top_logprobs=k`, `max_tokens=1`), k = TOP_LOGPROBS. Its `answer` is
the text of the token the model put first. Where neither A nor B is among the top k,
`p_yes` is null (the caller counts the row as failed); where one of them is missing, its
probability is taken as the smallest listed one (an upper bound). Backends without
log-probs (anthropic) answer such a row with an error. Every other row has `p_yes` null.

Token log-probs: a row with `top_logprobs = k` (k > 0) is generated as usual and also gets
`token_logprobs`: for every token of its answer, the token's text and log-prob and the k
most likely tokens at its place (text, log-prob), from the model's logits (transformers:
log-softmax of the raw logits of each generated step) or the server's log-probs (vllm:
`SamplingParams(logprobs=k)`, the entry of the sampled token included; openai: `logprobs`,
`top_logprobs=min(k, 20)`). The simulation benchmark reads its expected activations from
them. Backends without log-probs (anthropic) leave `token_logprobs` null and answer the
row as text, so that the caller falls back to the answer's own text.

Ask until parsed, in the backend: the API backends (openai; anthropic in messages mode:
`asks_in_backend`) take `generate(ds, cfg, until=Until(...))` and ask each row again, in
the actor that holds it, until `until.parse` reads its answer (at most `max_retries` more
tries, each with the conversation `until.retry_messages` builds): a retry waits for no
other row (llm.rounds sends the local engines' retries in rounds instead). Such a row
comes back with `value`, `problem`, `tries`, its last try's `messages`, and the tokens and
cost of all its tries (`ask_until`).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from dataclasses import dataclass
from importlib import import_module
from typing import Awaitable, Callable

import pyarrow as pa
from pydantic import SecretStr

from baez_ray import progress, schema
from baez_ray.config import LLMConfig

_MODULES = {
    "transformers": "baez_ray.llm.backends.transformers_backend",
    "vllm": "baez_ray.llm.backends.vllm_backend",
    "anthropic": "baez_ray.llm.backends.anthropic_backend",
    "openai": "baez_ray.llm.backends.openai_backend",
}


TOP_LOGPROBS = 20  # top log-probs asked of vllm and OpenAI-compatible servers (OpenAI's maximum)
_LOGPROB = re.compile(r"logprob:([^,]+),([^,]+)")


def logprob_targets(constraint: str | None) -> tuple[str, str] | None:
    """(A, B) of a `logprob:A,B` constraint; None for any other constraint."""
    m = _LOGPROB.fullmatch((constraint or "").strip())
    return (m.group(1), m.group(2)) if m else None


def p_from_top(top: dict[str, float], targets: tuple[str, str]) -> float | None:
    """P(A) / (P(A) + P(B)) from the top log-probs of the first answer token (`top`: token
    text → log-prob; tokens whose stripped text is A, or B, are summed). None when neither
    is listed; a missing one counts as the smallest listed probability."""
    mass = [0.0, 0.0]
    for tok, lp in top.items():
        for j, t in enumerate(targets):
            if tok is not None and tok.strip() == t and lp is not None and math.isfinite(lp):
                mass[j] += math.exp(lp)
    if mass == [0.0, 0.0]:
        return None
    floor = min(math.exp(lp) for lp in top.values() if lp is not None and math.isfinite(lp))
    a, b = (m if m > 0 else floor for m in mass)
    return a / (a + b)


def token_logprobs_of(row: dict) -> int:
    """The k of a row's `top_logprobs` (0: the row does not ask)."""
    k = row.get("top_logprobs")
    return int(k) if k else 0


def generate(ds, cfg: LLMConfig, until: "Until | None" = None):
    """Prompt rows → prompt rows with answers (a lazy Ray Dataset); with `until` (only where
    `asks_in_backend(cfg)`), each row asked until its answer parses."""
    if until is None:
        return import_module(_MODULES[cfg.backend]).generate(ds, cfg)
    if not asks_in_backend(cfg):
        raise ValueError(f"the {cfg.backend} backend does not retry unparsed answers itself (llm.rounds sends its retries in rounds)")
    return import_module(_MODULES[cfg.backend]).generate(ds, cfg, until=until)


def prestart(cfg: LLMConfig) -> bool:
    """Start, without waiting, the actors that `generate(…, cfg)` will use, where they are
    kept for the job (the API backends, inside `ray_pool.kept_pools()`): they start while
    the job reads and plans. False where nothing was started."""
    start = getattr(import_module(_MODULES[cfg.backend]), "prestart", None)
    return bool(start and start(cfg))


def asks_in_backend(cfg: LLMConfig) -> bool:
    """Whether `generate` takes `until` for this LLM: the API backends that answer row by
    row (openai; anthropic's Messages API, not its Message Batches)."""
    return cfg.backend == "openai" or (cfg.backend == "anthropic" and cfg.mode == "messages")


BATCHES_PER_ACTOR = 16  # the most batches one API actor holds at once


def batches_in_flight(cfg: LLMConfig) -> int:
    """Batches an API actor holds at once: enough rows queued behind its window of
    `max_concurrency` that a batch's return (and the wait for the next one) never empties
    it: twice the window, plus one batch."""
    return max(2, min(BATCHES_PER_ACTOR, math.ceil(2 * cfg.max_concurrency / cfg.batch_size) + 1))


# ---- ask until parsed, inside an API backend's actor ----------------------------------------

@dataclass(frozen=True)
class Until:
    """What an API backend needs to ask a row until its answer parses (built by llm.rounds).
    `parse(row, attempt) -> (value, problem)` reads a row with its answer fields (value None:
    unreadable, `problem` says why); `retry_messages(row, problem, attempt)` is the next
    try's conversation; `retryable(row)` (None: every row) whether a row is asked again."""

    parse: Callable[[dict, int], tuple]
    retry_messages: Callable[[dict, str, int], list]
    max_retries: int
    value_type: pa.DataType
    retryable: Callable[[dict], bool] | None = None


# request row -> (answer, input tokens, output tokens, error, p_yes[, token_logprobs])
AskOnce = Callable[[dict], Awaitable[tuple]]


async def ask_until(ask_once: AskOnce, row: dict, until: Until | None) -> dict:
    """One row's answer fields (answer, input_tokens, output_tokens, error, p_yes,
    token_logprobs: null where `ask_once` gives none); with `until`, asked again while it
    does not parse, with value, problem, tries, messages (the last try's) and the tokens of
    all its tries."""
    answer, n_in, n_out, err, p, *toks = await ask_once(row)
    out = {"answer": answer, "input_tokens": n_in, "output_tokens": n_out, "error": err, "p_yes": p,
           "token_logprobs": toks[0] if toks else None}
    if until is None:
        return out
    attempt = 0
    while True:
        seen = {**row, **out}
        value, problem = (None, err) if err else until.parse(seen, attempt)
        final = attempt == until.max_retries or (until.retryable is not None and not until.retryable(seen))
        if value is not None or err or final:
            return {**out, "value": value, "problem": problem, "tries": attempt + 1, "messages": row["messages"]}
        row = {**row, "messages": until.retry_messages(seen, problem, attempt)}
        attempt += 1
        answer, n_in, n_out, err, p, *toks = await ask_once(row)
        await asyncio.to_thread(progress.tick, 1)  # a try after the first: the driver's bar counts it too
        out = {"answer": answer, "input_tokens": out["input_tokens"] + n_in, "output_tokens": out["output_tokens"] + n_out,
               "error": err, "p_yes": p, "token_logprobs": toks[0] if toks else None}


def with_results(batch: pa.Table, results: list[dict], cfg: LLMConfig, until: Until | None) -> pa.Table:
    """A batch of prompt rows + the `ask_until` results of its rows (in row order)."""
    col = lambda k: [r[k] for r in results]  # noqa: E731
    out = with_answers(batch, col("answer"), col("input_tokens"), col("output_tokens"), col("error"), cfg, p_yes=col("p_yes"),
                       token_logprobs=col("token_logprobs"))
    if until is None:
        return out
    out = out.set_column(out.schema.get_field_index("messages"), "messages", pa.array(col("messages"), out.schema.field("messages").type))
    for name, values, typ in (("value", col("value"), until.value_type), ("problem", col("problem"), pa.string()),
                              ("tries", col("tries"), pa.int32())):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, pa.array(values, typ))
    return out


def cost(cfg: LLMConfig, input_tokens: int, output_tokens: int, batch: bool = False) -> float:
    usd = (input_tokens * cfg.price.input_per_mtok + output_tokens * cfg.price.output_per_mtok) / 1e6
    return usd * (cfg.price.batch_discount if batch else 1.0)


def with_answers(batch: pa.Table, answers: list[str | None], in_tok: list[int], out_tok: list[int],
                 errors: list[str | None], cfg: LLMConfig, batch_mode: bool = False,
                 p_yes: list[float | None] | None = None, token_logprobs: list[list[dict] | None] | None = None) -> pa.Table:
    """Append the ANSWER_FIELDS columns to a batch of prompt rows (`p_yes`: log-prob rows;
    `token_logprobs`: rows with `top_logprobs`, schema.TOKEN_LOGPROBS values)."""
    n = batch.num_rows
    cols = {
        "answer": pa.array(answers, pa.string()),
        "input_tokens": pa.array(in_tok, pa.int64()),
        "output_tokens": pa.array(out_tok, pa.int64()),
        "cost_usd": pa.array([cost(cfg, i, o, batch_mode) for i, o in zip(in_tok, out_tok)], pa.float64()),
        "error": pa.array(errors, pa.string()),
        "backend": pa.array([cfg.backend] * n, pa.string()),
        "model": pa.array([cfg.model] * n, pa.string()),
        "p_yes": pa.array(p_yes if p_yes is not None else [None] * n, pa.float64()),
        "token_logprobs": pa.array(token_logprobs if token_logprobs is not None else [None] * n, schema.TOKEN_LOGPROBS),
    }
    for f in schema.ANSWER_FIELDS:
        if f.name in batch.column_names:
            batch = batch.drop_columns([f.name])
        batch = batch.append_column(f, cols[f.name])
    progress.tick(n)  # the answered prompts, for the driver's bar
    return batch


def prompt_table(rows: list[dict]) -> pa.Table:
    """Prompt rows (dicts with the PROMPTS columns and any extra columns) as a table."""
    extra = {k for r in rows for k in r} - set(schema.PROMPTS.names)
    base = schema.conform(pa.Table.from_pylist([{k: r.get(k) for k in schema.PROMPTS.names} for r in rows]), schema.PROMPTS)
    for k in sorted(extra):
        base = base.append_column(k, pa.array([r.get(k) for r in rows]))
    return base


class MissingAPIKeyError(RuntimeError):
    pass


def read_api_key(cfg: LLMConfig, default_env: str, required: bool) -> SecretStr | None:
    """The API key from the environment (never from the job file); a clear error naming
    the variable when it is required and unset."""
    var = cfg.api_key_env or default_env
    key = os.environ.get(var, "").strip()
    if key:
        return SecretStr(key)
    if required:
        raise MissingAPIKeyError(f"the {cfg.backend} backend reads its API key from the environment variable {var}, which is unset or empty")
    return None


def scrub(text: str, key: SecretStr | None) -> str:
    secret = key.get_secret_value() if key is not None else ""
    return text.replace(secret, "[redacted]") if secret else text


def error_text(e: BaseException, key: SecretStr | None, limit: int = 1000) -> str:
    """'Type: message' for a row's `error` column, without the key, truncated."""
    return scrub(f"{type(e).__name__}: {e}", key)[:limit]


def cut_at_stop(text: str, stops: list[str] | None) -> str:
    for s in stops or []:
        if s and s in text:
            text = text[: text.index(s)]
    return text
