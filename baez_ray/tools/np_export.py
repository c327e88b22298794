"""Write a Neuronpedia bulk export from a run's features table (a collect run, or a label or
benchmark job that collected), in the format `stages/ingest.py` reads: so that the study the
seed ran from a Neuronpedia export can be run on small local models, end to end.

    python -m baez_ray.tools.np_export RUN_DIR OUT_DIR [--features-per-sae 40] [--min-examples 20]
                                       [--seed 0] [--tokens pieces|decoded] [--labels LABELS_DIR]

One export folder per SAE of the run, as Neuronpedia exports one per (model, source):
`OUT_DIR/<model_id>/<source>/`, where the source id is the SAE's id when it starts with its
layer number (the demo's `12-res-4k`), else `<layer>-<sae id>`. Each holds:

* `features/batch-0.jsonl.gz`: modelId, layer (the source id), index (a string),
  pos_str/pos_values/neg_str/neg_values (the features table's top logits; empty lists
  where it has none);
* `activations/batch-N.jsonl.gz` (1000 lines a file): one line per top example of each
  feature (its rank order): modelId, layer, index, tokens, values (3 decimals, as
  SAEDashboard rounds them), maxValue, maxValueTokenIndex, binMin -1 (Neuronpedia's mark of
  a top activation);
* `explanations/batch-0.jsonl.gz` (with `--labels`, a label run's labels/): one line per
  label (description, typeName = the method, explanationModelName).

Tokens are written as Neuronpedia's bulk exports write them (`--tokens pieces`, the
default: each id's vocabulary piece with SAEDashboard's replacements, `models.tokens`), or
decoded one by one as its inference server writes them (`--tokens decoded`). Examples
without ids (an ingested table) keep their strings. The features exported are a seeded
sample (`--seed`) of `--features-per-sae` features per SAE among those with at least
`--min-examples` top examples. An export holds no residual vectors and no token ids:
ingesting it and running the residuals stage recomputes both (docs/residuals.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from baez_ray import schema

LINES_PER_FILE = 1000


def source_id(sae_id: str, layer: int) -> str:
    """The Neuronpedia source id of an SAE: '<layer>-<set>'."""
    return sae_id if re.match(rf"{layer}-", sae_id) else f"{layer}-{sae_id}"


def eligible(features_dir: Path, min_examples: int) -> pa.Table:
    """(sae_id, feature) of the features with at least `min_examples` top examples, read a
    row group at a time."""
    keys = []
    for part in sorted(features_dir.glob("*.parquet")):
        f = pq.ParquetFile(part)
        for i in range(f.num_row_groups):
            t = f.read_row_group(i, columns=["sae_id", "feature", "examples"])
            n = [sum(e["kind"] == "top" for e in exs) for exs in t.column("examples").to_pylist()]
            ok = np.asarray(n, dtype=np.int64) >= min_examples
            keys.append(t.select(["sae_id", "feature"]).filter(pa.array(ok)))
    out = pa.concat_tables(keys) if keys else schema.key_table([])
    return out.sort_by([("sae_id", "ascending"), ("feature", "ascending")])


def choose(features_dir: Path, per_sae: int, min_examples: int, seed: int) -> pa.Table:
    """A seeded sample of `per_sae` eligible features of each SAE (`stages.split.sample_per_sae`)."""
    from baez_ray.stages.split import sample_per_sae

    keys = eligible(features_dir, min_examples)
    return keys.take(pa.array(sample_per_sae(keys.column("sae_id").to_pylist(), per_sae, seed), pa.int64()))


def renderer(run_dir: Path, how: str):
    """ids → strings, with the tokenizer of the run's model (its job.yaml)."""
    from baez_ray.config import ModelConfig
    from baez_ray.models.lm import load_tokenizer, token_texts
    from baez_ray.models.tokens import TokenMap

    spec = yaml.safe_load((run_dir / "job.yaml").read_text())
    tok = load_tokenizer(ModelConfig(**spec["model"]))
    return TokenMap(tok).render if how == "pieces" else token_texts(tok)


