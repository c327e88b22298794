"""ingest: a small Neuronpedia export with malformed lines of every kind, through the real
job (Ray Data, Parquet out); the features table must hold every valid row exactly."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.config import ConfigError, validate
from baez_ray.jobs import execute
from baez_ray.stages.ingest import IngestError

A = ("gemma-3-27b-it", "41-gemmascope-2-res-262k")
B = ("gemma-2-2b", "5-res-jb")
TOP_K = 3
WORDS = ["the", " cat", " sat", " on", " a", " mat", "\n", " é", "<bos>", " 42"]


def _line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def _activation(rng, pair, index, max_value, n_tokens=None, top=None, as_int=False):
    n = n_tokens or rng.randint(3, 9)
    top = rng.randrange(n) if top is None else top
    values = [round(rng.uniform(0, max_value * 0.9), 4) for _ in range(n)]
    values[top] = max_value
    return {
        "id": f"act-{rng.random()}", "modelId": pair[0], "layer": pair[1], "index": index if as_int else str(index),
        "tokens": [rng.choice(WORDS) for _ in range(n)], "values": values, "maxValue": max_value,
        "maxValueTokenIndex": top, "minValue": 0.0, "dataIndex": None, "binMin": -1, "lossValues": [],
    }


def _feature_row(pair, index, pos, neg):
    return {
        "modelId": pair[0], "layer": pair[1], "index": str(index), "frac_nonzero": 0.001, "maxActApprox": 9.0,
        "pos_str": [t for t, _ in pos], "pos_values": [v for _, v in pos],
        "neg_str": [t for t, _ in neg], "neg_values": [v for _, v in neg], "topkCosSimIndices": [1, 2],
    }


def _explanation(pair, index, text):
    return {"id": f"e-{text}", "modelId": pair[0], "layer": pair[1], "index": str(index), "description": text,
            "authorId": "x", "typeName": "oai_token-act-pair", "explanationModelName": "gpt-4o-mini"}


def _corrupt_member(lines: list[bytes]) -> bytes:
    """A gzip member whose deflate data is damaged right after the header."""
    good = gzip.compress(b"".join(lines))
    return good[:15] + bytes(b ^ 0xFF for b in good[15:25]) + good[25:]


def make_export(root: Path) -> dict:
    """Write an export under `root`; return what ingest must make of it."""
    rng = random.Random(0)
    files: dict[str, list[bytes]] = {}  # source → lines (as written, in order)
    expected_rejects: list[tuple[str, int, str]] = []  # (source, line, reason prefix)
    valid_acts: list[tuple[int, int, dict]] = []  # (file order, line, row)

    def add(source, line: bytes, reject: str | None = None, row=None, file_order=None):
        files.setdefault(source, []).append(line)
        n = len(files[source])
        if reject:
            expected_rejects.append((source, n, reject))
        if row is not None:
            valid_acts.append((file_order, n, row))

    # activations over two files; (pair, index) → maxValues of its rows
    plan = {
        (A, 0): [5.0, 7.5, 1.25, 3.0, 7.5],  # 5 rows (> top_k), a tie at the top across files
        (A, 7): [2.0, 0.5],
        (A, 12345): [9.0, 4.0, 6.0, 1.0],
        (B, 0): [3.5],
        (B, 3): [0.75, 8.0, 2.5],
    }
    for (pair, index), maxes in plan.items():
        for j, mv in enumerate(maxes):
            part = j % 2
            row = _activation(rng, pair, index, mv, as_int=(index == 7))
            add(f"activations/batch-{part}.jsonl.gz", _line(row), row=row, file_order=part)

    base = _activation(rng, A, 7, 1.5, n_tokens=4, top=1)
    src0 = "activations/batch-0.jsonl.gz"
    add(src0, b'{"modelId": "gemma-3-27b-it", "layer": \n', "bad json")
    add(src0, b"\n")  # blank: skipped, not a reject
    add(src0, _line({k: v for k, v in base.items() if k != "values"}), "missing key")
    add(src0, _line({**base, "values": "0.1,1.5,0.2,0.3"}), "wrong type")
    add(src0, _line({**base, "tokens": ["a", 3, "b", "c"]}), "wrong type")
    add(src0, _line({**base, "index": "seven"}), "bad index")
    add(src0, _line({**base, "layer": "res-jb"}), "bad layer")
    add(src0, _line({**base, "tokens": base["tokens"][:3]}), "length mismatch")
    add(src0, _line({**base, "values": [0.1, float("nan"), 0.2, 0.3], "maxValue": 0.3, "maxValueTokenIndex": 3}), "non-finite value")
    add(src0, _line({**base, "maxValue": float("inf")}), "non-finite value")
    add(src0, _line({**base, "tokens": [], "values": []}), "empty tokens")
    add(src0, _line({**base, "maxValueTokenIndex": 4}), "bad maxValueTokenIndex")
    add(src0, _line({**base, "maxValueTokenIndex": 0}), "inconsistent maxValue")
    add(src0, _line({**base, "values": [0.1, 1.5, 3.0, 0.2]}), "bad maxValueTokenIndex")  # top is not the max
    add(src0, _line({**base, "values": [0.1, 1.5, 1e39, 10**400]}), "non-finite value")  # beyond float32
    add(src0, _line([1, 2, 3]), "wrong type")
    add(src0, b'{"modelId": "\xff\xfe"}\n', "bad utf-8")
    long_bad = b'{"modelId": "' + b"x" * 2000
    add(src0, long_bad + b"\n", "bad json")

    # features: one per (pair, index) except (A, 7); explanations for some
    pos_neg = {}
    for pair, index in [(A, 0), (A, 12345), (B, 0), (B, 3)]:
        pos = [(rng.choice(WORDS), round(rng.uniform(0.5, 2), 3)) for _ in range(3)]
        neg = [(rng.choice(WORDS), round(-rng.uniform(0.5, 2), 3)) for _ in range(2)]
        pos_neg[(pair, index)] = (pos, neg)
        add("features/batch-0.jsonl.gz", _line(_feature_row(pair, index, pos, neg)))
    add("features/batch-0.jsonl.gz", _line({**_feature_row(A, 1, [("a", 1.0)], []), "pos_values": [1.0, 2.0]}), "length mismatch")
    add("features/batch-0.jsonl.gz", _line({k: v for k, v in _feature_row(A, 1, [], []).items() if k != "neg_str"}), "missing key")
    explanations = {(A, 0): ["cats on mats", "the word 'sat'"], (B, 3): ["numbers"], (B, 99): ["a feature with no activations"]}
    for (pair, index), texts in explanations.items():
        for t in texts:
            add("explanations/batch-0.jsonl.gz", _line(_explanation(pair, index, t)))
    add("explanations/batch-0.jsonl.gz", _line({**_explanation(A, 0, "x"), "description": None}), "wrong type")

    for source, lines in files.items():
        path = root / source
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(b"".join(lines)))
    # batch-1 ends with a damaged gzip member: its lines before it are kept
    src1 = "activations/batch-1.jsonl.gz"
    n1 = len(files[src1])
    with open(root / src1, "ab") as f:
        f.write(_corrupt_member([_line(_activation(rng, B, 3, 50.0)) for _ in range(5)]))
    expected_rejects.append((src1, n1 + 1, "unreadable gzip"))
    (root / "README.txt").write_text("not part of the export")

    return {
        "files": files, "rejects": expected_rejects, "acts": valid_acts, "pos_neg": pos_neg,
        "explanations": explanations, "plan": plan,
    }


def expected_features(exp: dict, top_k: int, keep=lambda pair: True) -> dict:
    out = {}
    keys = {(r["modelId"], r["layer"], int(r["index"])) for _, _, r in exp["acts"]}
    keys |= {(p[0], p[1], i) for p, i in exp["pos_neg"]} | {(p[0], p[1], i) for p, i in exp["explanations"]}
    for key in keys:
        pair = key[:2]
        if not keep(pair):
            continue
        rows = sorted(
            [(f, ln, r) for f, ln, r in exp["acts"] if (r["modelId"], r["layer"], int(r["index"])) == key],
            key=lambda t: (-t[2]["maxValue"], t[0], t[1]),
        )
        pos, neg = exp["pos_neg"].get((pair, key[2]), (None, None))
        out[(f"{key[0]}/{key[1]}", key[2])] = {
            "model_id": key[0],
            "layer": int(key[1].split("-")[0]),
            "max_activation": np.float32(max((max(r["values"]) for _, _, r in rows), default=0.0)),
            "examples": [
                {"value": np.float32(r["values"][r["maxValueTokenIndex"]]), "top_index": r["maxValueTokenIndex"],
                 "token_strs": r["tokens"], "acts": np.float32(r["values"]).tolist()}
                for _, _, r in rows[:top_k]
            ],
            "pos_tokens": [t for t, _ in pos] if pos else None,
            "pos_values": np.float32([v for _, v in pos]).tolist() if pos else None,
            "neg_tokens": [t for t, _ in neg] if neg else None,
            "neg_values": np.float32([v for _, v in neg]).tolist() if neg else None,
            "source_explanations": exp["explanations"].get((pair, key[2]), []),
        }
    return out


def _on_disk(t: pa.DataType) -> pa.DataType:
    """`t` as Parquet stores it: list children are named "element" (the compliant layout)."""
    if pa.types.is_list(t):
        return pa.list_(pa.field("element", _on_disk(t.value_type), t.value_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([f.with_type(_on_disk(f.type)) for f in t])
    return t


def read_table(run_dir: Path, name: str):
    """The table's parts, each checked against its schema (names, types, nullability, metadata)."""
    parts = sorted((run_dir / name).glob("*.parquet"))
    assert parts, f"no parts in {run_dir / name}"
    want = pa.schema([f.with_type(_on_disk(f.type)) for f in schema.TABLES[name]], metadata=schema.TABLES[name].metadata)
    for p in parts:
        assert pq.read_schema(p).equals(want, check_metadata=True), p
    return pq.read_table(run_dir / name, schema=schema.TABLES[name])


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("np_export")
    return root, make_export(root)


