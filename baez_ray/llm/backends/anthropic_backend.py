"""Anthropic (Claude) through the official SDK, in two modes.

`mode: messages` (default): an actor pool over the prompt rows; each actor (async) holds
several batches at once (`backends.batches_in_flight`) and sends every row of them through
one `anthropic.AsyncAnthropic` client, with one window of at most `max_concurrency`
requests in flight shared by those batches: a batch that waits for its slowest request
does not leave the window empty (as the openai backend; defaults: config.API_DEFAULTS).
With `until` each row is asked until its answer parses (backends.ask_until). The SDK
retries 408/409/429/5xx/529 and connection errors `max_retries` times, honouring
`retry-after` / `retry-after-ms` (otherwise exponential backoff 0.5 s .. 8 s); a request
keeps its slot while the SDK waits to retry it.
A request that still fails gets `answer = null` and an `error` ("Type: message") on its
row only; the label job commits such rows with their error and retries only them when the
same command is run again. An actor that dies mid-batch (OOM kill, lost node) is restarted
by Ray and the batch sent again (`ray_pool.ACTOR_FAULT_TOLERANCE`): the requests of that batch
that had already been answered are sent, and billed, twice.

`mode: batches`: the Message Batches API (50% cheaper, offline, results within 24 h). The
prompt rows are read on the driver in chunks of at most 10,000 requests (and well under the
256 MB request limit), each chunk is one batch; batches are polled every `poll_s` seconds
(progress logged on each poll) until `processing_status == "ended"`, then the results are
matched back to the rows by `custom_id`. Anthropic allows 1-64 characters of
[A-Za-z0-9_-] in a custom_id, so every row gets a safe id (`custom_id`) and is mapped
back; errored / expired / canceled results become row errors. Costs use the price's
`batch_discount`. Unlike the other backends this mode runs eagerly when `generate` is
called and returns a materialised Dataset (`ray.data.from_arrow`).

The API key is read only from the environment variable `api_key_env` (default
`ANTHROPIC_API_KEY`) on the driver, travels to the actors as a `pydantic.SecretStr`, and is
scrubbed from every error string and log line this module writes.

The Messages API gives no log-probs: a log-prob row (`constraint: logprob:A,B`) is refused
(`request_params` raises; in messages mode that is the row's error). Jobs that ask for the
log-prob benchmarks with an anthropic scorer are refused when they are validated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import pyarrow as pa
from pydantic import SecretStr

from baez_ray.llm.backends import (Until, ask_until, batches_in_flight, cut_at_stop, error_text, logprob_targets, read_api_key, scrub,
                                   with_answers, with_results)
from baez_ray.config import LLMConfig

log = logging.getLogger(__name__)

DEFAULT_KEY_ENV = "ANTHROPIC_API_KEY"
ACTOR_CPUS = 0.25  # the actors wait on the network; a fraction of a CPU each
MAX_BATCH_REQUESTS = 10_000  # requests per Message Batch (API limit: 100k / 256 MB)
MAX_BATCH_BYTES = 128 * 2**20  # JSON bytes per Message Batch, far under the 256 MB limit
MAX_POLL_FAILURES = 10  # consecutive failed `retrieve` calls before a batch's rows are errored
CUSTOM_ID_MAX = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_ROW_COLS = ["request_id", "messages", "max_tokens", "temperature", "stop", "constraint"]


def _request_rows(table: pa.Table) -> list[dict]:
    return table.select([c for c in _ROW_COLS if c in table.column_names]).to_pylist()


def api_key(cfg: LLMConfig) -> SecretStr:
    return read_api_key(cfg, DEFAULT_KEY_ENV, required=True)


def request_params(row: dict, cfg: LLMConfig) -> dict:
    """Messages API parameters for one prompt row. Role "system" messages become the
    `system` parameter; whitespace-only stop strings (rejected by the API) are applied on
    the client side only (`cut_at_stop`). A log-prob row is refused: no log-probs here."""
    if logprob_targets(row.get("constraint")):
        raise ValueError(f"the anthropic backend gives no log-probs: cannot answer constraint {row['constraint']!r}")
    msgs = row["messages"] or []
    system = [m["content"] for m in msgs if m["role"] == "system" and m["content"]]
    params: dict = {
        "model": cfg.model,
        "max_tokens": int(row["max_tokens"]),
        "messages": [{"role": m["role"], "content": m["content"]} for m in msgs if m["role"] != "system"],
        "temperature": round(float(row["temperature"]), 6),
    }
    if system:
        params["system"] = "\n\n".join(system)
    stops = [s for s in (row["stop"] or []) if s and s.strip()]
    if stops:
        params["stop_sequences"] = stops
    return params


def parse_message(msg, stops: list[str] | None) -> tuple[str, int, int]:
    """(answer text, input tokens, output tokens) of an SDK `Message`."""
    text = "".join(getattr(b, "text", "") or "" for b in (msg.content or []) if getattr(b, "type", None) == "text")
    usage = msg.usage
    n_in = int(usage.input_tokens or 0) if usage else 0
    n_out = int(usage.output_tokens or 0) if usage else 0
    return cut_at_stop(text, stops), n_in, n_out


def make_client(cfg: LLMConfig, key: SecretStr, asynchronous: bool = False):
    import anthropic

    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    return cls(api_key=key.get_secret_value(), base_url=cfg.base_url, max_retries=cfg.max_retries, timeout=cfg.timeout_s)


class AnthropicCaller:
    """Ray Data actor (async): one SDK async client and one window of `max_concurrency`
    requests in flight, shared by every batch the actor holds."""

    def __init__(self, cfg: dict, key: SecretStr):
        self.cfg = LLMConfig(**cfg)
        self._key = key
        self._loop = None  # the event loop the client and the window belong to (the actor's)

    def _opened(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._client = make_client(self.cfg, self._key, asynchronous=True)
            self._slots = asyncio.Semaphore(self.cfg.max_concurrency)
            self._loop = loop
        return self._client, self._slots

    async def ask_once(self, row: dict) -> tuple[str | None, int, int, str | None, float | None]:
        try:
            params = request_params(row, self.cfg)
            # temperature as a body field: the SDK's typed `create` does not take it here
            temperature = params.pop("temperature")
            client, slots = self._opened()
            async with slots:
                msg = await client.messages.create(**params, extra_body={"temperature": temperature})
            text, n_in, n_out = parse_message(msg, row["stop"])
            return text, n_in, n_out, None, None
        except Exception as e:  # after the SDK's retries: recorded on this row only
            err = error_text(e, self._key)
            log.warning("anthropic request %s failed: %s", row.get("request_id"), err)
            return None, 0, 0, err, None

    async def __call__(self, batch: pa.Table, until: Until | None = None) -> pa.Table:
        rows = batch.to_pylist() if until is not None else _request_rows(batch)
        results = await asyncio.gather(*(ask_until(self.ask_once, r, until) for r in rows))
        # off the event loop: the first progress tick looks its actor up (a blocking call)
        return await asyncio.to_thread(with_results, batch, list(results), self.cfg, until)


# ---- Message Batches ------------------------------------------------------------------


def custom_ids(request_ids: list[str]) -> list[str]:
    """Unique Anthropic-safe custom_ids (1-64 chars of [A-Za-z0-9_-]) for one batch: the
    row's position, then as much of its sanitised request_id as fits (for reading)."""
    out = []
    for i, rid in enumerate(request_ids):
        head = f"r{i}"
        tail = _UNSAFE.sub("_", str(rid))[: CUSTOM_ID_MAX - len(head) - 1]
        out.append(f"{head}-{tail}" if tail else head)
    return out


