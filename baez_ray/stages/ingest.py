"""ingest: read a Neuronpedia bulk export into the features table.

An export is a folder with `features/`, `activations/` and `explanations/`, each holding
`batch-N.jsonl.gz` files (only `activations/` is required). Rows are joined on
(modelId, layer, index): `layer` is a Neuronpedia source id such as
"41-gemmascope-2-res-262k" (the table's integer layer is its leading number) and `index`
is the feature number, a string in the export (ints are accepted too).

Path of the data:

    export files ──ray.data.from_items (one block per file)──▶ map_batches(parse_file)
        ──▶ RECORDS rows: one per valid line (kind activation | feature | explanation),
            one per rejected line (kind reject), one summary per file (kind file)
        ──materialize──┬─▶ kind reject ──▶ rejects/ (schema.REJECTS)
                       ├─▶ kind file ──▶ counts in the manifest
                       └─▶ groupby(model_id, layer, feature).map_groups(build_feature)
                               ──▶ features/ (schema.FEATURES)

Per feature: `examples` are its activation rows sorted by maxValue (descending; ties in
file and line order), the first `top_k`, all of kind "top"; `value` is the activation at
`maxValueTokenIndex`; token ids, context ids, positions, deciles and residuals are unknown
(null). `max_activation` is the largest activation of any of its rows (0 for a feature
with no activation rows). `pos_*`/`neg_*` come from its feature row (the first one, if the
export repeats it) and `source_explanations` are all its explanation descriptions in file
order. `n_tokens` and `n_firing` are 0: feature rows carry `frac_nonzero`, but not the
number of tokens it is a fraction of, so no count can be derived. Every key seen in any of
the three folders gives a feature row.

`ingest.model_id` / `ingest.layer`, when set, keep only the rows of that modelId / source
id (the others are counted as filtered out, not rejected). `ingest.sources` lists several
exports or model/source pairs (Neuronpedia exports one folder per model and source: one
per layer) with a filter each; every folder is read once, keeping the rows that match
any of its sources, and all go into the one features table (one `sae_id`,
`<modelId>/<source>`, per pair).

A line that cannot be used (bad gzip, UTF-8 or JSON, a missing key, a wrong type, tokens
and values of different lengths, a NaN/inf activation, no tokens, a maxValueTokenIndex
that does not point at the row's maximum or disagrees with maxValue, a layer without a
leading number) becomes a row of the rejects table: its file (relative to the export
folder), 1-based line number, reason ("category: detail") and the line's first 500
characters; every other line is kept. The parts hold each file's rejects in line order
(sort by source, line to read them in order). A damaged gzip member ends its file: the
lines before it are kept and one reject names the line where reading stopped.

Memory: a parse task streams its file and emits RECORDS tables of `CHUNK_ROWS` rows; the
parsed rows are materialized in the object store (which spills to disk) because three
consumers read them; the grouping holds one feature's rows at a time. Files are read and
Parquet parts written by Ray tasks, so on a multi-node cluster the export and the run
directory must be on storage every node mounts at the same path (see cluster.yaml).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from baez_ray import schema
from baez_ray.config import IngestConfig
from baez_ray.rundir import log

KINDS = {"features": "feature", "activations": "activation", "explanations": "explanation"}
CHUNK_ROWS = 2048  # RECORDS rows per table a parse task emits
RECORD_CHARS = 500  # a rejected line is kept up to this many characters
PARTITION_BYTES = 64 * 2**20  # parsed bytes per groupby partition
FEATURES_PER_FILE = 4096  # at least this many rows per Parquet part (as collect writes)
REJECTS_PER_FILE = 100_000  # rejects are small rows: few parts
F32_MAX = float(np.finfo(np.float32).max)

# What a parse task emits. Join keys and `file`/`line` (order of the source, for stable
# ties) on every data row; then the columns of each kind; rejects carry source/reason/
# record; one `file` row per file carries its counts (n_*).
RECORDS = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),
        pa.field("model_id", pa.string()),
        pa.field("layer", pa.string()),  # Neuronpedia source id
        pa.field("feature", pa.int64()),
        pa.field("file", pa.int32()),
        pa.field("line", pa.int64()),
        # activation rows
        pa.field("tokens", pa.list_(pa.string())),
        pa.field("values", pa.list_(pa.float32())),
        pa.field("max_value", pa.float32()),
        pa.field("top_index", pa.int32()),
        # feature rows
        pa.field("pos_tokens", pa.list_(pa.string())),
        pa.field("pos_values", pa.list_(pa.float32())),
        pa.field("neg_tokens", pa.list_(pa.string())),
        pa.field("neg_values", pa.list_(pa.float32())),
        # explanation rows
        pa.field("description", pa.string()),
        # rejects (and file rows: source)
        pa.field("source", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("record", pa.string()),
        # file rows
        pa.field("n_lines", pa.int64()),
        pa.field("n_blank", pa.int64()),
        pa.field("n_kept", pa.int64()),
        pa.field("n_rejected", pa.int64()),
        pa.field("n_filtered", pa.int64()),
    ]
)
FILE_COUNTS = ["n_lines", "n_blank", "n_kept", "n_rejected", "n_filtered"]


class IngestError(ValueError):
    """An export folder that cannot be ingested; the message names the path."""


class Reject(Exception):
    """A line that cannot be used; the message is the reason ("category: detail")."""


# ---------------------------------------------------------------- files of an export


def _batch_number(path: Path) -> tuple[float, str]:
    m = re.match(r"batch-(\d+)\.jsonl\.gz$", path.name)
    return (int(m.group(1)) if m else math.inf, path.name)


def export_files(root: Path, key: str = "ingest.path", prefix: str = "") -> list[dict]:
    """The export's files, features then activations then explanations, each folder in
    batch-number order (`source`: prefix + the path inside the export); raises
    IngestError, naming `key`, when there is nothing to ingest."""
    if not root.exists():
        raise IngestError(f"{key} {root}: no such directory")
    if not root.is_dir():
        raise IngestError(f"{key} {root}: not a directory")
    files = []
    for folder, kind in KINDS.items():
        found = sorted((root / folder).glob("*.jsonl.gz"), key=_batch_number) if (root / folder).is_dir() else []
        if kind == "activation" and not found:
            raise IngestError(
                f"{key} {root}: no activation files ({root / folder}/batch-N.jsonl.gz); "
                "is this a Neuronpedia bulk export?"
            )
        files += [{"path": str(p), "source": f"{prefix}{folder}/{p.name}", "kind": kind} for p in found]
    return files


def source_files(cfg: IngestConfig) -> list[dict]:
    """The files of every export of `ingest.sources` (an export named by several sources is
    read once), each with the (model_id, layer) filters it is read with (`keep`: a row
    matching any pair is kept; None matches anything). With one export, `source` is the
    path inside it; with several, the export's path as given, then that."""
    by_path: dict[str, list] = {}
    for src in cfg.sources:
        by_path.setdefault(src.path, []).append([src.model_id, src.layer])
    files = []
    for path, keep in by_path.items():
        first = next(j for j, s in enumerate(cfg.sources) if s.path == path)
        root = Path(path).expanduser().resolve()
        prefix = f"{path.rstrip('/')}/" if len(by_path) > 1 else ""
        files += [{**f, "keep": keep} for f in export_files(root, cfg.source_key(first, "path"), prefix)]
    for i, f in enumerate(files):
        f["file"] = i
    return files


