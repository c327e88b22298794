"""`baez-ray export RUN_DIR`: a finished label or benchmark run's labels out of the tool.

    labels/ + scores/ (+ features/: model ids) ─▶ jsonl | csv        one line per label
                                               └▶ neuronpedia     <modelId>/<source>/explanations/batch-N.jsonl.gz

* `jsonl` / `csv`: every label row (failed ones too, with their error) with its method,
  tier, kind, prompt version, backend, model, tokens and cost, and its scores: per
  benchmark the headline metric (`score_<benchmark>`: balanced accuracy, or AUROC for the
  embedding and log-prob benchmarks) and `n_shown`.
* `neuronpedia`: the explanations of Neuronpedia's exports, which its admin panel
  imports (`explanations/batch-N.jsonl.gz`, one JSON object a line: id, modelId, layer
  (the source id), index (a string), description, typeName, explanationModelName,
  authorId, notes, createdAt), one folder per model and source; only rows with a label;
  tier, kind, prompt version and scores go into `notes` as JSON. `NEURONPEDIA_SCHEMA`
  is that row's JSON Schema (the tests validate the files against it).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

FORMATS = ("jsonl", "csv", "neuronpedia")
ROWS_PER_BATCH = 4096  # explanations per batch-N.jsonl.gz
LABEL_COLUMNS = ["sae_id", "layer", "feature", "method", "label", "tier", "kind", "prompt_version", "backend", "model",
                 "n_examples", "input_tokens", "output_tokens", "cost_usd", "tries", "error"]
HEADLINE = {"embedding": "auroc", "logit_embedding": "auroc", "detection_logprob": "auroc", "fuzz_logprob": "auroc"}

NEURONPEDIA_SCHEMA = {
    "type": "object",
    "required": ["id", "modelId", "layer", "index", "description", "authorId", "typeName", "explanationModelName", "createdAt"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string", "minLength": 1}, "modelId": {"type": "string", "minLength": 1},
        "layer": {"type": "string", "pattern": r"^\d+"}, "index": {"type": "string", "pattern": r"^\d+$"},
        "description": {"type": "string", "minLength": 1}, "authorId": {"type": "string"},
        "typeName": {"type": "string", "minLength": 1}, "explanationModelName": {"type": "string"},
        "notes": {"type": ["string", "null"]}, "triggeredById": {"type": ["string", "null"]}, "createdAt": {"type": "string"},
    },
}


class ExportError(ValueError):
    """A run directory that cannot be exported; the message names the path."""


def export(run_dir: str | Path, fmt: str, out: str | Path, author_id: str = "") -> dict:
    """Write the run's labels in `fmt` to `out` (a file for jsonl/csv, a folder for
    neuronpedia); returns counts."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: one of {', '.join(FORMATS)}")
    rows = label_rows(Path(run_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with out.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return {"rows": len(rows), "path": str(out)}
    if fmt == "csv":
        cols = list(dict.fromkeys(k for r in rows for k in r)) or LABEL_COLUMNS
        with out.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        return {"rows": len(rows), "path": str(out)}
    return write_neuronpedia(rows, out, author_id)


def label_rows(run_dir: Path) -> list[dict]:
    """One dict per label row of the run, with `model_id` and its `score_<benchmark>` /
    `n_shown_<benchmark>` columns."""
    labels_dir = run_dir / "labels"
    if not any(labels_dir.glob("*.parquet")):
        raise ExportError(f"{run_dir}: no labels/ table (is this a finished label or benchmark run?)")
    labels = pq.read_table(labels_dir)
    labels = labels.select([c for c in LABEL_COLUMNS if c in labels.column_names])
    rows = labels.sort_by([("sae_id", "ascending"), ("feature", "ascending"), ("method", "ascending")]).to_pylist()
    models = _model_ids(run_dir)
    scores = _scores(run_dir)
    for r in rows:
        r["model_id"] = models.get(r["sae_id"]) or r["sae_id"].split("/")[0]
        for bench, (value, shown) in scores.get((r["sae_id"], r["feature"], r["method"]), {}).items():
            r[f"score_{bench}"], r[f"n_shown_{bench}"] = value, shown
    return rows


def _features_dir(run_dir: Path) -> Path | None:
    manifest = run_dir / "manifest.json"
    given = json.loads(manifest.read_text()).get("spec", {}).get("features") if manifest.exists() else None
    for d in (run_dir / "features", Path(given) if given else None):
        if d is not None and d.is_dir() and any(d.glob("*.parquet")):
            return d
    return None


def _model_ids(run_dir: Path) -> dict[str, str]:
    """sae_id → model_id, from the run's features table (or the one it was given)."""
    d = _features_dir(run_dir)
    if d is None:
        return {}
    t = pq.read_table(d, columns=["sae_id", "model_id"]).group_by(["sae_id", "model_id"]).aggregate([])
    return dict(zip(t.column("sae_id").to_pylist(), t.column("model_id").to_pylist()))


def _scores(run_dir: Path) -> dict[tuple, dict[str, tuple]]:
    """(sae_id, feature, method) → {benchmark: (headline metric, n_shown)}."""
    if not any((run_dir / "scores").glob("*.parquet")):
        return {}
    s = pq.read_table(run_dir / "scores")
    s = s.filter(pc.not_equal(s.column("method"), "random_label"))
    out: dict[tuple, dict[str, tuple]] = {}
    for r in s.to_pylist():
        metric = HEADLINE.get(r["benchmark"], "balanced_accuracy")
        out.setdefault((r["sae_id"], r["feature"], r["method"]), {})[r["benchmark"]] = (r.get(metric), r["n_shown"])
    return out


def source_id(sae_id: str, model_id: str) -> str:
    """Neuronpedia's source (layer) id of an SAE: the part after `<modelId>/` for an
    ingested one, the SAE id itself otherwise."""
    return sae_id.split("/", 1)[1] if sae_id.startswith(f"{model_id}/") else sae_id


def write_neuronpedia(rows: list[dict], out: Path, author_id: str = "") -> dict:
    """Neuronpedia explanation rows of the labelled rows, one folder per model and source."""
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    by_source: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if not r.get("label"):
            continue
        source = source_id(r["sae_id"], r["model_id"])
        if not source[:1].isdigit():  # Neuronpedia's source ids start with the layer
            source = f"{r['layer']}-{source}"
        notes = {k: r.get(k) for k in ("tier", "kind", "prompt_version", "backend")}
        notes.update({k: v for k, v in r.items() if k.startswith("score_")})
        by_source.setdefault((r["model_id"], source), []).append({
            "id": hashlib.sha1(f"{r['sae_id']}|{r['feature']}|{r['method']}|{r['label']}".encode()).hexdigest()[:25],
            "modelId": r["model_id"], "layer": source, "index": str(r["feature"]), "description": r["label"],
            "authorId": author_id, "typeName": f"baez-ray-{r['method']}", "explanationModelName": r.get("model") or "",
            "notes": json.dumps(notes, ensure_ascii=False), "triggeredById": None, "createdAt": created,
        })
    files = 0
    for (model_id, source), items in sorted(by_source.items()):
        folder = out / model_id / source / "explanations"
        folder.mkdir(parents=True, exist_ok=True)
        for n, start in enumerate(range(0, len(items), ROWS_PER_BATCH)):
            with gzip.open(folder / f"batch-{n}.jsonl.gz", "wt", encoding="utf-8") as f:
                for item in items[start : start + ROWS_PER_BATCH]:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
            files += 1
    return {"explanations": sum(len(v) for v in by_source.values()), "sources": len(by_source), "files": files, "path": str(out)}