class _Chunk:
    """One Message Batch: its rows (a table slice) and what came back."""

    def __init__(self, table: pa.Table, params: list[dict], ids: list[str]):
        self.table, self.params, self.ids = table, params, ids
        n = table.num_rows
        self.answers: list[str | None] = [None] * n
        self.n_in, self.n_out = [0] * n, [0] * n
        self.errors: list[str | None] = [None] * n
        self.batch_id: str | None = None
        self.done = False
        self.poll_failures = 0

    def fail_all(self, err: str) -> None:
        self.errors = [old or err for old in self.errors]
        self.done = True

    def result_table(self, cfg: LLMConfig) -> pa.Table:
        errors = [e if (e or a is not None) else "no result returned for this request" for a, e in zip(self.answers, self.errors)]
        return with_answers(self.table, self.answers, self.n_in, self.n_out, errors, cfg, batch_mode=True)


def _split(table: pa.Table, cfg: LLMConfig) -> list[_Chunk]:
    """A table of ≤ MAX_BATCH_REQUESTS rows as chunks under MAX_BATCH_BYTES of JSON."""
    rows = _request_rows(table)
    params = [request_params(r, cfg) for r in rows]
    chunks, start, size = [], 0, 0
    for i, p in enumerate(params):
        b = len(json.dumps(p)) + 100
        if i > start and size + b > MAX_BATCH_BYTES:
            chunks.append((start, i))
            start, size = i, 0
        size += b
    if params:
        chunks.append((start, len(params)))
    return [_Chunk(table.slice(a, b - a), params[a:b], custom_ids([r["request_id"] for r in rows[a:b]])) for a, b in chunks]


def _submit(client, chunk: _Chunk, key: SecretStr) -> None:
    requests = [{"custom_id": c, "params": p} for c, p in zip(chunk.ids, chunk.params)]
    try:
        batch = client.messages.batches.create(requests=requests)
    except Exception as e:  # the SDK has retried; the chunk's rows carry the error
        err = error_text(e, key)
        log.warning("anthropic batches: submitting %d requests failed: %s", len(requests), err)
        chunk.fail_all(f"batch submission failed: {err}")
        return
    chunk.batch_id = batch.id
    log.info("anthropic batches: submitted %s with %d requests", batch.id, len(requests))