# ---------------------------------------------------------------- one line → one row


def _require(rec: dict, key: str) -> Any:
    if key not in rec:
        raise Reject(f"missing key: {key}")
    return rec[key]


def _str_list(rec: dict, key: str) -> list[str]:
    v = _require(rec, key)
    if not isinstance(v, list) or not {type(s) for s in v} <= {str}:
        raise Reject(f"wrong type: {key} must be a list of strings")
    return v


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float_list(rec: dict, key: str) -> list[float]:
    v = _require(rec, key)
    if not isinstance(v, list) or not {type(x) for x in v} <= {int, float}:  # bool is not a number here
        raise Reject(f"wrong type: {key} must be a list of numbers")
    try:
        ok = np.abs(np.asarray(v, dtype=np.float64)) <= F32_MAX  # False for NaN and inf
        bad = None if ok.all() else int(np.argmin(ok))
    except OverflowError:  # an int too large for a float
        bad = next(i for i, x in enumerate(v) if not _finite32(x))
    if bad is not None:
        raise Reject(f"non-finite value: {key}[{bad}] is {str(v[bad])[:40]}")
    return v


def _finite32(x: int | float) -> bool:
    """Finite and within float32 (the tables' type): no NaN, inf, or overflow on the cast."""
    try:
        return math.isfinite(x) and abs(float(x)) <= F32_MAX
    except OverflowError:  # an int too large for a float
        return False


