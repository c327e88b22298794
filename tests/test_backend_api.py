"""The anthropic (Messages + Message Batches) and openai backends through real Ray Data,
against a fake API server on 127.0.0.1 that fails before it succeeds."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import pytest

from baez_ray import schema
from baez_ray.llm.backends import generate, prompt_table
from baez_ray.config import LLMConfig
from conftest import serve_local

KEY = "sk-test-K3Y-5ecret-0123456789abcdefXYZ"
KEY_ENV = "BAEZ_TEST_API_KEY"
PRICE = {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "batch_discount": 0.5}
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def in_tokens(content: str) -> int:
    return 100 + len(content)


def reply(content: str) -> str:
    return f"echo: {content} END tail"


class Fake:
    """State of the fake server; every request is recorded (headers without the key)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self, openai_schema_ok: bool = True):
        with self.lock:
            self.requests: list[dict] = []
            self.attempts: Counter = Counter()
            self.status: Counter = Counter()
            self.key_ok: list[bool] = []
            self.batches: dict[str, dict] = {}
            self.openai_schema_ok = openai_schema_ok


def last_user(body: dict) -> str:
    return [m["content"] for m in body["messages"] if m["role"] == "user"][-1]


def anthropic_message(body: dict) -> dict:
    content = last_user(body)
    text = reply(content)
    stop_reason = "end_turn"
    for s in body.get("stop_sequences") or []:
        if s in text:
            text, stop_reason = text[: text.index(s)], "stop_sequence"
    return {"id": "msg_" + str(abs(hash(content)) % 10**8), "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": text}], "stop_reason": stop_reason, "stop_sequence": None,
            "usage": {"input_tokens": in_tokens(content), "output_tokens": len(text.split())}}


