"""LLM labelling: features in, one label row per feature (schema.LABELS) out.

    features ─map_batches(build prompts)─▶ prompt rows ─backend─▶ answers ─parse─▶ labels
                                                  ▲                          │ unreadable
                                                  └── retry prompt (the failed answer and
                                                      what was wrong with it), all features
                                                      of a round in one backend pass

The prompts of all features go to the backend together; a retry round sends every feature
whose answer could not be parsed, again together. After `max_retries` further tries a
feature gets `label = null` and its `error`: never silently dropped. A request that failed
in the backend itself (after the backend's own retries) is recorded with that error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray

from baez_ray import prompts, schema
from baez_ray.backends import generate
from baez_ray.config import LLMConfig


@dataclass(frozen=True)
class LLMMethod:
    name: str
    build: Callable[[list[dict]], list[dict]]  # examples → chat messages
    marker: str
    version: str
    n_examples: int
    max_tokens: int


def llm_method(name: str) -> LLMMethod:
    """The LLM labelling methods of SPEC §2 that read activation examples."""
    m = re.fullmatch(r"eleuther_acts_top(\d+)", name)
    if m:
        return LLMMethod(name, prompts.eleuther_messages, prompts.ELEUTHER_MARKER, prompts.ELEUTHER_VERSION, int(m.group(1)), 200)
    if name in ("np_max_act", "small_llm"):
        return LLMMethod(name, prompts.np_messages, prompts.NP_MARKER, prompts.NP_VERSION, 10, 40)
    raise ValueError(f"unknown LLM labelling method {name!r} (eleuther_acts_topK, np_max_act, small_llm)")


def _prompt_rows(method: LLMMethod, temperature: float):
    def build(batch: pa.Table) -> pa.Table:
        rows = []
        for f in batch.select(["sae_id", "layer", "feature", "examples"]).to_pylist():
            examples = [e for e in f["examples"] if e["kind"] == "top"][: method.n_examples]
            rows.append(
                {
                    "request_id": f"{f['sae_id']}|{f['feature']}|{method.name}",
                    "messages": method.build(examples),
                    "max_tokens": method.max_tokens,
                    "temperature": temperature,
                    "stop": None,
                    "constraint": None,
                    "sae_id": f["sae_id"],
                    "layer": f["layer"],
                    "feature": f["feature"],
                    "n_examples": len(examples),
                }
            )
        return _table(rows)

    return build


def _table(rows: list[dict]) -> pa.Table:
    from baez_ray.backends import prompt_table

    t = prompt_table(rows)
    return t.set_column(t.schema.get_field_index("layer"), "layer", t.column("layer").cast(pa.int32()))


def label_with_llm(features, method_name: str, llm: LLMConfig, max_retries: int = 2, temperature: float = 0.0) -> pa.Table:
    """Label every feature of `features` (a Ray Dataset of FEATURES rows) with one LLM
    method that reads activation examples; returns the LABELS table."""
    method = llm_method(method_name)
    pending = features.map_batches(_prompt_rows(method, temperature), batch_format="pyarrow")
    return _label_rounds(pending, method.name, method.marker, method.version, llm, max_retries)


PASS = ("request_id", "max_tokens", "temperature", "stop", "constraint", "sae_id", "layer", "feature", "n_examples")


def _label_rounds(pending, method: str, marker: str, version: str, llm: LLMConfig, max_retries: int) -> pa.Table:
    """Send the prompt rows, parse, and resend the unreadable ones (with the failed answer,
    what was wrong, and the reply prefilled with the marker) up to `max_retries` times,
    every round all features together."""
    spent: dict[str, list] = {}  # request_id → [input tokens, output tokens, cost, tries]
    done: list[dict] = []
    extra = [c for c in ("evidence", "evidence_scores") if c in pending.schema().names]
    for attempt in range(max_retries + 1):
        answered = _collect(generate(pending, llm))
        retry = []
        for row in answered.to_pylist():
            acc = spent.setdefault(row["request_id"], [0, 0, 0.0, 0])
            acc[0] += row["input_tokens"]
            acc[1] += row["output_tokens"]
            acc[2] += row["cost_usd"]
            acc[3] += 1
            if row["error"]:
                label, problem = None, row["error"]
            elif attempt == 0:
                label, problem = prompts.parse_marked(row["answer"], marker)
            else:  # the retry prefilled the marker: the answer is the label
                label, problem = prompts.parse_marked(f"{marker} {row['answer'] or ''}", marker)
            if label is not None or row["error"] is not None or attempt == max_retries:
                done.append({**row, "label": label, "problem": problem})
            else:
                msgs = list(row["messages"])
                if attempt > 0:  # drop the previous retry's prefill
                    msgs = msgs[:-1]
                msgs += [
                    {"role": "assistant", "content": row["answer"] or ""},
                    {"role": "user", "content": prompts.RETRY_TEMPLATE.format(problem=problem, marker=marker)},
                    {"role": "assistant", "content": marker},  # prefill: the reply starts with the marker
                ]
                retry.append({k: row[k] for k in PASS + tuple(extra)} | {"messages": msgs})
        if not retry:
            break
        pending = ray.data.from_arrow(_table(retry))
    out = []
    for row in done:
        inp, outp, usd, tries = spent[row["request_id"]]
        out.append(
            {
                "sae_id": row["sae_id"], "layer": row["layer"], "feature": row["feature"], "method": method,
                "label": row["label"], "prompt_version": version, "backend": row["backend"], "model": row["model"],
                "n_examples": row["n_examples"], "input_tokens": inp, "output_tokens": outp, "cost_usd": usd, "tries": tries,
                "error": None if row["label"] is not None else (row["problem"] or "no label"), "raw": row["answer"],
                **{c: row.get(c) for c in extra},
            }
        )
    return schema.conform(pa.Table.from_pylist(out), schema.LABELS) if out else schema.empty(schema.LABELS)


# ------------------------------------------------------------------ baez, baez_last

def _av_rows(n_examples: int):
    """FEATURES rows → one row per top example: the vector the AV reads (the residual at
    the top token, kept by collect) and its 1-10 activation score."""

    def build(batch: pa.Table) -> pa.Table:
        rows = []
        for f in batch.select(["sae_id", "layer", "feature", "max_activation", "examples"]).to_pylist():
            top = [e for e in f["examples"] if e["kind"] == "top"][:n_examples]
            for e in top:
                rows.append({
                    "sae_id": f["sae_id"], "layer": f["layer"], "feature": f["feature"], "rank": e["rank"],
                    "score": max(1, min(10, math.ceil(10 * e["value"] / f["max_activation"]))) if f["max_activation"] > 0 else 1,
                    "vector": e["residual"],
                })
        return pa.Table.from_pylist(rows) if rows else pa.table({"sae_id": pa.array([], pa.string()), "layer": pa.array([], pa.int32()),
                                                                 "feature": pa.array([], pa.int64()), "rank": pa.array([], pa.int32()),
                                                                 "score": pa.array([], pa.int64()), "vector": pa.array([], pa.list_(pa.float32()))})

    return build


def verbalize(features, sidecar_path: str, n_examples: int = 10, num_actors: int = 1, num_cpus: float = 1.0,
              num_gpus: float = 0.0, batch_size: int = 8, device: str = "cpu") -> pa.Table:
    """AV explanations of each feature's top examples: rows (feature, rank, score,
    explanation, verbalizer, av_error). Examples need the residual vector (collect with
    keep_residual)."""
    rows = features.map_batches(_av_rows(n_examples), batch_format="pyarrow")
    rows = rows.filter(lambda r: r["vector"] is not None)
    from baez_ray.models.av import AVWorker

    out = rows.map_batches(
        AVWorker, fn_constructor_kwargs={"sidecar_path": sidecar_path, "device": device, "threads": max(1, math.ceil(num_cpus))},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus, num_gpus=num_gpus or None,
    )
    return _collect(out.drop_columns(["vector"]))


def label_baez(features, sidecar_path: str, llm: LLMConfig, last_only: bool = False, n_examples: int = 10,
               max_retries: int = 2, av: dict | None = None, max_tokens: int = 200) -> pa.Table:
    """`baez` (`baez_last`: only the last paragraph of each explanation): the explainer
    reads the AV's explanations of the top examples, each with its 1-10 activation score."""
    from baez_ray.models.av import last_paragraph

    method = "baez_last" if last_only else "baez"
    expl = verbalize(features, sidecar_path, n_examples, **(av or {}))
    by_feature: dict[tuple, list[dict]] = {}
    for r in expl.to_pylist() if expl.num_rows else []:
        by_feature.setdefault((r["sae_id"], r["layer"], r["feature"]), []).append(r)
    prompt_rows = []
    for (sae_id, layer, feat), rs in sorted(by_feature.items()):
        rs = sorted((r for r in rs if r["explanation"]), key=lambda r: r["rank"])
        texts = [last_paragraph(r["explanation"]) if last_only else r["explanation"] for r in rs]
        scores = [int(r["score"]) for r in rs]
        if not texts:
            continue
        prompt_rows.append({
            "request_id": f"{sae_id}|{feat}|{method}", "messages": prompts.baez_messages(texts, scores), "max_tokens": max_tokens,
            "temperature": 0.0, "stop": None, "constraint": None, "sae_id": sae_id, "layer": layer, "feature": feat,
            "n_examples": len(texts), "evidence": texts, "evidence_scores": scores,
        })
    labels = (_label_rounds(ray.data.from_arrow(_table(prompt_rows)), method, prompts.ELEUTHER_MARKER, prompts.BAEZ_VERSION, llm, max_retries)
              if prompt_rows else schema.empty(schema.LABELS))
    # a feature with no usable explanation still gets its row, with the reason
    have = {(r["sae_id"], r["feature"]) for r in prompt_rows}
    errors = {(r["sae_id"], r["feature"]): r["av_error"] for r in (expl.to_pylist() if expl.num_rows else []) if r["av_error"]}
    missing = [
        {"sae_id": k["sae_id"], "layer": k["layer"], "feature": k["feature"], "method": method, "label": None,
         "prompt_version": prompts.BAEZ_VERSION, "n_examples": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "tries": 0,
         "error": errors.get((k["sae_id"], k["feature"])) or "no AV explanation: the top examples carry no residual vector (collect with keep_residual)"}
        for k in _collect(features.select_columns(["sae_id", "layer", "feature"])).to_pylist()
        if (k["sae_id"], k["feature"]) not in have
    ]
    if missing:
        labels = pa.concat_tables([labels, schema.conform(pa.Table.from_pylist(missing), schema.LABELS)])
    return labels


def _collect(ds) -> pa.Table:
    batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(batches, promote_options="default") if batches else pa.table({})


def failure_rate(labels: pa.Table) -> float:
    return 0.0 if labels.num_rows == 0 else pc.sum(pc.is_null(labels.column("label"))).as_py() / labels.num_rows
