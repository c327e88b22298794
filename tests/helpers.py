"""What several test modules build: synthetic features tables, a deterministic scorer
(an OpenAI-compatible server on 127.0.0.1), a fake Anthropic API with an outage, and the
CLI run in a subprocess with a private Ray temp dir. Test modules import from here (and
conftest), never from each other (tests/test_layout.py)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pyarrow as pa

from baez_ray import schema
from conftest import build_tiny_gemma, json_handler, our_pids_under

ROOT = Path(__file__).resolve().parents[1]
EXIT_FAILED, EXIT_INVALID = 1, 2

# ------------------------------------------------------------------ features on named words

WORDS = ["alpha", "bravo", "cobalt", "delta", "ember", "falcon", "garnet", "harbor", "indigo", "jasper", "kappa", "lambda"]
FILLER = "the of and to in is was it for on with as his that at by from they this had not are but be".split()


def synthetic_features(n_top: int = 16, n_samples: int = 6, seed: int = 0) -> pa.Table:
    """Feature i fires on the word WORDS[i] (its top token) amid filler words; its decile
    samples repeat two of its top examples (same context and position), which a split must
    never put on both sides."""
    rng = np.random.default_rng(seed)
    rows = []
    for f, word in enumerate(WORDS):
        examples = []
        for r in range(n_top):
            toks = [" " + FILLER[i] for i in rng.integers(0, len(FILLER), 20)]
            t = int(rng.integers(4, 16))
            toks[t] = " " + word
            acts = [0.0] * 20
            acts[t] = float(10 - 0.3 * r)
            acts[t - 1] = 0.5
            examples.append({"kind": "top", "rank": r, "decile": None, "context_id": 1000 * f + r, "position": t, "value": acts[t],
                             "top_index": t, "tokens": None, "token_strs": toks, "acts": acts, "residual": None})
        for s in range(n_samples):
            src = examples[s % 2] if s < 2 else examples[n_top - 1 - s]
            examples.append({**src, "kind": "sample", "rank": s, "decile": 10 - s})
        rows.append({"sae_id": "syn", "model_id": "syn-model", "layer": 3, "feature": f, "n_tokens": 100_000, "n_firing": 200,
                     "max_activation": 10.0, "examples": examples})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


def as_dataset(tests: dict[tuple[str, int], list[dict]]):
    """score_labels' inputs from {(sae_id, feature): test examples}: a Ray Dataset of rows
    (sae_id, feature, examples) and the keys table."""
    import ray

    table = pa.Table.from_pylist([{"sae_id": s, "feature": f, "examples": e} for (s, f), e in sorted(tests.items())])
    return ray.data.from_arrow(table), table.select(["sae_id", "feature"])


# ------------------------------------------------------------------ a deterministic scorer

class Scorer:
    """An OpenAI-compatible chat server that answers like a perfect reader of labels:
    detection: 1 when the label's word is in the excerpt; fuzz: 1 when it is inside << >>.
    Explainer prompts (eleuther) get the most frequent marked word as the label. Labels
    with 'kappa' get an unreadable answer on their first try; 'lambda' always."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []

    def answer(self, body: dict) -> str:
        msgs = body["messages"]
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
        user = [m["content"] for m in msgs if m["role"] == "user"]
        if "[EXPLANATION]" in system:  # an explainer prompt: name the most marked word
            marked = Counter(w.strip().lower() for w in re.findall(r"<<(.*?)>>", user[-1]))
            return f"The marked tokens are one word.\n[EXPLANATION]: {marked.most_common(1)[0][0] if marked else 'unknown'}"
        first = user[0]
        label = re.search(r"^Label: (.*)$", first, re.M).group(1).strip().lower()
        excerpts = re.findall(r"^Excerpt \d+: (.*)$", first, re.M)
        retry = len(user) > 1
        if "lambda" in label or ("kappa" in label and not retry):
            return f"I am not sure, maybe [{','.join('1' * (len(excerpts) + 1))}]"
        if "Excerpt" in first and "<<" in first and "marked at random" in system:
            vals = [int(any(label in m.lower() for m in re.findall(r"<<(.*?)>>", e))) for e in excerpts]
        else:
            vals = [int(label in e.lower()) for e in excerpts]
        return json.dumps(vals)

    def handler(self):
        def respond(body: dict) -> dict:
            with self.lock:
                self.requests.append(body)
            return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": self.answer(body)}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}

        return json_handler(respond)


def scorer_cfg(server) -> dict:
    return {"backend": "openai", "model": "fake-scorer", "base_url": server.url, "batch_size": 16, "max_concurrency": 8,
            "max_retries": 1, "timeout_s": 10, "price": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}


