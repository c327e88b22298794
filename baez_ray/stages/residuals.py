"""residuals: the layer-L residual vector at the top token of every example an AV method
reads (SPEC §2, step 3), computed on demand for any features table (collected without
`keep_residual`, or ingested from an export), for the features that need it only.

    keys (sae_id, feature) not yet in residuals/, in shards of `residuals.shard_features`
      ─Ray task per shard (`_shard_inputs`): their FEATURES rows, the examples the AV reads
       (`av.worker.av_examples`), each one's longest left context:
         an example of a collect run whose contexts/ table is there → the corpus context's
             tokens[:position+1] (source "context": what the SAE itself saw)
         any other (an export's, or a collect's without contexts/) → its own window's
             tokens[:top_index+1] (source "window"), as ids, or as strings to be mapped
       sorted by (layer, length), in blocks of `residuals.batch_size` examples ─▶
      ─actor pool (`ResidualWorker`: `models.lm.ResidualReader` over the AV layers and the
       tokenizer; the job's `model` section places it) ─▶ strings → ids (`TokenMap`: an
       example with a string that maps to no single id gets a refused row naming it), BOS
       put first where the window lacks it, right-padded to the block's longest, one forward
       that stops after the block's deepest layer ─▶ RESIDUALS rows
      ─map_batches(`_write_rows`, in the workers) ─▶ files in the shard's temp folder
      ─Ray task (`_commit_shard`) ─▶ one part sorted by (sae_id, feature, kind, rank), then
       its commit marker

Padding. Rows are padded on the right: with causal attention no position before a row's
last real token sees what comes after it, so a padded row gives the residual an unpadded
forward gives (to float tolerance) with no attention mask, and positions stay 0..n-1.

Examples that carry a residual already (collect with `keep_residual`) are not computed:
the AV reads theirs (counted as `kept`).

Resume. A shard's part is written whole and renamed into place, then its commit marker
(`_<part>.done`, written last; the underscore keeps the folder a plain Parquet dataset that
readers open as a whole); a part without its marker is removed by the next attempt. A rerun computes only the keys without a committed row, so a run
killed anywhere redoes at most the shards in flight. The driver holds keys, object
references and counts: the examples and vectors stay in the workers, the object store and
Parquet.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from baez_ray import progress, schema
from baez_ray.config import ModelConfig, ResidualsConfig
from baez_ray.ray_pool import actor_map, gather, remote
from baez_ray.rundir import log, write_json_atomic, write_parquet_atomic

# what a shard task hands the actors: one row per example to compute
INPUTS = pa.schema([
    pa.field("sae_id", pa.string()), pa.field("layer", pa.int32()), pa.field("feature", pa.int64()), pa.field("kind", pa.string()),
    pa.field("rank", pa.int32()), pa.field("context_id", pa.int64()), pa.field("position", pa.int32()),
    pa.field("top_index", pa.int32()), pa.field("source", pa.string()), pa.field("n_tokens", pa.int32()),
    pa.field("input_ids", pa.list_(pa.int32())),  # null: map `token_strs`
    pa.field("token_strs", pa.list_(pa.string())),  # the window's strings up to the top token (ingest)
])
KEY = ["sae_id", "feature", "kind", "rank"]
ROWS_PER_GROUP = 1024  # Parquet row group of a part: lookups by feature read few groups


# ---- per-shard inputs (a Ray task) ----------------------------------------------------------

def needed_examples(features: pa.Table, n_examples: int) -> tuple[list[dict], int]:
    """The examples the AV reads of each FEATURES row that carry no residual yet, as dicts
    with their feature's keys; and how many carried one (`kept`)."""
    from baez_ray.av.worker import av_examples

    out, kept = [], 0
    for f in features.select(["sae_id", "layer", "feature", "examples"]).to_pylist():
        for e in av_examples(f["examples"], n_examples):
            if e.get("residual") is not None:
                kept += 1
                continue
            out.append({"sae_id": f["sae_id"], "layer": f["layer"], "feature": f["feature"], **e})
    return out, kept


def _contexts(contexts_dir: str | None, ids: set[int]) -> dict[int, np.ndarray]:
    """The tokens of the contexts `ids` (a filtered read: row-group statistics skip the rest)."""
    if not contexts_dir or not ids or not Path(contexts_dir).is_dir():
        return {}
    t = pq.read_table(contexts_dir, schema=schema.CONTEXTS, filters=[("context_id", "in", sorted(ids))])
    return dict(zip(t.column("context_id").to_pylist(), (np.asarray(x, np.int32) for x in t.column("tokens").to_pylist())))


