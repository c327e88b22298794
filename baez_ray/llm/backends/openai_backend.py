"""Any OpenAI-compatible chat-completions endpoint (a vLLM or SGLang server, OpenRouter,
OpenAI itself) over aiohttp's client, in a Ray actor pool. (Not httpx's: with more
requests out than the server serves at once, its pool sent ~20 a second into a server of
64 slots; aiohttp keeps them full: bench/peer_delphi_score.py.)

    prompt batches ─Ray Data (≤ batches_in_flight(cfg) per actor at once)─▶ OpenAICaller
      one event loop per actor: every row of every batch it holds is a task; one
      semaphore of `max_concurrency` slots per actor ─▶ POST {base_url}/chat/completions

The window is the actor's, not the batch's: while one batch waits for its slowest request,
the rows of the next batches take the slots it frees, so the requests in flight stay at
`max_concurrency` as long as rows remain (a batch returns as soon as its own rows are
answered). Defaults (config.API_DEFAULTS): 128 requests in flight per actor, batches of
64 rows, 4 batches held per actor.

`base_url` is the API root including the version, e.g. `http://127.0.0.1:8000/v1` or
`https://openrouter.ai/api/v1` (default `https://api.openai.com/v1`); requests carry
`model`, `messages` (system messages stay in the list), `max_tokens`, `temperature` and
`stop`. Retries: 408/409/429/5xx, connection errors and timeouts up to `max_retries` times,
waiting what `retry-after-ms` / `retry-after` (seconds or an HTTP date; capped at 120 s)
asks, otherwise exponential backoff (0.5 s, 1 s, 2 s, .. 8 s, with jitter); a request
gives its slot back while it waits. A request that still fails gets `answer = null` and an
`error` on its row only. Token counts come from `usage.prompt_tokens` /
`usage.completion_tokens` (0 when the server sends no usage).

`until` (backends.Until, from llm.rounds): the actor asks each row until its answer parses
(the retry conversation built by `until.retry_messages`), so a retry never waits for a
round of other rows; the row comes back with `value`, `problem`, `tries` and the tokens
and cost of all its tries.

Output constraint: a row with `constraint = "binary_list:N"` is sent with
`response_format = {"type": "json_schema", "json_schema": {"name": "binary_list",
"schema": <array of exactly N integers 0/1>, "strict": false}}` (vLLM and most OpenRouter
models enforce it). When a server answers 400 to that and the same request succeeds
without it, the actor stops sending `response_format` and relies on the prompt and the
parser, as the backends without structured outputs do. `activation_lines:N` (simulation)
is not sent: no JSON schema writes lines; the prompt and the parser hold the form.

Log-probs: a `logprob:A,B` row is sent with `logprobs: true`, `top_logprobs: 20` and
`max_tokens: 1` (`p_yes` from the first token); a row with `top_logprobs = k` with
`logprobs: true`, `top_logprobs: min(k, 20)` and its own `max_tokens`, and every token of
`choices[0].logprobs.content` becomes its `token_logprobs` (a server that sends none leaves
them null).

The API key is read only from the environment variable `api_key_env` (default
`OPENAI_API_KEY`) and sent as `Authorization: Bearer`. It is optional: with the default
variable unset, requests go without a key (local servers); a variable named explicitly in
`api_key_env` must be set. The key is never written to rows, errors or logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time

import pyarrow as pa
from pydantic import SecretStr

from baez_ray import progress
from baez_ray.llm import journal
from baez_ray.llm.backends import (TOP_LOGPROBS, Until, ask_until, batches_in_flight, cut_at_stop, error_text, logprob_targets,
                                   p_from_top, read_api_key, token_logprobs_of, with_results)
from baez_ray.config import LLMConfig

log = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_BASE_URL = "https://api.openai.com/v1"
ACTOR_CPUS = 0.25
RETRY_STATUS = {408, 409, 429}  # and every 5xx
INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 120.0
_ROW_COLS = ["request_id", "messages", "max_tokens", "temperature", "stop", "constraint", "top_logprobs"]


class APIStatusError(RuntimeError):
    """A non-2xx answer that was not retried (or ran out of retries)."""

    def __init__(self, status: int, body: str):
        self.status = status
        super().__init__(f"HTTP {status}: {body[:500]}")


def api_key(cfg: LLMConfig) -> SecretStr | None:
    """Optional for local servers, unless the job names a variable (`api_key_env`)."""
    key = read_api_key(cfg, DEFAULT_KEY_ENV, required=bool(cfg.api_key_env))
    if key is None:
        log.info("openai backend: %s is unset; sending requests without an API key (fine for local servers)", DEFAULT_KEY_ENV)
    return key


def retry_after(headers) -> float | None:
    """Seconds the server asks us to wait (retry-after-ms, retry-after seconds or date)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        v = headers.get(name)
        if v is None:
            continue
        try:
            return max(0.0, float(v) * scale)
        except ValueError:
            pass
        if name == "retry-after":
            date = email.utils.parsedate_tz(v)
            if date is not None:
                return max(0.0, email.utils.mktime_tz(date) - time.time())
    return None