# ------------------------------------------------------------------ an Anthropic API with an outage

KEY = "sk-faults-test-key-0123456789"
KEY_ENV = "BAEZ_FAULTS_API_KEY"
TAG = re.compile(r"zq(\d+)x")
TAG_WORDS = "the a cat dog sat ran on in under over big small red blue green old new".split()


class Outage:
    """A fake Anthropic Messages API: while `down`, every request that shows an example
    of a feature in `failing` gets 529 Overloaded; every request is logged."""

    def __init__(self, failing: set[int]):
        self.failing, self.down = failing, True
        self.lock = threading.Lock()
        self.log: list[tuple[int, int]] = []  # (feature, status)

    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if code != 200:
                    self.send_header("retry-after", "0")
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
                text = " ".join(m["content"] for m in body["messages"] if isinstance(m["content"], str))
                feats = {int(t) for t in TAG.findall(text)}
                assert len(feats) == 1, text
                (f,) = feats
                code = 529 if fake.down and f in fake.failing else 200
                with fake.lock:
                    fake.log.append((f, code))
                if code == 529:
                    return self.send(529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
                self.send(200, {"id": f"msg_{f}", "type": "message", "role": "assistant", "model": body["model"],
                                "content": [{"type": "text", "text": f"The examples share a word.\n[EXPLANATION]: the word zq{f}x"}],
                                "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 200, "output_tokens": 12}})

        return Handler


def tagged_features(n: int) -> pa.Table:
    """n features; each fires on its own tag token `zq<f>x` amid random words (so the
    windows differ and the feature is not tier 1)."""
    rng = random.Random(0)
    rows = []
    for f in range(n):
        ex = []
        for r in range(6):
            toks = [" " + rng.choice(TAG_WORDS) for _ in range(5)] + [f" zq{f}x"] + [" " + rng.choice(TAG_WORDS) for _ in range(4)]
            acts = [0.0] * len(toks)
            acts[5] = 4.0 - 0.3 * r
            ex.append({"kind": "top", "rank": r, "value": acts[5], "top_index": 5, "token_strs": toks, "acts": acts})
        rows.append({"sae_id": "fake", "model_id": "fake", "layer": 3, "feature": f, "n_tokens": 1000, "n_firing": 6,
                     "max_activation": 4.0, "examples": ex})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


# ------------------------------------------------------------------ the CLI in a subprocess

def cli(*args, env: dict | None = None, cwd: Path = ROOT) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`baez-ray ARGS` with Ray's temp dir in a private folder; returns the result and what
    Ray left there (the entries of that folder: empty when no cluster was started)."""
    ray_tmp = tempfile.mkdtemp(prefix="bpf", dir="/tmp")
    full = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ANTHROPIC_API_KEY")}
    full.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", RAY_TMPDIR=ray_tmp, **(env or {}))
    try:
        res = subprocess.run([sys.executable, "-m", "baez_ray.cli", *args], capture_output=True, text=True, cwd=cwd, env=full, timeout=300)
        left = sorted(os.listdir(ray_tmp)) + [f"pid {p}" for p in our_pids_under(ray_tmp)]
    finally:
        subprocess.run(["rm", "-rf", ray_tmp])
    return res, left


# ------------------------------------------------------------------ a tiny chat model

CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def tiny_chat_model(path: Path) -> Path:
    """The tiny random Gemma of conftest with a chat template, so that it can stand in for
    an explainer (its answers are noise: labels fail to parse, deterministically)."""
    from transformers import AutoTokenizer

    build_tiny_gemma(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def guard_driver(monkeypatch, forbidden: set[str]) -> None:
    """From here on, a Parquet read in this process must name its columns, none of them in
    `forbidden`, and no Ray Data batch holding one of them may reach it: the driver keeps
    counters, never examples, prompts, answers or vectors."""
    import pyarrow.parquet as pq
    import ray

    real_read, real_iter = pq.read_table, ray.data.Dataset.iter_batches

    def read_table(source, *args, columns=None, **kwargs):
        assert columns is not None and not set(columns) & forbidden, f"the driver read {columns or 'every column'} of {source}"
        return real_read(source, *args, columns=columns, **kwargs)

    def iter_batches(self, *args, **kwargs):
        for b in real_iter(self, *args, **kwargs):
            names = set(b.column_names if isinstance(b, pa.Table) else b.keys() if isinstance(b, dict) else b.columns)
            assert not names & forbidden, f"a batch with {sorted(names & forbidden)} reached the driver"
            yield b

    monkeypatch.setattr(pq, "read_table", read_table)
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", iter_batches)