def make_handler(fake: Fake):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def send(self, code: int, payload, headers: dict | None = None, content_type="application/json"):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def record(self, body):
            hdrs = {k.lower(): v for k, v in self.headers.items() if k.lower() not in ("x-api-key", "authorization")}
            with fake.lock:
                fake.requests.append({"method": self.command, "path": self.path, "headers": hdrs, "body": body})

        def anthropic_auth(self) -> bool:
            # the Messages API takes the key as `x-api-key`; SDK 2.x sends `Authorization: Bearer`
            ok = KEY in (self.headers.get("x-api-key"), (self.headers.get("authorization") or "").removeprefix("Bearer "))
            with fake.lock:
                fake.key_ok.append(ok)
            if not ok:
                self.send(401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
            return ok

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
            self.record(body)
            if self.path == "/v1/messages":
                return self.messages(body)
            if self.path == "/v1/messages/batches":
                return self.create_batch(body)
            if self.path == "/v1/chat/completions":
                return self.chat(body)
            self.send(404, {"error": "no such path"})

        def do_GET(self):
            self.record(None)
            m = re.fullmatch(r"/v1/messages/batches/([^/]+)(/results)?", self.path)
            if not m or not self.anthropic_auth():
                return None if m else self.send(404, {"error": "no such path"})
            batch = fake.batches.get(m.group(1))
            if batch is None:
                return self.send(404, {"type": "error", "error": {"type": "not_found_error", "message": "no batch"}})
            if m.group(2):
                return self.results(batch)
            with fake.lock:
                batch["polls"] += 1
                ended = batch["polls"] >= 2
            self.send(200, self.batch_obj(batch, ended))

        # ---- Anthropic Messages ----
        def messages(self, body):
            if not self.anthropic_auth():
                return
            content = last_user(body)
            with fake.lock:
                fake.attempts[content] += 1
                n = fake.attempts[content]
            if "FAIL" in content:
                with fake.lock:
                    fake.status[400] += 1
                # a careless server that echoes the key: the backend must scrub it
                return self.send(400, {"type": "error", "error": {"type": "invalid_request_error", "message": f"prompt refused by the fake (key {KEY})"}})
            if n == 1:
                with fake.lock:
                    fake.status[529] += 1
                return self.send(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, {"retry-after": "0.05"})
            if n == 2:
                with fake.lock:
                    fake.status[429] += 1
                return self.send(429, {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}, {"retry-after": "0"})
            with fake.lock:
                fake.status[200] += 1
            self.send(200, anthropic_message(body))

        # ---- Anthropic Message Batches ----
        def batch_obj(self, batch, ended: bool) -> dict:
            n = len(batch["requests"])
            n_err = sum("FAIL" in last_user(r["params"]) for r in batch["requests"])
            n_exp = sum("EXPIRE" in last_user(r["params"]) for r in batch["requests"])
            counts = ({"processing": 0, "succeeded": n - n_err - n_exp, "errored": n_err, "canceled": 0, "expired": n_exp}
                      if ended else {"processing": n, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0})
            host, port = self.server.server_address[:2]
            return {"id": batch["id"], "type": "message_batch", "processing_status": "ended" if ended else "in_progress",
                    "request_counts": counts, "created_at": "2025-01-01T00:00:00Z", "expires_at": "2025-01-02T00:00:00Z",
                    "ended_at": "2025-01-01T00:01:00Z" if ended else None, "archived_at": None, "cancel_initiated_at": None,
                    "results_url": f"http://{host}:{port}/v1/messages/batches/{batch['id']}/results" if ended else None}

        def create_batch(self, body):
            if not self.anthropic_auth():
                return
            ids = [r.get("custom_id", "") for r in body["requests"]]
            bad = [c for c in ids if not CUSTOM_ID.match(c)]
            if bad or len(set(ids)) != len(ids):
                return self.send(400, {"type": "error", "error": {"type": "invalid_request_error", "message": f"bad or duplicate custom_id: {bad[:3]}"}})
            with fake.lock:
                bid = f"msgbatch_{len(fake.batches):04d}"
                fake.batches[bid] = batch = {"id": bid, "requests": body["requests"], "polls": 0}
            self.send(200, self.batch_obj(batch, False))

        def results(self, batch):
            lines = []
            for r in reversed(batch["requests"]):  # out of order on purpose: matched by custom_id
                content = last_user(r["params"])
                if "FAIL" in content:
                    res = {"type": "errored", "error": {"type": "error", "error": {"type": "invalid_request_error", "message": "bad prompt in batch"}}}
                elif "EXPIRE" in content:
                    res = {"type": "expired"}
                else:
                    res = {"type": "succeeded", "message": anthropic_message(r["params"])}
                lines.append(json.dumps({"custom_id": r["custom_id"], "result": res}))
            self.send(200, ("\n".join(lines) + "\n").encode(), content_type="application/binary")

        # ---- OpenAI chat completions ----
        def chat(self, body):
            if self.headers.get("authorization") != f"Bearer {KEY}":
                return self.send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
            content = last_user(body)
            with fake.lock:
                fake.attempts[content] += 1
                n = fake.attempts[content]
            if "FAIL" in content:
                with fake.lock:
                    fake.status[400] += 1
                return self.send(400, {"error": {"message": f"prompt refused by the fake (key {KEY})", "type": "invalid_request_error"}})
            if "response_format" in body and not fake.openai_schema_ok:
                return self.send(400, {"error": {"message": "response_format json_schema not supported", "type": "invalid_request_error"}})
            if n == 1:
                with fake.lock:
                    fake.status[503] += 1
                return self.send(503, {"error": {"message": "busy"}}, {"retry-after": "0"})
            with fake.lock:
                fake.status[200] += 1
            text = "[1, 0, 1]" if "response_format" in body else reply(content)
            for s in body.get("stop") or []:
                if s in text:
                    text = text[: text.index(s)]
            self.send(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": in_tokens(content), "completion_tokens": len(text.split()),
                                      "total_tokens": in_tokens(content) + len(text.split())}})

    return Handler


@pytest.fixture(scope="module")
def server():
    fake = Fake()
    with serve_local(make_handler(fake)) as fake.url:
        yield fake


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def rows(ids: list[str] | None = None, fail: int | None = None, expire: int | None = None) -> list[dict]:
    ids = ids or [f"req-{i}" for i in range(6)]
    out = []
    for i, rid in enumerate(ids):
        q = f"question {i} for {rid}" + (" FAIL" if i == fail else "") + (" EXPIRE" if i == expire else "")
        msgs = ([{"role": "system", "content": f"You are labeller {i}."}] if i % 2 == 0 else []) + [{"role": "user", "content": q}]
        out.append({"request_id": rid, "messages": msgs, "max_tokens": 20 + i, "temperature": 0.5 if i == 1 else 0.0,
                    "stop": [" END"] if i % 3 == 0 else None, "constraint": "binary_list:3" if i == 4 else None,
                    "feature": 1000 + i})
    return out