def backoff(attempt: int, headers=None) -> float:
    asked = retry_after(headers)
    if asked is not None:
        return min(asked, MAX_RETRY_AFTER_S)
    return min(INITIAL_BACKOFF_S * 2**attempt, MAX_BACKOFF_S) * (1 - 0.25 * random.random())


def binary_list_format(n: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "binary_list", "strict": False, "schema": {
        "type": "array", "items": {"type": "integer", "enum": [0, 1]}, "minItems": n, "maxItems": n}}}


def request_body(row: dict, cfg: LLMConfig, structured: bool = True) -> dict:
    body: dict = {
        "model": cfg.model,
        "messages": [{"role": m["role"], "content": m["content"]} for m in (row["messages"] or [])],
        "max_tokens": int(row["max_tokens"]),
        "temperature": round(float(row["temperature"]), 6),
    }
    stops = [s for s in (row["stop"] or []) if s]
    if stops:
        body["stop"] = stops
    c = row.get("constraint")
    if structured and c and c.startswith("binary_list:"):
        body["response_format"] = binary_list_format(int(c.split(":", 1)[1]))
    if logprob_targets(c):
        body.update(logprobs=True, top_logprobs=TOP_LOGPROBS, max_tokens=1)
    elif token_logprobs_of(row):
        body.update(logprobs=True, top_logprobs=min(token_logprobs_of(row), TOP_LOGPROBS))
    return body


def first_token_p(data: dict, targets: tuple[str, str] | None) -> float | None:
    """`p_yes` of a log-prob row from a chat completion's first-token top log-probs."""
    if not targets:
        return None
    content = ((data["choices"][0].get("logprobs") or {}).get("content") or [])
    if not content:
        return None
    top = {t.get("token"): t.get("logprob") for t in content[0].get("top_logprobs") or []}
    top.setdefault(content[0].get("token"), content[0].get("logprob"))
    return p_from_top(top, targets)


def answer_tokens(data: dict) -> list[dict] | None:
    """`token_logprobs` (schema.TOKEN_LOGPROBS values) of a chat completion's
    `choices[0].logprobs.content`; None when the server sent none."""
    content = (data["choices"][0].get("logprobs") or {}).get("content")
    if not content:
        return None
    return [{"token": t.get("token"), "logprob": t.get("logprob"),
             "top": [{"token": c.get("token"), "logprob": c.get("logprob")} for c in t.get("top_logprobs") or []]} for t in content]


