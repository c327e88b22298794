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
    method; returns the LABELS table."""
    method = llm_method(method_name)
    pending = features.map_batches(_prompt_rows(method, temperature), batch_format="pyarrow")
    spent: dict[str, list[int]] = {}  # request_id → [input tokens, output tokens, tries]
    spent_cost: dict[str, float] = {}
    done: list[dict] = []
    for attempt in range(max_retries + 1):
        answered = _collect(generate(pending, llm))
        if answered.num_rows == 0:
            break
        retry = []
        for row in answered.to_pylist():
            acc = spent.setdefault(row["request_id"], [0, 0, 0])
            acc[0] += row["input_tokens"]
            acc[1] += row["output_tokens"]
            acc[2] += 1
            spent_cost[row["request_id"]] = spent_cost.get(row["request_id"], 0.0) + row["cost_usd"]
            label, problem = (None, row["error"]) if row["error"] else prompts.parse_marked(row["answer"], method.marker)
            final = label is not None or row["error"] is not None or attempt == max_retries
            if final:
                done.append({**row, "label": label, "problem": problem})
            else:
                msgs = list(row["messages"]) + [
                    {"role": "assistant", "content": row["answer"] or ""},
                    {"role": "user", "content": prompts.RETRY_TEMPLATE.format(problem=problem, marker=method.marker)},
                ]
                retry.append({k: row[k] for k in ("request_id", "max_tokens", "temperature", "stop", "constraint", "sae_id", "layer", "feature", "n_examples")} | {"messages": msgs})
        if not retry:
            break
        pending = ray.data.from_arrow(_table(retry))
    out = []
    for row in done:
        acc = spent[row["request_id"]]
        out.append(
            {
                "sae_id": row["sae_id"], "layer": row["layer"], "feature": row["feature"], "method": method.name,
                "label": row["label"], "prompt_version": method.version, "backend": row["backend"], "model": row["model"],
                "n_examples": row["n_examples"], "input_tokens": acc[0], "output_tokens": acc[1],
                "cost_usd": spent_cost[row["request_id"]], "tries": acc[2],
                "error": None if row["label"] is not None else (row["problem"] or "no label"), "raw": row["answer"],
            }
        )
    return schema.conform(pa.Table.from_pylist(out), schema.LABELS) if out else schema.empty(schema.LABELS)


def _collect(ds) -> pa.Table:
    batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(batches, promote_options="default") if batches else pa.table({})


def failure_rate(labels: pa.Table) -> float:
    return 0.0 if labels.num_rows == 0 else pc.sum(pc.is_null(labels.column("label"))).as_py() / labels.num_rows