def input_row(e: dict, ctx: dict[int, np.ndarray]) -> tuple[dict, bool]:
    """One example → its INPUTS row (the longest left context there is) and whether a
    context was found that disagrees with the example's window (then the window is used)."""
    top = int(e["top_index"])
    row = {k: e.get(k) for k in ("sae_id", "layer", "feature", "kind", "rank", "context_id", "position", "top_index")}
    window = e.get("tokens")
    cid, pos = e.get("context_id"), e.get("position")
    mismatch = False
    if cid is not None and pos is not None and cid in ctx and pos < len(ctx[cid]):
        left = ctx[cid][: pos + 1]
        if window is None or list(left[len(left) - top - 1 :]) == list(window[: top + 1]):
            return {**row, "source": "context", "input_ids": left.tolist(), "token_strs": None, "n_tokens": len(left)}, False
        mismatch = True
    if window is not None:
        return {**row, "source": "window", "input_ids": list(window[: top + 1]), "token_strs": None, "n_tokens": top + 1}, mismatch
    strs = list(e["token_strs"][: top + 1])
    return {**row, "source": "window", "input_ids": None, "token_strs": strs, "n_tokens": len(strs)}, mismatch


def _shard_inputs(features_dir: str, contexts_dir: str | None, keys: pa.Table, n_examples: int, batch_size: int, n_blocks: int):
    """A Ray task: the INPUTS rows of the features `keys`, sorted by (layer, length), in
    `n_blocks` blocks of `batch_size` rows (empty ones at the end), then its counts."""
    feats = schema.read_keyed(features_dir, keys, columns=["sae_id", "layer", "feature", "examples"])
    examples, kept = needed_examples(feats, n_examples)
    ctx = _contexts(contexts_dir, {e["context_id"] for e in examples if e.get("context_id") is not None})
    rows, mismatches = [], 0
    for e in examples:
        row, bad = input_row(e, ctx)
        rows.append(row)
        mismatches += bad
    rows.sort(key=lambda r: (r["layer"], -r["n_tokens"]))  # longest first: a block too big fails early
    table = pa.Table.from_pylist(rows, schema=INPUTS) if rows else INPUTS.empty_table()
    blocks = [table.slice(i * batch_size, batch_size) for i in range(n_blocks)]
    return (*blocks, {"examples": len(rows) + kept, "kept": kept, "context_mismatch": mismatches, "to_compute": len(rows)})


# ---- the base-model actor -----------------------------------------------------------------

class ResidualWorker:
    """Ray Data actor: a block of INPUTS rows in, their RESIDUALS rows out (see the module
    docstring). Holds the base model as far as the deepest AV layer and its tokenizer."""

    def __init__(self, model: dict, layers: list[int], threads: int, prepend_bos: bool):
        import torch

        from baez_ray.models.lm import ResidualReader, load_tokenizer

        torch.set_num_threads(threads)
        cfg = ModelConfig(**model)
        self.lm = ResidualReader(cfg, layers=layers)
        self.tok = load_tokenizer(cfg)
        self.bos = self.tok.bos_token_id if prepend_bos else None
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.map = None  # models.tokens.TokenMap, built when a row first needs it

    def ids(self, row: dict) -> tuple[list[int] | None, str | None]:
        """The ids the model reads for a row (BOS first where missing), or the refusal."""
        from baez_ray.models.tokens import TokenMap, TokenRefused

        ids = row["input_ids"]
        if ids is None:
            if self.map is None:
                self.map = TokenMap(self.tok)
            try:
                ids = self.map.ids_of(row["token_strs"] or [])
            except TokenRefused as e:
                return None, f"unmappable token string: {e}"
        if not ids:
            return None, "no tokens: the example is empty up to its top token"
        if self.bos is not None and ids[0] != self.bos:
            ids = [self.bos, *ids]
        return list(ids), None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        inputs = [self.ids(r) for r in rows]
        vectors = self.forward([ids for ids, _ in inputs], [r["layer"] for r in rows])
        progress.tick(len(rows))
        out = [{**{k: r[k] for k in ("sae_id", "layer", "feature", "kind", "rank", "context_id", "position", "top_index")},
                "source": r["source"] if ids else "refused", "n_tokens": len(ids) if ids else 0, "mapped": r["input_ids"] is None,
                "residual": vec, "error": err}
               for r, (ids, err), vec in zip(rows, inputs, vectors)]
        return schema.conform(pa.Table.from_pylist(out), schema.RESIDUALS) if out else schema.empty(schema.RESIDUALS)

    def forward(self, ids: list[list[int] | None], layers: list[int]) -> list[list[float] | None]:
        """The residual at each row's last token, at its layer (None for a refused row): one
        right-padded forward that stops after the deepest layer of the block."""
        import torch

        todo = [i for i, x in enumerate(ids) if x]
        out: list[list[float] | None] = [None] * len(ids)
        if not todo:
            return out
        longest = max(len(ids[i]) for i in todo)
        batch = torch.full((len(todo), longest), self.pad, dtype=torch.long)
        for j, i in enumerate(todo):
            batch[j, : len(ids[i])] = torch.tensor(ids[i])
        res = self.lm.residuals(batch, until=max(layers[i] for i in todo))
        for j, i in enumerate(todo):
            out[i] = res[layers[i]][j, len(ids[i]) - 1].float().cpu().numpy().tolist()
        return out