def llm_cfg(backend: str, server: Fake, **kw) -> LLMConfig:
    base = server.url + ("/v1" if backend == "openai" else "")
    return LLMConfig(backend=backend, model="fake-model", base_url=base, api_key_env=KEY_ENV, max_retries=3, timeout_s=10,
                     batch_size=3, max_concurrency=4, num_actors=1, price=PRICE, **kw)


def run(ray_local, cfg: LLMConfig, prompt_rows: list[dict]):
    ds = ray_local.data.from_arrow(prompt_table(prompt_rows))
    out = generate(ds, cfg).to_pandas()
    return out.set_index("request_id").loc[[r["request_id"] for r in prompt_rows]].reset_index()


def assert_no_key(out, capfd, caplog):
    """The key appears in no output cell, nothing printed (driver or forwarded from the Ray
    workers), no log record, and no file of this Ray session's log directory."""
    for col in out.columns:
        for v in out[col]:
            assert KEY not in repr(v) and KEY not in str(v), f"key leaked into column {col}"
    time.sleep(1.5)  # let Ray forward the workers' output to the driver
    captured = capfd.readouterr()
    assert KEY not in captured.out and KEY not in captured.err
    assert KEY not in caplog.text
    try:
        import ray

        logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    except Exception:
        return
    for f in logs.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f"key leaked into {f}"


def messages_by_content(server: Fake, path: str) -> dict[str, dict]:
    return {last_user(r["body"]): r for r in server.requests if r["path"] == path and r["body"]}


# ---- anthropic: Messages API ----------------------------------------------------------


