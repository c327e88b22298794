"""Shared fixtures: a real local Ray cluster, a tiny random Gemma3 with a real (small,
trained-in-test) BPE tokenizer, and a random sae-lens SAE saved to disk; helpers to serve
a fake API on 127.0.0.1 and to find the processes a test left behind."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
from pathlib import Path

import pytest

WORDS = (
    "the cat sat on a mat and the dog ran to the park while birds sang in green trees "
    "numbers like one two three four five six seven eight nine ten appear in lists "
    "code such as def return import class for while if else prints values "
    "rivers flow into seas under bright moons over quiet towns near old bridges"
).split()


@contextlib.contextmanager
def serve_local(handler):
    """Serve `handler` (a BaseHTTPRequestHandler class) on 127.0.0.1 in a thread; yields
    the base URL `http://127.0.0.1:PORT`."""
    import threading
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


class RecordingServer:
    """A fake chat-completions server that keeps every request body and answers it with
    the subclass's `completion(body)`; `handler()` is its class for `serve_local`."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.requests: list[dict] = []

    def handler(self):
        def respond(body: dict) -> dict:
            with self.lock:
                self.requests.append(body)
            return self.completion(body)

        return json_handler(respond)


def json_handler(respond):
    """A BaseHTTPRequestHandler class whose POSTs answer `respond(json body)` as JSON (200)."""
    import json
    from http.server import BaseHTTPRequestHandler

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            payload = json.dumps(respond(json.loads(self.rfile.read(int(self.headers["content-length"]))))).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return H


def our_pids_under(path: str) -> list[int]:
    """PIDs of this user's processes (not this one) whose command line, environment or
    working directory mentions `path`: the processes of a Ray session started with its temp
    dir there (RAY_TMPDIR=path, workers included)."""
    pids, me, needle = [], os.getuid(), path.encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if d.stat().st_uid != me:
                continue
            seen = (d / "cmdline").read_bytes() + b"\0" + (d / "environ").read_bytes()
            try:
                seen += b"\0" + os.readlink(d / "cwd").encode()
            except OSError:
                pass
        except OSError:
            continue
        if needle in seen:
            pids.append(int(d.name))
    return pids


def make_text(n_words: int, seed: int) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


def pytest_collection_modifyitems(items):
    """The tests marked `slow` (whole jobs through the CLI, ~1-3 min each) run first: with
    two workers (`make test`) a long test started last would run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def build_tiny_gemma(path: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A 2-layer random Gemma3 with a 300-token BPE tokenizer trained on WORDS."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.train_from_iterator([make_text(200, s) for s in range(50)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
        sliding_window=16, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
    )
    model = Gemma3ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def build_random_sae(path: Path, d_in: int = 64, d_sae: int = 96, seed: int = 0) -> Path:
    """A JumpReLU SAE with random weights and small thresholds: sparse but firing."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.1)
        sae.threshold.copy_(torch.rand(d_sae) * 0.5 + 0.5)
    sae.save_model(path)
    return path


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny_gemma"))


@pytest.fixture(scope="session")
def random_sae(tmp_path_factory) -> Path:
    return build_random_sae(tmp_path_factory.mktemp("sae"))


@pytest.fixture(scope="module")
def scorer_server():
    from helpers import Scorer

    fake = Scorer()
    with serve_local(fake.handler()) as url:
        fake.url = url + "/v1"
        yield fake