# ---- writing, commit, resume ----------------------------------------------------------------

def _write_rows(batch: pa.Table, out_dir: str) -> pa.Table:
    """A map_batches function: RESIDUALS rows → a file in `out_dir` named by their keys (a
    retried batch rewrites its own file); returns its row count."""
    if batch.num_rows:
        digest = hashlib.sha1(repr([batch.column(c).to_pylist() for c in KEY]).encode()).hexdigest()[:20]
        write_parquet_atomic(schema.conform(batch, schema.RESIDUALS), Path(out_dir) / f"rows-{digest}.parquet")
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64())})


def _commit_shard(tmp: str, part: str) -> int:
    """A Ray task: the shard's files → one part sorted by KEY (written atomically); rows."""
    files = sorted(Path(tmp).glob("rows-*.parquet"))
    table = pa.concat_tables([pq.read_table(f, schema=schema.RESIDUALS) for f in files]) if files else schema.empty(schema.RESIDUALS)
    table = table.sort_by([(c, "ascending") for c in KEY])
    tmp_part = Path(part).with_name(f".{Path(part).name}.tmp")
    pq.write_table(table, tmp_part, row_group_size=ROWS_PER_GROUP)
    from baez_ray.rundir import commit

    commit(tmp_part, Path(part))
    shutil.rmtree(tmp, ignore_errors=True)
    return table.num_rows


def marker(out_dir: Path, name: str) -> Path:
    return out_dir / f"_{name}.done"


def committed_parts(out_dir: Path) -> list[Path]:
    """The parts whose commit marker exists, in commit order."""
    return [Path(out_dir) / f"{m.name[1:-5]}.parquet" for m in sorted(Path(out_dir).glob("_*.done"))]


def committed_keys(out_dir: Path) -> pa.Table:
    """A Ray task's answer: (sae_id, feature) of every committed row (distinct)."""
    import ray

    return ray.get(remote(_committed_keys).remote(str(out_dir)))


def _committed_keys(out_dir: str) -> pa.Table:
    parts = committed_parts(Path(out_dir))
    if not parts:
        return schema.key_table([])
    keys = pa.concat_tables([pq.read_table(p, columns=["sae_id", "feature"]) for p in parts])
    return keys.group_by(["sae_id", "feature"]).aggregate([])


