"""Corpus reading: contexts, held-out slices, and clear errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from baez_ray.config import CorpusConfig
from baez_ray.data.corpus import CorpusError, iter_contexts, write_contexts
from conftest import make_text


@pytest.fixture(scope="module")
def tok(tiny_gemma):
    return AutoTokenizer.from_pretrained(tiny_gemma)


def test_contexts_from_txt_jsonl_parquet(tmp_path, tok):
    import pyarrow as pa

    (tmp_path / "a.txt").write_text(make_text(100, 1))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": make_text(50, 2)}) + "\n\n" + json.dumps({"text": make_text(50, 3)}))
    pq.write_table(pa.table({"text": [make_text(60, 4)]}), tmp_path / "c.parquet")
    cfg = CorpusConfig(paths=[str(tmp_path / "*")], context_len=16)
    ctxs = list(iter_contexts(cfg, tok))
    stream = np.concatenate([c[1:] for c in ctxs])
    docs = [make_text(100, 1), make_text(50, 2), make_text(50, 3), make_text(60, 4)]
    expected = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs])
    assert all(len(c) == 16 and c[0] == tok.bos_token_id for c in ctxs)
    assert np.array_equal(stream, expected[: len(stream)]) and len(expected) - len(stream) < 15
    # held-out slice: skip_tokens drops exactly that many tokens from the stream
    later = list(iter_contexts(CorpusConfig(paths=[str(tmp_path / "*")], context_len=16, skip_tokens=30), tok))
    assert np.array_equal(np.concatenate([c[1:] for c in later]), expected[30 : 30 + 15 * len(later)])
    # max_tokens bounds the contexts; the written table has sequential ids
    n = write_contexts(CorpusConfig(paths=[str(tmp_path / "*")], context_len=16, max_tokens=64), tok, tmp_path / "ctx")
    t = pq.read_table(tmp_path / "ctx")
    assert n == 4 and t.column("context_id").to_pylist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "name,data,message",
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"  \n\n ", "empty"),
        ("bin.txt", b"abc\x00\x01\x02def", "binary file"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8 text"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", b'{"body": "x"}\n', "no string field 'text'"),
    ],
)
def test_bad_corpus_files_are_named(tmp_path, tok, name, data, message):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(CorpusError, match=message) as e:
        list(iter_contexts(CorpusConfig(paths=[str(p)], context_len=16), tok))
    assert name in str(e.value)


def test_missing_and_too_short(tmp_path, tok):
    with pytest.raises(CorpusError, match="no such corpus file"):
        list(iter_contexts(CorpusConfig(paths=[str(tmp_path / "nope.txt")]), tok))
    with pytest.raises(CorpusError, match="matched no files"):
        list(iter_contexts(CorpusConfig(paths=[str(tmp_path / "*.txt")]), tok))
    (tmp_path / "short.txt").write_text("the cat")
    with pytest.raises(CorpusError, match="no context of 128 tokens"):
        write_contexts(CorpusConfig(paths=[str(tmp_path / "short.txt")]), tok, tmp_path / "ctx")