def activation_lines(row: dict, source: str, render) -> list[dict]:
    """A feature's top examples as Neuronpedia activation rows."""
    out = []
    for e in sorted((e for e in row["examples"] if e["kind"] == "top"), key=lambda e: e["rank"]):
        values = [round(float(v), 3) for v in e["acts"]]
        tokens = render(e["tokens"]) if e["tokens"] is not None else list(e["token_strs"])
        out.append({"modelId": row["model_id"], "layer": source, "index": str(row["feature"]), "tokens": tokens, "values": values,
                    "maxValue": values[e["top_index"]], "maxValueTokenIndex": int(e["top_index"]), "binMin": -1, "dataIndex": None})
    return out


def feature_line(row: dict, source: str) -> dict:
    def nums(v):
        return [round(float(x), 3) for x in v or []]

    return {"modelId": row["model_id"], "layer": source, "index": str(row["feature"]), "pos_str": list(row["pos_tokens"] or []),
            "pos_values": nums(row["pos_values"]), "neg_str": list(row["neg_tokens"] or []), "neg_values": nums(row["neg_values"])}


def explanation_lines(labels_dir: Path | None, keys: pa.Table, sources: dict[str, tuple[str, str]]) -> dict[str, list[dict]]:
    """Per SAE, a label run's labels of the exported features as explanation rows."""
    if labels_dir is None:
        return {}
    labels = pq.read_table(labels_dir, columns=["sae_id", "feature", "method", "label", "model"])
    labels = labels.take(schema.rows_of(labels, keys))
    out: dict[str, list[dict]] = {}
    for r in labels.to_pylist():
        if r["label"] and r["sae_id"] in sources:
            model_id, source = sources[r["sae_id"]]
            out.setdefault(r["sae_id"], []).append({"modelId": model_id, "layer": source, "index": str(r["feature"]),
                                                    "description": r["label"], "typeName": r["method"],
                                                    "explanationModelName": r["model"]})
    return out


def write_jsonl_gz(lines: list[dict], folder: Path, per_file: int = LINES_PER_FILE) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for n, start in enumerate(range(0, len(lines), per_file)):
        payload = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines[start : start + per_file])
        (folder / f"batch-{n}.jsonl.gz").write_bytes(gzip.compress(payload.encode(), mtime=0))
    return n + 1 if lines else 0


def export(run_dir: Path, out_dir: Path, per_sae: int = 40, min_examples: int = 20, seed: int = 0, tokens: str = "pieces",
           labels_dir: Path | None = None) -> dict:
    """The export of `run_dir`'s features/ under `out_dir`; returns counts per source folder."""
    keys = choose(run_dir / "features", per_sae, min_examples, seed)
    rows = schema.read_keyed(run_dir / "features", keys).to_pylist() if keys.num_rows else []
    render = renderer(run_dir, tokens)
    by_sae: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["sae_id"], r["feature"])):
        by_sae.setdefault(r["sae_id"], []).append(r)
    sources = {s: (rs[0]["model_id"], source_id(s, rs[0]["layer"])) for s, rs in by_sae.items()}
    expl = explanation_lines(labels_dir, keys, sources)
    counts = {}
    for sae, rs in by_sae.items():
        model_id, source = sources[sae]
        folder = out_dir / model_id / source
        acts = [line for r in rs for line in activation_lines(r, source, render)]
        write_jsonl_gz([feature_line(r, source) for r in rs], folder / "features")
        write_jsonl_gz(acts, folder / "activations")
        if expl.get(sae):
            write_jsonl_gz(expl[sae], folder / "explanations")
        counts[str(folder)] = {"features": len(rs), "activations": len(acts), "explanations": len(expl.get(sae, []))}
    return counts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m baez_ray.tools.np_export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a run directory with features/ and job.yaml (its model's tokenizer renders the tokens)")
    p.add_argument("out_dir", type=Path, help="where to write <model_id>/<source>/{features,activations,explanations}/")
    p.add_argument("--features-per-sae", type=int, default=40, help="features sampled per SAE (default 40)")
    p.add_argument("--min-examples", type=int, default=20, help="sample only features with this many top examples (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", choices=["pieces", "decoded"], default="pieces",
                   help="pieces: as Neuronpedia's bulk exports (SAEDashboard); decoded: as its inference server")
    p.add_argument("--labels", type=Path, default=None, help="a label run's labels/ to write as explanations")
    a = p.parse_args(argv)
    for folder, c in export(a.run_dir, a.out_dir, a.features_per_sae, a.min_examples, a.seed, a.tokens, a.labels).items():
        print(f"{folder}: {c['features']} features, {c['activations']} activation rows, {c['explanations']} explanations")


if __name__ == "__main__":
    main()