def run_ingest(root: Path, out: Path, **ingest):
    spec = validate({"job": "ingest", "name": "t", "ingest": {"path": str(root), "top_k": TOP_K, **ingest}})
    return execute(spec, out=out)


@pytest.mark.slow
def test_ingest_export(ray_local, export, tmp_path):
    root, exp = export
    run = run_ingest(root, tmp_path / "run")

    table = read_table(run.dir, "features")
    got = {(r["sae_id"], r["feature"]): r for r in table.to_pylist()}
    want = expected_features(exp, TOP_K)
    assert set(got) == set(want)
    for key, w in want.items():
        g = got[key]
        assert g["model_id"] == w["model_id"] and g["layer"] == w["layer"], key
        assert g["n_tokens"] == 0 and g["n_firing"] == 0
        assert np.float32(g["max_activation"]) == w["max_activation"], key
        assert len(g["examples"]) == len(w["examples"]) <= TOP_K, key
        for rank, (ge, we) in enumerate(zip(g["examples"], w["examples"])):
            assert ge["kind"] == "top" and ge["rank"] == rank
            assert np.float32(ge["value"]) == we["value"] and ge["top_index"] == we["top_index"], (key, rank)
            assert ge["token_strs"] == we["token_strs"] and ge["acts"] == we["acts"], (key, rank)
            assert ge["tokens"] is None and ge["context_id"] is None and ge["position"] is None
            assert ge["decile"] is None and ge["residual"] is None
        for col in ("pos_tokens", "pos_values", "neg_tokens", "neg_values", "source_explanations"):
            assert g[col] == w[col], (key, col)

    # spot checks of the join and the order, independent of expected_features
    a0 = got[(f"{A[0]}/{A[1]}", 0)]
    assert [e["value"] for e in a0["examples"]] == [7.5, 7.5, 5.0]  # 5 rows cut to top_k; tie in file order
    assert a0["layer"] == 41 and a0["source_explanations"] == ["cats on mats", "the word 'sat'"]
    assert got[(f"{A[0]}/{A[1]}", 7)]["pos_tokens"] is None  # int index joined; no feature row
    only_expl = got[(f"{B[0]}/{B[1]}", 99)]
    assert only_expl["examples"] == [] and only_expl["max_activation"] == 0.0 and only_expl["layer"] == 5

    # rejects: every malformed line, with its file, line and reason
    rejects = sorted(read_table(run.dir, "rejects").to_pylist(), key=lambda r: (r["source"], r["line"]))
    want_rejects = sorted(exp["rejects"])
    assert [(r["source"], r["line"]) for r in rejects] == [(s, n) for s, n, _ in want_rejects]
    for r, (source, line, reason) in zip(rejects, want_rejects):
        assert r["reason"].startswith(reason + ":"), (r, reason)
        if reason != "unreadable gzip":
            raw = exp["files"][source][line - 1].rstrip(b"\n").decode("utf-8", "replace")
            assert r["record"] == raw[:500]
    assert any(len(r["record"] or "") == 500 for r in rejects)  # the long line, truncated

    # counts in the manifest
    info = json.loads((run.dir / "manifest.json").read_text())["stages"]["ingest"]
    n_blank = sum(1 for lines in exp["files"].values() for ln in lines if not ln.strip())
    assert info["files"] == 4
    assert info["lines_read"] == sum(len(v) for v in exp["files"].values())
    assert info["blank_lines"] == n_blank == 1
    assert info["activation_rows"] == len(exp["acts"]) == 15
    assert info["feature_rows"] == 4 and info["explanation_rows"] == 4
    assert info["rejected"] == len(exp["rejects"]) and info["filtered_out"] == 0
    assert info["features_written"] == len(want) == 6
    assert info["rejects_by_reason"]["bad json"] == 2 and info["rejects_by_reason"]["unreadable gzip"] == 1