def _poll(client, chunk: _Chunk, key: SecretStr) -> None:
    try:
        batch = client.messages.batches.retrieve(chunk.batch_id)
    except Exception as e:
        chunk.poll_failures += 1
        err = error_text(e, key)
        log.warning("anthropic batches: polling %s failed (%d/%d): %s", chunk.batch_id, chunk.poll_failures, MAX_POLL_FAILURES, err)
        if chunk.poll_failures >= MAX_POLL_FAILURES:
            chunk.fail_all(f"polling batch {chunk.batch_id} failed: {err}")
        return
    chunk.poll_failures = 0
    c = batch.request_counts
    log.info("anthropic batches: %s %s: processing=%d succeeded=%d errored=%d canceled=%d expired=%d",
             batch.id, batch.processing_status, c.processing, c.succeeded, c.errored, c.canceled, c.expired)
    if batch.processing_status == "ended":
        _fetch_results(client, chunk, key)


def _fetch_results(client, chunk: _Chunk, key: SecretStr) -> None:
    index = {c: i for i, c in enumerate(chunk.ids)}
    try:
        for item in client.messages.batches.results(chunk.batch_id):
            i = index.get(item.custom_id)
            if i is None:
                log.warning("anthropic batches: %s returned an unknown custom_id %r", chunk.batch_id, item.custom_id)
                continue
            res = item.result
            if res.type == "succeeded":
                chunk.answers[i], chunk.n_in[i], chunk.n_out[i] = parse_message(res.message, chunk.table["stop"][i].as_py())
                chunk.errors[i] = None
            elif res.type == "errored":
                inner = getattr(res.error, "error", None)
                chunk.errors[i] = scrub(f"errored: {getattr(inner, 'type', 'error')}: {getattr(inner, 'message', '')}", key)[:1000]
            else:  # expired | canceled
                chunk.errors[i] = f"{res.type}: the request was {res.type} in batch {chunk.batch_id}"
    except Exception as e:  # rows not read yet get the error; rows read keep their results
        err = error_text(e, key)
        log.warning("anthropic batches: reading results of %s failed: %s", chunk.batch_id, err)
        chunk.errors = [old or (None if a is not None else f"reading batch results failed: {err}") for a, old in zip(chunk.answers, chunk.errors)]
    chunk.done = True


def generate_batches(ds, cfg: LLMConfig, key: SecretStr):
    import ray

    client = make_client(cfg, key)
    chunks: list[_Chunk] = []
    for table in ds.iter_batches(batch_size=MAX_BATCH_REQUESTS, batch_format="pyarrow"):
        for chunk in _split(table, cfg):
            _submit(client, chunk, key)
            chunks.append(chunk)
    if not chunks:
        try:
            empty = ds.schema().base_schema.empty_table()
        except Exception:
            from baez_ray import schema

            empty = schema.PROMPTS.empty_table()
        return ray.data.from_arrow(with_answers(empty, [], [], [], [], cfg, batch_mode=True))
    try:
        while True:
            for chunk in [c for c in chunks if not c.done]:
                _poll(client, chunk, key)
            if all(c.done for c in chunks):
                break
            time.sleep(cfg.poll_s)
    except KeyboardInterrupt:  # the batches go on (and are billed) server-side: say which
        running = [c.batch_id for c in chunks if c.batch_id and not c.done]
        log.warning("anthropic batches: interrupted; still running on the server: %s "
                    "(client.messages.batches.cancel(id) stops one)", ", ".join(running) or "none")
        raise
    tables = [c.result_table(cfg) for c in chunks]
    n_err = sum(sum(e is not None for e in c.errors) for c in chunks)
    log.info("anthropic batches: %d batches ended, %d rows, %d with errors", len(chunks), sum(t.num_rows for t in tables), n_err)
    return ray.data.from_arrow(tables)


def _pool(cfg: LLMConfig, key: SecretStr) -> dict:
    """The actor pool of `cfg` (messages mode): what `generate` and `prestart` give ray_pool.
    An actor that dies mid-batch is restarted and the batch retried (fault_tolerant)."""
    return {"cls": AnthropicCaller, "kwargs": {"cfg": cfg.model_dump(), "key": key}, "size": cfg.num_actors, "num_cpus": ACTOR_CPUS,
            "fault_tolerant": True}


def generate(ds, cfg: LLMConfig, until: Until | None = None):
    from baez_ray.ray_pool import actor_map

    key = api_key(cfg)  # on the driver, before anything runs: fails early and clearly
    if cfg.mode == "batches":
        return generate_batches(ds, cfg, key)
    return actor_map(ds, **_pool(cfg, key), batch_size=cfg.batch_size, keep=True, in_flight=batches_in_flight(cfg),
                     fn_kwargs={"until": until} if until is not None else None)


def prestart(cfg: LLMConfig) -> bool:
    from baez_ray.ray_pool import start_kept

    return cfg.mode == "messages" and start_kept(**_pool(cfg, api_key(cfg)))