def clear_uncommitted(out_dir: Path) -> None:
    """Remove parts without their marker and temp folders (a run that died in between)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.iterdir():
        if f.name.startswith(".") or (f.suffix == ".parquet" and not marker(out_dir, f.stem).exists()):
            shutil.rmtree(f) if f.is_dir() else f.unlink()


# ---- the stage ------------------------------------------------------------------------------

def contexts_of(features_dir: Path) -> Path | None:
    """The contexts table of the run that collected `features_dir` (its sibling contexts/),
    when there is one: collected examples then read their whole left context."""
    c = Path(features_dir).parent / "contexts"
    return c if c.is_dir() and any(c.glob("*.parquet")) else None


def for_av(examples_dir: Path, keys: pa.Table, av_layers, n_examples: int, out_dir: Path, contexts_dir: Path | None,
           model: ModelConfig | None, cfg: ResidualsConfig, attempt: int = 1) -> dict:
    """The stage for the features `keys` (sae_id, feature, layer) of `examples_dir` whose
    layer an AV reads (`av_layers`); the others need no vector. Returns its counts."""
    layers = sorted(set(av_layers))
    at = pc.is_in(keys.column("layer"), pa.array(layers, pa.int32())) if keys.num_rows else pa.array([], pa.bool_())
    keys = keys.filter(at)
    if not keys.num_rows:
        log("[residuals] no feature at a layer an AV reads: nothing to compute")
        return {"features": 0}
    used = sorted(set(keys.column("layer").to_pylist()))
    return residuals(examples_dir, keys.select(["sae_id", "feature"]), used, n_examples, out_dir, contexts_dir, model, cfg, attempt)


def todo_keys(keys: pa.Table, out_dir: Path) -> tuple[pa.Table, int]:
    """The keys without a committed row, in (sae_id, feature) order; and how many had one."""
    done = committed_keys(out_dir)
    keys = keys.select(["sae_id", "feature"]).group_by(["sae_id", "feature"]).aggregate([])
    todo = keys.join(done, ["sae_id", "feature"], join_type="left anti") if done.num_rows else keys
    return todo.sort_by([("sae_id", "ascending"), ("feature", "ascending")]), keys.num_rows - todo.num_rows


def run_shard(name: str, keys: pa.Table, features_dir: Path, contexts_dir: Path | None, out_dir: Path, layers: list[int],
              n_examples: int, model: ModelConfig, cfg: ResidualsConfig) -> dict:
    """One shard: inputs (a Ray task) → the actors → files (the workers) → part → marker."""
    import ray

    n_blocks = max(1, math.ceil(len(keys) * n_examples / cfg.batch_size))
    refs = remote(_shard_inputs).options(num_returns=n_blocks + 1).remote(
        str(features_dir), str(contexts_dir) if contexts_dir else None, keys, n_examples, cfg.batch_size, n_blocks)
    counts = ray.get(refs[-1])
    if counts["to_compute"]:
        tmp = out_dir / f".{name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        kwargs = {"model": model.model_dump(), "layers": layers, "threads": max(1, math.ceil(model.num_cpus)), "prepend_bos": cfg.prepend_bos}
        ds = actor_map(ray.data.from_arrow_refs(list(refs[:-1])), ResidualWorker, kwargs, size=cfg.num_actors, num_cpus=model.num_cpus,
                       num_gpus=model.num_gpus, resources=model.resources, fault_tolerant=True, keep=True)
        gather(ds.map_batches(_write_rows, batch_format="pyarrow", fn_kwargs={"out_dir": str(tmp)}))
        rows = ray.get(remote(_commit_shard).remote(str(tmp), str(out_dir / f"{name}.parquet")))
    else:  # every example kept its residual: an empty part marks the shard done
        write_parquet_atomic(schema.empty(schema.RESIDUALS), out_dir / f"{name}.parquet")
        rows = 0
    write_json_atomic({"features": len(keys), "rows": rows, **counts}, marker(out_dir, name))
    return counts


def residuals(features_dir: Path, keys: pa.Table, layers: list[int], n_examples: int, out_dir: Path, contexts_dir: Path | None,
              model: ModelConfig | None, cfg: ResidualsConfig, attempt: int = 1) -> dict:
    """residuals/ for the features `keys` (sae_id, feature) of the features table: the
    residual at the top token of each of their first `n_examples` top examples, at their
    SAE's layer (`layers`: every layer among them). Resumes from the committed parts;
    returns the stage's counts (the manifest's)."""
    clear_uncommitted(out_dir)
    todo, resumed = todo_keys(keys, out_dir)
    if resumed:
        log(f"[residuals] resuming: {resumed} features done by an earlier attempt")
    if todo.num_rows and model is None:
        raise ValueError("the residuals stage runs the base model: the job needs the model section "
                         "(the model whose residual stream the AV reads)")
    totals: dict[str, int] = {}
    size = cfg.shard_features
    n_shards = math.ceil(todo.num_rows / size)
    with progress.bar("residuals", total=todo.num_rows * n_examples, unit="example") as bar:
        for s in range(n_shards):
            counts = run_shard(f"a{attempt:05d}-s{s:05d}", todo.slice(s * size, size), features_dir, contexts_dir, out_dir,
                               sorted(set(layers)), n_examples, model, cfg)
            bar.add_total(counts["to_compute"] - min(size, todo.num_rows - s * size) * n_examples)
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v
    import ray

    summary = ray.get(remote(table_counts).remote(str(out_dir), keys.select(["sae_id", "feature"])))
    return {"features": keys.num_rows, "resumed_features": resumed, "shards": n_shards, **totals, **summary}


def table_counts(out_dir: str, keys: pa.Table) -> dict:
    """A Ray task: the residuals table's counts for the features `keys`: rows, by source,
    examples mapped from strings and refused (refusals by reason), tokens the model read."""
    parts = committed_parts(Path(out_dir))
    like = pa.schema([schema.RESIDUALS.field(c) for c in ("sae_id", "feature", "source", "mapped", "n_tokens", "error")])
    t = pa.concat_tables([pq.read_table(p, schema=like) for p in parts]) if parts else like.empty_table()
    if t.num_rows and keys.num_rows:
        t = t.take(schema.rows_of(t, keys))
    source = t.column("source").to_pylist()
    refused = pc.equal(t.column("source"), "refused")
    reasons: dict[str, int] = {}
    for e in t.column("error").drop_null().to_pylist():
        reasons[e.split(":", 1)[0]] = reasons.get(e.split(":", 1)[0], 0) + 1
    count = lambda mask: int(pc.sum(mask).as_py() or 0)  # noqa: E731
    return {"rows": t.num_rows, "from_context": source.count("context"), "from_window": source.count("window"),
            "mapped": count(pc.and_(t.column("mapped"), pc.invert(refused))), "refused": count(refused),
            "refused_by_reason": dict(sorted(reasons.items())), "tokens": int(pc.sum(t.column("n_tokens")).as_py() or 0)}
