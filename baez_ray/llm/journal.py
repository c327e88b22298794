"""Answers already paid for, kept in the run directory until the run ends, so that a batch
sent again (its actor's node was lost, or the run was killed and rerun) does not ask, and
pay for, the answers it already got.

    jobs.execute: with journal.kept_in(<run>/answers):     # the driver names the folder
    backend.generate: kwargs["journal"] = journal.root()   # ... the API callers get it
    caller.__call__:  ask = journal.asking_once(root, rows, self.ask_once)   # then ask(row) per row

Per batch of prompt rows, one file `<run>/answers/<digest>.jsonl`, named by a digest of the
batch's rows (request id and request: a retried batch has the same rows, so the same
file); a line per answer received (the request gave no error; each try of a row that is
asked again until its answer parses is a line of its own), written and fsync'd as it comes
(the folder is shared storage on a cluster: the restarted actor on another node reads
it). A row whose answer is in the file is answered from it; the others are asked. The
folder is removed when the run finishes. Without a folder (a backend used directly) every
row is asked.

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


class Kept:
    """One batch's file of answers received (no file without a folder: every row asked)."""

    def __init__(self, folder: str | None, rows: list[dict]):
        self.path, self.known, self.lock = None, {}, threading.Lock()
        if folder is None or not rows:
            return
        keys = "".join(_key(r) for r in rows)
        self.path = Path(folder) / f"{hashlib.sha256(keys.encode()).hexdigest()[:40]}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.known = _read(self.path)

    def get(self, row: dict) -> tuple | None:
        """The answer this row got before (None: it is to be asked)."""
        got = self.known.get(_key(row)) if self.path is not None else None
        return tuple(got) if got is not None else None

    def put(self, row: dict, got: tuple) -> None:
        """Keep an answer received without error (its 4th element None), fsync'd."""
        if self.path is None or got[3] is not None:
            return
        # a line of its own even after a line cut short by a killed process
        line = "\n" + json.dumps({"key": _key(row), "answer": list(got)}) + "\n"
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def asking_once(folder: str | None, rows: list[dict], ask: Callable[[dict], Awaitable[tuple]]) -> Callable[[dict], Awaitable[tuple]]:
    """`ask` (an async API caller's one request) answered from the file of the batch of
    `rows` when the row was answered before; an answer received is added to it (off the
    event loop: an fsync). Every try of a row (`backends.ask_until`) is a row of its own."""
    kept = Kept(folder, rows)
    if kept.path is None:
        return ask

    async def once(row: dict) -> tuple:
        got = kept.get(row)
        if got is None:
            got = await ask(row)
            await asyncio.to_thread(kept.put, row, got)
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


def _read(path: Path) -> dict[str, list]:
    """The answers in a batch's file (a line cut short by a killed process is skipped)."""
    known: dict[str, list] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            known[entry["key"]] = entry["answer"]
    return known