def test_anthropic_messages_retries_row_errors_and_no_key_leak(ray_local, server, key_env, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    server.reset()
    prompt_rows = rows(fail=5)
    out = run(ray_local, llm_cfg("anthropic", server), prompt_rows)

    assert set(schema.ANSWERS.names) <= set(out.columns)
    assert list(out["feature"]) == [1000 + i for i in range(6)]  # passthrough column kept
    ok = out.iloc[:5]
    assert ok["error"].isna().all(), ok["error"].tolist()
    # every good row answered after one 529 and one 429; the failing row is not retried (400)
    assert server.status[529] == 5 and server.status[429] == 5 and server.status[200] == 5 and server.status[400] == 1
    assert all(server.key_ok)
    for i, r in enumerate(prompt_rows[:5]):
        content = r["messages"][-1]["content"]
        expected = reply(content)
        if r["stop"]:
            expected = expected[: expected.index(" END")]
        assert out.loc[i, "answer"] == expected
        assert out.loc[i, "input_tokens"] == in_tokens(content) and out.loc[i, "output_tokens"] == len(expected.split())
        assert out.loc[i, "cost_usd"] == pytest.approx((in_tokens(content) * 3.0 + len(expected.split()) * 15.0) / 1e6)
    bad = out.iloc[5]
    assert pd.isna(bad["answer"]) and "BadRequestError" in bad["error"] and "400" in bad["error"]
    assert "[redacted]" in bad["error"]  # the key the server echoed was scrubbed
    assert bad["input_tokens"] == 0 and bad["cost_usd"] == 0.0
    assert set(out["backend"]) == {"anthropic"} and set(out["model"]) == {"fake-model"}

    sent = messages_by_content(server, "/v1/messages")
    for r in prompt_rows:
        body = sent[r["messages"][-1]["content"]]["body"]
        assert body["model"] == "fake-model" and body["max_tokens"] == r["max_tokens"]
        assert body["temperature"] == r["temperature"]
        assert all(m["role"] != "system" for m in body["messages"])
        if r["messages"][0]["role"] == "system":
            assert body["system"] == r["messages"][0]["content"]
        else:
            assert "system" not in body
        assert body.get("stop_sequences") == r["stop"]
    assert_no_key(out, capfd, caplog)


def test_anthropic_missing_key_names_the_variable(ray_local, server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    ds = ray_local.data.from_arrow(prompt_table(rows()))
    for mode in ("messages", "batches"):
        with pytest.raises(RuntimeError, match=KEY_ENV):
            generate(ds, llm_cfg("anthropic", server, mode=mode))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="ANTHROPIC_API_KEY"):
        generate(ds, LLMConfig(backend="anthropic", model="m"))


# ---- anthropic: Message Batches -------------------------------------------------------


def test_custom_ids_are_safe_unique_and_short():
    from baez_ray.llm.backends.anthropic_backend import custom_ids

    ids = ["a/b", "a:b", "a b", "", "x" * 200, "feature 12 · scorer #3 ü" * 4, "ok_id-1"] + [f"same/{i}" for i in range(3)]
    out = custom_ids(ids)
    assert len(set(out)) == len(out)
    assert all(CUSTOM_ID.match(c) for c in out)


def test_anthropic_batches_end_to_end(ray_local, server, key_env, capfd, caplog):
    caplog.set_level(logging.INFO)
    server.reset()
    ids = ["feature/12:scorer#0", "feature/12:scorer#1", "x" * 150, "ünïcode id with spaces", "a:b", "a/b", "plain-7"]
    prompt_rows = rows(ids, fail=2, expire=4)
    out = run(ray_local, llm_cfg("anthropic", server, mode="batches", poll_s=0.05), prompt_rows)

    assert list(out["request_id"]) == ids and list(out["feature"]) == [1000 + i for i in range(len(ids))]
    (batch,) = server.batches.values()
    assert batch["polls"] >= 2  # in_progress once, then ended
    sent = {r["custom_id"]: r["params"] for r in batch["requests"]}
    assert all(CUSTOM_ID.match(c) for c in sent) and len(sent) == len(ids)
    for i, r in enumerate(prompt_rows):
        content = r["messages"][-1]["content"]
        params = next(p for p in sent.values() if last_user(p) == content)
        assert params["temperature"] == r["temperature"] and params.get("stop_sequences") == r["stop"]
        assert params.get("system") == (r["messages"][0]["content"] if r["messages"][0]["role"] == "system" else None)
        row = out.iloc[i]
        if i == 2:
            assert pd.isna(row["answer"]) and "errored" in row["error"] and "bad prompt in batch" in row["error"]
        elif i == 4:
            assert pd.isna(row["answer"]) and "expired" in row["error"]
        else:
            expected = reply(content)
            if r["stop"]:
                expected = expected[: expected.index(" END")]
            assert pd.isna(row["error"]) and row["answer"] == expected  # matched back despite reversed results
            n_out = len(expected.split())
            assert row["input_tokens"] == in_tokens(content) and row["output_tokens"] == n_out
            # the Message Batches discount
            assert row["cost_usd"] == pytest.approx(0.5 * (in_tokens(content) * 3.0 + n_out * 15.0) / 1e6)
    assert not [r for r in server.requests if r["path"] == "/v1/messages"]  # nothing through the Messages API
    assert "processing=" in caplog.text and "succeeded=5" in caplog.text and "errored=1" in caplog.text
    assert_no_key(out, capfd, caplog)


def test_anthropic_batches_split_into_chunks(ray_local, server, key_env, monkeypatch):
    """More rows than one batch takes: several batches, all rows answered, in order."""
    from baez_ray.llm.backends import anthropic_backend

    monkeypatch.setattr(anthropic_backend, "MAX_BATCH_REQUESTS", 4)
    server.reset()
    prompt_rows = rows([f"r{i}" for i in range(10)])
    out = run(ray_local, llm_cfg("anthropic", server, mode="batches", poll_s=0.05), prompt_rows)
    assert len(server.batches) == 3 and sorted(len(b["requests"]) for b in server.batches.values()) == [2, 4, 4]
    assert out["error"].isna().all() and list(out["request_id"]) == [f"r{i}" for i in range(10)]


def test_anthropic_batches_a_rerun_waits_on_the_batch_already_submitted(ray_local, server, key_env, tmp_path):
    """The driver is killed while it waits on a Message Batch; the same run again (its
    answers folder, `llm.journal`) waits on that batch, paid for, and submits none."""
    from baez_ray.llm import journal

    server.reset()
    cfg = llm_cfg("anthropic", server, mode="batches", poll_s=0.05)
    with journal.kept_in(tmp_path / "answers"):
        first = run(ray_local, cfg, rows())
        second = run(ray_local, cfg, rows())
    assert len(server.batches) == 1 and first.equals(second)


def test_api_answers_kept_in_the_run_are_not_asked_again(ray_local, server, key_env, tmp_path):
    """A batch of prompts sent again (its actor's node was lost, or the run was killed):
    the answers it already got come from the run's folder; only the failed row is asked."""
    from baez_ray.llm import journal

    for backend in ("openai", "anthropic"):
        server.reset()
        with journal.kept_in(tmp_path / backend):
            first = run(ray_local, llm_cfg(backend, server), rows(fail=5))
            asked = len(server.requests)
            second = run(ray_local, llm_cfg(backend, server), rows(fail=5))
        again = [r for r in server.requests[asked:] if "question" in json.dumps(r["body"])]
        assert len(again) == 1 and "FAIL" in json.dumps(again[0]["body"]), (backend, again)
        assert first.drop(columns=["error"]).equals(second.drop(columns=["error"]))


# ---- openai-compatible ----------------------------------------------------------------


def test_openai_retries_row_errors_and_no_key_leak(ray_local, server, key_env, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    server.reset()
    prompt_rows = rows(fail=5)
    out = run(ray_local, llm_cfg("openai", server), prompt_rows)

    assert server.status[503] == 5 and server.status[200] == 5 and server.status[400] == 1
    assert out.iloc[:5]["error"].isna().all(), out["error"].tolist()
    sent = messages_by_content(server, "/v1/chat/completions")
    for i, r in enumerate(prompt_rows[:5]):
        content = r["messages"][-1]["content"]
        body = sent[content]["body"]
        assert body["temperature"] == r["temperature"] and body["max_tokens"] == r["max_tokens"]
        assert body.get("stop") == r["stop"] and body["messages"] == r["messages"]  # system message kept in the list
        if r["constraint"]:
            assert body["response_format"]["json_schema"]["schema"]["maxItems"] == 3
            expected = "[1, 0, 1]"
        else:
            assert "response_format" not in body
            expected = reply(content)
            if r["stop"]:
                expected = expected[: expected.index(" END")]
        assert out.loc[i, "answer"] == expected
        assert out.loc[i, "input_tokens"] == in_tokens(content) and out.loc[i, "output_tokens"] == len(expected.split())
        assert out.loc[i, "cost_usd"] == pytest.approx((in_tokens(content) * 3.0 + len(expected.split()) * 15.0) / 1e6)
    bad = out.iloc[5]
    assert pd.isna(bad["answer"]) and "HTTP 400" in bad["error"] and "prompt refused" in bad["error"] and "[redacted]" in bad["error"]
    assert set(out["backend"]) == {"openai"}
    assert_no_key(out, capfd, caplog)


def test_openai_falls_back_when_response_format_is_refused(server, key_env):
    from baez_ray.llm.backends.openai_backend import OpenAICaller, api_key

    server.reset(openai_schema_ok=False)
    cfg = llm_cfg("openai", server)
    caller = OpenAICaller(cfg.model_dump(), api_key(cfg))
    r = rows()[4]
    assert r["constraint"] == "binary_list:3"
    out = asyncio.run(caller(prompt_table([r]))).to_pylist()[0]
    assert out["error"] is None and out["answer"].startswith("echo:")
    assert caller.structured is False


def test_openai_connection_errors_become_row_errors(server, key_env, monkeypatch):
    import socket

    from baez_ray.llm.backends import openai_backend
    from baez_ray.llm.backends.openai_backend import OpenAICaller, api_key

    monkeypatch.setattr(openai_backend, "INITIAL_BACKOFF_S", 0.01)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    cfg = LLMConfig(backend="openai", model="m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV,
                    max_retries=2, timeout_s=2)
    caller = OpenAICaller(cfg.model_dump(), api_key(cfg))
    out = asyncio.run(caller(prompt_table(rows()[:2]))).to_pylist()
    assert all(o["answer"] is None and o["error"].startswith("ClientConnectorError") for o in out)
    assert all(KEY not in o["error"] for o in out)


def test_openai_key_optional_unless_named(monkeypatch):
    from baez_ray.llm.backends.openai_backend import api_key

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert api_key(LLMConfig(backend="openai", model="m")) is None  # local servers need none
    with pytest.raises(RuntimeError, match=KEY_ENV):
        api_key(LLMConfig(backend="openai", model="m", api_key_env=KEY_ENV))


def test_retry_after_parsing():
    from baez_ray.llm.backends.openai_backend import backoff, retry_after

    assert retry_after({"retry-after": "0"}) == 0.0
    assert retry_after({"retry-after": "2.5"}) == 2.5
    assert retry_after({"retry-after-ms": "150", "retry-after": "9"}) == pytest.approx(0.15)
    assert retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a date in the past
    assert retry_after({}) is None
    assert backoff(0, {"retry-after": "1000"}) == 120.0
    assert 0.375 <= backoff(0) <= 0.5 and 6.0 <= backoff(10) <= 8.0


# ---- the window stays full across batches ---------------------------------------------


class Window:
    """A chat-completions server whose answers take a variable time (300-930 ms, by the
    prompt); it records the requests in flight after every arrival and every answer."""

    def __init__(self, total: int):
        self.lock = threading.Lock()
        self.total, self.arrived, self.in_flight = total, 0, 0
        self.events: list[tuple[str, int, int]] = []  # (arrive | answer, in flight after, arrived so far)

    def handler(self):
        window = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                content = last_user(body)
                with window.lock:
                    window.arrived += 1
                    window.in_flight += 1
                    window.events.append(("arrive", window.in_flight, window.arrived))
                time.sleep(0.3 + 0.07 * (sum(map(ord, content)) % 10))  # long beside a block's hand-over on a busy machine
                data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer to {content}"}}],
                                   "usage": {"prompt_tokens": 10, "completion_tokens": 3}}).encode()
                with window.lock:  # counted out before the answer leaves: the client cannot send the next one earlier
                    window.in_flight -= 1
                    window.events.append(("answer", window.in_flight, window.arrived))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return H

    def emptied_early(self) -> list[tuple]:
        """Answers after which nothing was in flight although requests were still to come."""
        return [e for e in self.events if e[0] == "answer" and e[1] == 0 and e[2] < self.total]