@pytest.mark.slow
def test_same_table_for_any_chunking(ray_local, export, tmp_path, monkeypatch):
    """Rows of one feature spread over many parse chunks and shuffle partitions: same table."""
    import baez_ray.stages.ingest as ingest

    root, exp = export
    monkeypatch.setattr(ingest, "CHUNK_ROWS", 2)
    monkeypatch.setattr(ingest, "PARTITION_BYTES", 1024)
    monkeypatch.setattr(ingest, "FEATURES_PER_FILE", 1)  # each partition's rows in their own part
    run = run_ingest(root, tmp_path / "run")
    assert len(list((run.dir / "features").glob("*.parquet"))) > 1  # several partitions written
    got = sorted(read_table(run.dir, "features").to_pylist(), key=lambda r: (r["sae_id"], r["feature"]))
    want = expected_features(exp, TOP_K)
    assert [(r["sae_id"], r["feature"]) for r in got] == sorted(want)
    for r in got:
        w = want[(r["sae_id"], r["feature"])]
        assert [e["acts"] for e in r["examples"]] == [e["acts"] for e in w["examples"]]
        assert r["source_explanations"] == w["source_explanations"] and r["pos_tokens"] == w["pos_tokens"]


@pytest.mark.slow
def test_ingest_filters_and_resume(ray_local, export, tmp_path):
    root, exp = export
    run = run_ingest(root, tmp_path / "run", model_id=B[0], layer=B[1], top_k=TOP_K)
    table = read_table(run.dir, "features")
    assert sorted(zip(table.column("sae_id").to_pylist(), table.column("feature").to_pylist())) == sorted(
        expected_features(exp, TOP_K, keep=lambda pair: pair == B)
    )
    info = json.loads((run.dir / "manifest.json").read_text())["stages"]["ingest"]
    assert info["features_written"] == 3
    assert info["activation_rows"] == 4 and info["filtered_out"] == 15 - 4 + 2 + 2  # acts, features, explanations of A

    # the same spec in the same directory: the finished stage is not redone
    again = run_ingest(root, tmp_path / "run", model_id=B[0], layer=B[1], top_k=TOP_K)
    manifest = json.loads((again.dir / "manifest.json").read_text())
    assert manifest["attempts"] == 2 and manifest["stages"]["ingest"] == info