class OpenAICaller:
    """Ray Data actor (async): one aiohttp client session and one window of `max_concurrency`
    requests in flight, shared by every batch the actor holds."""

    def __init__(self, cfg: dict, key: SecretStr | None, journal: str | None = None):
        self.cfg = LLMConfig(**cfg)
        self._key = key
        self.journal = journal  # answers already paid for (`llm.journal`)
        self.headers = {"content-type": "application/json"}
        if key is not None:
            self.headers["authorization"] = f"Bearer {key.get_secret_value()}"
        self.url = (self.cfg.base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"
        self.structured = True  # send response_format for constrained rows until the server refuses it
        self._loop = None  # the event loop the client and the window belong to (the actor's)
        self._calls = 0  # batches being answered: the client is closed when the last one returns

    def _opened(self):
        """The client and the window of the running event loop (made on first use)."""
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            n = self.cfg.max_concurrency
            self._http = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                                               connector=aiohttp.TCPConnector(limit=n, limit_per_host=n))
            self._slots = asyncio.Semaphore(n)
            self._loop = loop
        return self._http, self._slots

    async def post(self, body: dict) -> dict:
        import aiohttp

        http, slots = self._opened()
        attempt = 0
        while True:
            headers = None
            try:
                async with slots:  # a slot only while the request is out: not while it waits to retry
                    async with http.post(self.url, json=body) as r:
                        status, text, headers = r.status, await r.text(), r.headers
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:  # connect / read errors and timeouts
                if attempt >= self.cfg.max_retries:
                    raise
                why = type(e).__name__
            else:
                if status < 400:
                    data = json.loads(text)
                    if not data.get("choices") and data.get("error"):  # some proxies answer 200 + error
                        raise APIStatusError(status, str(data["error"]))
                    return data
                if not (status in RETRY_STATUS or status >= 500) or attempt >= self.cfg.max_retries:
                    raise APIStatusError(status, text)
                why = f"HTTP {status}"
            delay = backoff(attempt, headers)
            log.debug("openai backend: %s; retry %d/%d in %.2fs", why, attempt + 1, self.cfg.max_retries, delay)
            await asyncio.sleep(delay)
            attempt += 1

    async def ask_once(self, row: dict) -> tuple[str | None, int, int, str | None, float | None, list | None]:
        try:
            body = request_body(row, self.cfg, self.structured)
            try:
                data = await self.post(body)
            except APIStatusError as e:
                if e.status != 400 or "response_format" not in body:
                    raise
                body.pop("response_format")
                data = await self.post(body)  # fine without it: this server does not take the schema
                if self.structured:
                    log.warning("openai backend: %s refused response_format (json_schema); relying on the prompt from now on", self.url)
                self.structured = False
            msg = (data["choices"][0].get("message") or {})
            text = msg.get("content") or ""
            usage = data.get("usage") or {}
            p = first_token_p(data, logprob_targets(row.get("constraint")))
            toks = answer_tokens(data) if token_logprobs_of(row) else None
            return cut_at_stop(text, row["stop"]), int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), None, p, toks
        except Exception as e:  # after the retries: recorded on this row only
            err = error_text(e, self._key)
            log.warning("openai request %s failed: %s", row.get("request_id"), err)
            return None, 0, 0, err, None, None

    async def __call__(self, batch: pa.Table, until: Until | None = None) -> pa.Table:
        rows = batch.to_pylist() if until is not None else batch.select([c for c in _ROW_COLS if c in batch.column_names]).to_pylist()
        if rows:  # (begun again elsewhere after a lost node: the driver's bar says so; a blocking call, off the loop)
            await asyncio.to_thread(progress.started, f"prompts {rows[0]['request_id']} .. {rows[-1]['request_id']}", len(rows))
        ask = journal.asking_once(self.journal, self.cfg.model, self.ask_once)  # answers already paid for are not asked again
        self._calls += 1
        try:
            results = await asyncio.gather(*(ask_until(ask, r, until) for r in rows))
        finally:
            self._calls -= 1
            if not self._calls and self._loop is not None:  # idle: closed (the next batch opens another)
                self._loop = None
                await self._http.close()
        # off the event loop: the first progress tick looks its actor up (a blocking call)
        return await asyncio.to_thread(with_results, batch, list(results), self.cfg, until)


def _pool(cfg: LLMConfig) -> dict:
    """The actor pool of `cfg`: what `generate` and `prestart` give ray_pool (one kept pool)."""
    kwargs = {"cfg": cfg.model_dump(), "key": api_key(cfg), "journal": journal.root()}
    return {"cls": OpenAICaller, "kwargs": kwargs, "size": cfg.num_actors, "num_cpus": ACTOR_CPUS}


def generate(ds, cfg: LLMConfig, until: Until | None = None):
    from baez_ray.ray_pool import actor_map

    return actor_map(ds, **_pool(cfg), batch_size=cfg.batch_size, keep=True, in_flight=batches_in_flight(cfg),
                     fn_kwargs={"until": until} if until is not None else None)


def prestart(cfg: LLMConfig) -> bool:
    from baez_ray.ray_pool import start_kept

    return start_kept(**_pool(cfg))