def _same_length(rec: dict, a: str, b: str) -> None:
    if len(rec[a]) != len(rec[b]):
        raise Reject(f"length mismatch: {len(rec[a])} {a}, {len(rec[b])} {b}")


def _key(rec: dict) -> tuple[str, str, int]:
    model_id = _require(rec, "modelId")
    if not isinstance(model_id, str) or not model_id:
        raise Reject("wrong type: modelId must be a non-empty string")
    layer = _require(rec, "layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        layer = str(layer)
    if not isinstance(layer, str):
        raise Reject("wrong type: layer must be a string")
    m = re.match(r"\d+", layer)
    if not m or int(m.group()) > 2**31 - 1:
        raise Reject(f"bad layer: {layer[:80]!r} does not start with a layer number")
    index = _require(rec, "index")
    if isinstance(index, str) and re.fullmatch(r"\d+", index.strip()):
        index = int(index)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 2**63:
        raise Reject(f"bad index: {str(index)[:80]!r} is not a feature number")
    return model_id, layer, index


def _activation(rec: dict) -> dict:
    tokens = _str_list(rec, "tokens")
    values = _float_list(rec, "values")
    _same_length(rec, "tokens", "values")
    if not tokens:
        raise Reject("empty tokens: the row has no tokens")
    max_value = _require(rec, "maxValue")
    if not _number(max_value):
        raise Reject("wrong type: maxValue must be a number")
    if not _finite32(max_value):
        raise Reject(f"non-finite value: maxValue is {str(max_value)[:40]}")
    top = _require(rec, "maxValueTokenIndex")
    if not isinstance(top, int) or isinstance(top, bool):
        raise Reject("wrong type: maxValueTokenIndex must be an integer")
    if not 0 <= top < len(values):
        raise Reject(f"bad maxValueTokenIndex: {top} outside 0..{len(values) - 1}")
    # the top token must hold the row's maximum, and maxValue must be it (to float32-ish
    # precision: exports round), or the row's rank and its `value` would disagree
    tol = dict(rel_tol=1e-3, abs_tol=1e-6)
    if not math.isclose(values[top], max_value, **tol):
        raise Reject(f"inconsistent maxValue: {max_value} but values[{top}] is {values[top]}")
    if max(values) > values[top] and not math.isclose(max(values), values[top], **tol):
        raise Reject(f"bad maxValueTokenIndex: values[{top}] is {values[top]} but the maximum is {max(values)}")
    return {"tokens": tokens, "values": values, "max_value": max_value, "top_index": top}


def _feature(rec: dict) -> dict:
    out = {}
    for side in ("pos", "neg"):
        out[f"{side}_tokens"] = _str_list(rec, f"{side}_str")
        out[f"{side}_values"] = _float_list(rec, f"{side}_values")
        _same_length(rec, f"{side}_str", f"{side}_values")
    return out


def _explanation(rec: dict) -> dict:
    description = _require(rec, "description")
    if not isinstance(description, str):
        raise Reject("wrong type: description must be a string")
    return {"description": description}


PARSERS = {"activation": _activation, "feature": _feature, "explanation": _explanation}


def parse_line(raw: bytes, kind: str) -> dict:
    """One export line → the kind's columns plus the join key; raises Reject."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject(f"bad utf-8: {e.reason} at byte {e.start}") from None
    try:
        rec = json.loads(text)  # NaN / Infinity parse as floats and are rejected below
    except ValueError as e:
        raise Reject(f"bad json: {e}") from None
    if not isinstance(rec, dict):
        raise Reject(f"wrong type: the line is a JSON {type(rec).__name__}, not an object")
    model_id, layer, feature = _key(rec)
    return {"model_id": model_id, "layer": layer, "feature": feature, **PARSERS[kind](rec)}


# ---------------------------------------------------------------- stage 1: parse files


def parse_file(batch: pa.Table, chunk_rows: int) -> Iterator[pa.Table]:
    """map_batches UDF: one row (a file, with its filters `keep`) in, its RECORDS rows out,
    `chunk_rows` at a time."""
    for f in batch.to_pylist():
        yield from _parse_one(f, chunk_rows)


def _kept(row: dict, keep: list) -> bool:
    return any((m is None or row["model_id"] == m) and (ly is None or row["layer"] == ly) for m, ly in keep)


def _parse_one(f: dict, chunk_rows: int) -> Iterator[pa.Table]:
    kind, source, file = f["kind"], f["source"], f["file"]
    rows: list[dict] = []
    n = dict.fromkeys(FILE_COUNTS, 0)

    def reject(line: int | None, reason: str, record: str | None) -> None:
        n["n_rejected"] += 1
        rows.append({"kind": "reject", "source": source, "line": line, "reason": reason, "record": record, "file": file})

    try:
        with gzip.open(f["path"], "rb") as fh:
            for raw in fh:
                n["n_lines"] += 1
                lineno = n["n_lines"]
                raw = raw.rstrip(b"\r\n")
                if not raw.strip():
                    n["n_blank"] += 1
                    continue
                try:
                    row = parse_line(raw, kind)
                except Reject as e:
                    reject(lineno, str(e), raw[: RECORD_CHARS * 4].decode("utf-8", "replace")[:RECORD_CHARS])
                else:
                    if not _kept(row, f["keep"]):
                        n["n_filtered"] += 1
                    else:
                        n["n_kept"] += 1
                        rows.append({"kind": kind, "file": file, "line": lineno, **row})
                if len(rows) >= chunk_rows:
                    yield pa.Table.from_pylist(rows, schema=RECORDS)
                    rows = []
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        # a bad gzip member ends the file: the lines before it are kept
        reject(n["n_lines"] + 1, f"unreadable gzip: {type(e).__name__}: {e}", None)
    except OSError as e:
        reject(n["n_lines"] + 1, f"unreadable file: {type(e).__name__}: {e}", None)
    rows.append({"kind": "file", "source": source, "file": file, **n})
    yield pa.Table.from_pylist(rows, schema=RECORDS)


# ---------------------------------------------------------------- stage 2: one row per feature


def build_feature(group: pa.Table, top_k: int) -> pa.Table:
    """map_groups UDF: all RECORDS rows of one (model_id, layer, feature) → its FEATURES row."""
    rows = group.to_pylist()
    model_id, layer, feature = rows[0]["model_id"], rows[0]["layer"], rows[0]["feature"]
    rows.sort(key=lambda r: (r["file"], r["line"]))
    acts = [r for r in rows if r["kind"] == "activation"]
    feats = [r for r in rows if r["kind"] == "feature"]
    acts.sort(key=lambda r: -r["max_value"])  # stable: ties stay in file order
    examples = [
        {
            "kind": "top",
            "rank": rank,
            "value": r["values"][r["top_index"]],
            "top_index": r["top_index"],
            "token_strs": r["tokens"],
            "acts": r["values"],
        }
        for rank, r in enumerate(acts[:top_k])
    ]
    feat = feats[0] if feats else {}
    out = {
        "sae_id": f"{model_id}/{layer}",
        "model_id": model_id,
        "layer": int(re.match(r"\d+", layer).group()),
        "feature": feature,
        "n_tokens": 0,
        "n_firing": 0,
        "max_activation": max((max(r["values"]) for r in acts), default=0.0),
        "examples": examples,
        **{c: feat.get(c) for c in ("pos_tokens", "pos_values", "neg_tokens", "neg_values")},
        "source_explanations": [r["description"] for r in rows if r["kind"] == "explanation"],
    }
    return pa.Table.from_pylist([out], schema=schema.FEATURES)


# ---------------------------------------------------------------- writing


def _part_names():
    """Ray Data file names like collect's parts: part-<write task>-<i>.parquet."""
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}"

    return PartNames()