def test_missing_export_is_a_clear_error(tmp_path):
    # no Ray needed: the directory is checked before anything starts
    missing = tmp_path / "no-such-export"
    with pytest.raises(IngestError, match=r"no-such-export: no such directory"):
        run_ingest(missing, tmp_path / "run1")
    (tmp_path / "empty" / "activations").mkdir(parents=True)
    (tmp_path / "empty" / "features").mkdir()
    with pytest.raises(ValueError, match=r"empty: no activation files"):
        run_ingest(tmp_path / "empty", tmp_path / "run2")
    manifest = json.loads((tmp_path / "run2" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "no activation files" in manifest["stages"]["ingest"]["error"]


@pytest.mark.slow
def test_ingest_sources_several_exports_in_one_job(ray_local, export, tmp_path):
    """`ingest.sources`: two exports (here two copies of one), each kept to one of its
    model/source pairs: one features table with both pairs, as the whole export gives, and
    the rejects named by export."""
    root, exp = export
    other = tmp_path / "copy"
    shutil.copytree(root, other)
    spec = validate({"job": "ingest", "name": "t", "ingest": {"top_k": TOP_K, "sources": [
        {"path": str(root), "model_id": A[0], "layer": A[1]}, {"path": str(other), "model_id": B[0], "layer": B[1]}]}})
    run = execute(spec, out=tmp_path / "run")
    got = {(r["sae_id"], r["feature"]): r for r in read_table(run.dir, "features").to_pylist()}
    want = expected_features(exp, TOP_K)
    assert set(got) == set(want) and {r["layer"] for r in got.values()} == {41, 5}
    for key, w in want.items():
        assert [e["acts"] for e in got[key]["examples"]] == [e["acts"] for e in w["examples"]], key
    sources = {r["source"] for r in read_table(run.dir, "rejects").to_pylist()}
    assert sources and all(s.startswith((f"{root}/", f"{other}/")) for s in sources), sources
    info = json.loads((run.dir / "manifest.json").read_text())["stages"]["ingest"]
    assert info["files"] == 8 and info["activation_rows"] == 15
    with pytest.raises(ConfigError, match="with ingest.sources, give them per source"):
        validate({"job": "ingest", "ingest": {"sources": [{"path": str(root)}], "layer": A[1]}})