@pytest.mark.parametrize("kept", [False, True], ids=["ray-data-pool", "kept-pool"])
def test_openai_window_stays_full_across_batches(ray_local, kept):
    """Many small batches through one actor with a window of 6 against answers of 300-930 ms:
    the requests in flight never drop to 0 while requests remain (no batch waits for the
    one before, nor for its own slowest row), never exceed the window, and every row is
    answered once."""
    from contextlib import nullcontext

    from baez_ray.ray_pool import kept_pools

    n = 96
    window = Window(n)
    prompt_rows = [{"request_id": f"r{i}", "messages": [{"role": "user", "content": f"prompt {i}"}], "max_tokens": 8,
                    "temperature": 0.0, "stop": None, "constraint": None} for i in range(n)]
    table = prompt_table(prompt_rows)
    with serve_local(window.handler()) as url, (kept_pools() if kept else nullcontext()):
        cfg = LLMConfig(backend="openai", model="m", base_url=url + "/v1", max_retries=0, timeout_s=30, batch_size=8,
                        max_concurrency=6, num_actors=1)
        ds = ray_local.data.from_arrow([table.slice(i, 16) for i in range(0, n, 16)])  # blocks of 2 batches
        out = generate(ds, cfg).to_pandas()
    out = out.set_index("request_id").loc[[r["request_id"] for r in prompt_rows]].reset_index()
    assert out["error"].isna().all() and (out["answer"] == [f"answer to prompt {i}" for i in range(n)]).all()
    assert window.arrived == n
    assert max(e[1] for e in window.events) <= 6
    assert window.emptied_early() == []