def _write(ds, out_dir: Path, table_schema: pa.Schema, min_rows_per_file: int) -> None:
    """Ray Data writes the parts (from the nodes that hold the blocks) in exactly `table_schema`."""
    import ray

    ds.write_parquet(
        str(out_dir), filename_provider=_part_names(), mode=ray.data.SaveMode.OVERWRITE, schema=table_schema,
        min_rows_per_file=min_rows_per_file,
    )


def _clear(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.parquet"):
        old.unlink()


def _rows_written(out_dir: Path, table_schema: pa.Schema) -> int:
    """Rows in the parts of `out_dir`; writes one empty part when there are none, so the
    table exists with its schema."""
    parts = sorted(out_dir.glob("*.parquet"))
    if not parts:
        pq.write_table(table_schema.empty_table(), out_dir / "part-00000-0.parquet")
        return 0
    return sum(pq.ParquetFile(p).metadata.num_rows for p in parts)


# ---------------------------------------------------------------- the job


def _parse_all(files: list[dict]):
    """Every file parsed in its own task: RECORDS rows (kept records, rejects, one
    summary row per file), materialised once for the passes below."""
    import ray

    return (
        ray.data.from_items(files, override_num_blocks=len(files))
        .map_batches(parse_file, batch_size=1, batch_format="pyarrow", fn_kwargs=dict(chunk_rows=CHUNK_ROWS))
        .materialize()
    )


def _write_rejects(parsed, rejects_dir: Path, n_rejected: int) -> tuple[int, Counter]:
    """rejects/ (each file's in line order; files in no particular order); returns (rows
    written, count per reason)."""
    from ray.data.expressions import col

    _clear(rejects_dir)
    if n_rejected:
        rejects = parsed.filter(expr=col("kind") == "reject").select_columns(schema.REJECTS.names)
        _write(rejects, rejects_dir, schema.REJECTS, REJECTS_PER_FILE)
    n = _rows_written(rejects_dir, schema.REJECTS)
    reasons = Counter(r.split(":", 1)[0] for r in pq.read_table(rejects_dir, columns=["reason"]).column("reason").to_pylist())
    return n, reasons


def _write_features(parsed, features_dir: Path, top_k: int, any_kept: bool) -> int:
    """features/: the kept rows grouped by feature into FEATURES rows; returns rows written."""
    import ray
    from ray.data.expressions import col

    data = parsed.filter(expr=col("kind").is_in(list(PARSERS)))
    max_partitions = ray.data.DataContext.get_current().default_hash_shuffle_parallelism
    partitions = max(1, min(math.ceil(parsed.size_bytes() / PARTITION_BYTES), max_partitions))
    _clear(features_dir)
    if any_kept:
        grouped = data.groupby(["model_id", "layer", "feature"], num_partitions=partitions)
        features = grouped.map_groups(build_feature, batch_format="pyarrow", fn_kwargs=dict(top_k=top_k))
        _write(features, features_dir, schema.FEATURES, FEATURES_PER_FILE)
    return _rows_written(features_dir, schema.FEATURES)


def ingest(cfg: IngestConfig, files: list[dict], features_dir: Path, rejects_dir: Path) -> dict:
    """The files of the Neuronpedia exports (`source_files`) → features/ and rejects/; returns
    the stage's counts. Ray must be running."""
    from ray.data.expressions import col

    parsed = _parse_all(files)
    counts = parsed.filter(expr=col("kind") == "file").select_columns(["source", *FILE_COUNTS])
    stats = [r for b in counts.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
    kind_of = {f["source"]: f["kind"] for f in files}
    kept: Counter = Counter()
    for s in stats:
        kept[kind_of[s["source"]]] += s["n_kept"]
    total = {c: sum(s[c] for s in stats) for c in FILE_COUNTS}
    n_rejects, reasons = _write_rejects(parsed, rejects_dir, total["n_rejected"])
    n_features = _write_features(parsed, features_dir, cfg.top_k, sum(kept.values()) > 0)
    if total["n_rejected"] != n_rejects:
        raise RuntimeError(f"ingest counted {total['n_rejected']} rejected lines but wrote {n_rejects} rejects")
    if total["n_rejected"]:
        log(f"[ingest] {total['n_rejected']} lines rejected ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}); see {rejects_dir}")
    return dict(
        files=len(files), lines_read=total["n_lines"], blank_lines=total["n_blank"], activation_rows=kept["activation"],
        feature_rows=kept["feature"], explanation_rows=kept["explanation"], filtered_out=total["n_filtered"],
        rejected=total["n_rejected"], rejects_by_reason=dict(sorted(reasons.items())), features_written=n_features,
    )
