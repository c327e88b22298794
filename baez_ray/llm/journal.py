"""Answers already paid for, kept in the run directory until the run ends, so that a
request sent again (its actor's node was lost, or the run was killed and rerun) is not
asked, nor paid for, twice.

    jobs.execute: with journal.kept_in(<run>/answers):     # the driver names the folder
    backend.generate: kwargs["journal"] = journal.root()   # ... the API callers get it
    caller.__call__:  ask = journal.asking_once(root, model, self.ask_once)   # then ask(row) per row

One file per answer received without error, `<run>/answers/<k[:2]>/<k>.json`, named by a
digest `k` of what was asked (the model, the request id, the messages and the sampling
settings: each try of a row asked again until its answer parses is a request of its own),
written whole (a temporary file renamed) and fsync'd off the actor's event loop. A request
is looked up by its own digest, whatever batch it travels in: after a lost node Ray Data
may rebuild the blocks of a stage, and cut them into other batches. The folder is shared
storage on a cluster: the restarted actor on another node reads it. It is removed when the
run finishes. Without a folder (a backend used directly) every request is asked.

The anthropic Message Batches mode (run by the driver) keeps the id of each batch it
submits there (`submitted`, `record`): a rerun after its driver was killed waits on the
batch already paid for instead of submitting it again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Awaitable, Callable

DIR = "answers"

_root: str | None = None


@contextmanager
def kept_in(folder: Path):
    """Within: the API callers keep their answers in `folder` (the driver's side)."""
    global _root
    before, _root = _root, str(folder)
    try:
        yield
    finally:
        _root = before


def root() -> str | None:
    """The folder of the job running in this process (None: none)."""
    return _root


def _key(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()


REQUEST = ("request_id", "messages", "max_tokens", "temperature", "stop", "constraint")  # what a request asks


def _path(folder: str, model: str, row: dict) -> Path:
    k = _key({"model": model, **{c: row.get(c) for c in REQUEST}})
    return Path(folder) / k[:2] / f"{k}.json"


def known(folder: str, model: str, row: dict) -> tuple | None:
    """The answer this request got before (None: it is to be asked)."""
    try:
        return tuple(json.loads(_path(folder, model, row).read_text(encoding="utf-8")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def keep(folder: str, model: str, row: dict, got: tuple) -> None:
    """Keep an answer received without error (its 4th element None), whole and fsync'd."""
    if got[3] is not None:
        return
    path = _path(folder, model, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(list(got)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def asking_once(folder: str | None, model: str, ask: Callable[[dict], Awaitable[tuple]]) -> Callable[[dict], Awaitable[tuple]]:
    """`ask` (an async API caller's one request) answered from the folder when the same
    request was answered before; an answer received is kept there (both off the event
    loop: file reads, an fsync)."""
    if folder is None:
        return ask

    async def once(row: dict) -> tuple:
        got = await asyncio.to_thread(known, folder, model, row)
        if got is None:
            got = await ask(row)
            await asyncio.to_thread(keep, folder, model, row, got)
        return got

    return once


def submitted(folder: str | None, requests: list[dict]) -> tuple[Path | None, str | None]:
    """A Message Batch (anthropic `mode: batches`, submitted by the driver) already sent for
    exactly these requests by an earlier attempt of the run (its driver was killed while it
    waited): (where its id is kept, the id or None)."""
    if folder is None:
        return None, None
    path = Path(folder) / f"batch-{_key({'requests': requests})[:40]}.json"
    return path, json.loads(path.read_text())["id"] if path.exists() else None


def record(path: Path | None, batch_id: str) -> None:
    """Keep a submitted batch's id (`submitted`), fsync'd."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": batch_id}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
