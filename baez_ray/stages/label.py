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
import os
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


def tally(spent: dict[str, list], row: dict) -> None:
    """Add one answered try of a request to its [input tokens, output tokens, cost, tries]."""
    acc = spent.setdefault(row["request_id"], [0, 0, 0.0, 0])
    acc[0] += row["input_tokens"]
    acc[1] += row["output_tokens"]
    acc[2] += row["cost_usd"]
    acc[3] += 1


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
            tally(spent, row)
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


AV_RUN_KEYS = ("num_actors", "num_cpus", "num_gpus", "batch_size", "device", "engine", "engine_kwargs")


def _run_kwargs(av: dict | None) -> dict:
    """The keys of a `label.av` section (AVRunConfig) that say where the AV runs."""
    return {k: v for k, v in (av or {}).items() if k in AV_RUN_KEYS}


def verbalize_vectors(rows, sidecar_path: str, num_actors: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0,
                      batch_size: int = 8, device: str = "cpu", engine: str = "transformers", engine_kwargs: dict | None = None):
    """Rows with a `vector` column (a Ray Dataset) → the same rows with `explanation`,
    `verbalizer`, `av_engine`, `av_error` (lazy). The AV runs in an actor pool, on the
    transformers engine or vLLM (`engine: vllm`, `vllm.LLM(enable_prompt_embeds=True)`)."""
    from baez_ray.models.av import ENGINES, AVWorker

    if engine not in ENGINES:
        raise ValueError(f"unknown AV engine {engine!r} (known: {', '.join(ENGINES)})")
    extra = {}
    if engine == "vllm":  # the engine reads VLLM_* settings (e.g. VLLM_CPU_KVCACHE_SPACE) in the actor
        env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
        if env:
            extra["runtime_env"] = {"env_vars": env}
    return rows.map_batches(
        AVWorker, fn_constructor_kwargs={"sidecar_path": sidecar_path, "device": device, "threads": max(1, math.ceil(num_cpus)),
                                         "engine": engine, "engine_kwargs": dict(engine_kwargs or {}) or None},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=num_cpus, num_gpus=num_gpus or None, **extra,
    )


def verbalize(features, sidecar_path: str, n_examples: int = 10, num_actors: int = 1, num_cpus: float = 1.0,
              num_gpus: float = 0.0, batch_size: int = 8, device: str = "cpu", engine: str = "transformers",
              engine_kwargs: dict | None = None, **_other) -> pa.Table:
    """AV explanations of each feature's top examples: rows (feature, rank, score,
    explanation, verbalizer, av_engine, av_error). Examples need the residual vector
    (collect with keep_residual). Keys of a `label.av` section that are not about where
    the AV runs are ignored."""
    rows = features.map_batches(_av_rows(n_examples), batch_format="pyarrow")
    rows = rows.filter(lambda r: r["vector"] is not None)
    out = verbalize_vectors(rows, sidecar_path, num_actors, num_cpus, num_gpus, batch_size, device, engine, engine_kwargs)
    return _collect(out.drop_columns(["vector"]))


def label_baez(features, sidecar_path: str, llm: LLMConfig, last_only: bool = False, n_examples: int = 10,
               max_retries: int = 2, av: dict | None = None, max_tokens: int = 200) -> pa.Table:
    """`baez` (`baez_last`: only the last paragraph of each explanation): the explainer
    reads the AV's explanations of the top examples, each with its 1-10 activation score."""
    from baez_ray.models.av import last_paragraph

    method = "baez_last" if last_only else "baez"
    expl = verbalize(features, sidecar_path, n_examples, **_run_kwargs(av))
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


# ------------------------------------------------------------------ nla_direct

class DecoderRows:
    """Ray Data actor: feature keys in; `vector` (the SAE decoder row W_dec[feature], which
    the AV then reads) and `decoder_error` added. Loads the SAE once (sae-lens, through
    `models.base.load_sae`) and keeps only W_dec."""

    def __init__(self, sae: dict):
        import torch

        from baez_ray.config import SAEConfig
        from baez_ray.models.base import load_sae

        cfg = SAEConfig(**sae)
        with torch.no_grad():
            model = load_sae(cfg, "cpu")
            self.w_dec = model.W_dec.detach().float().cpu().numpy()  # [d_sae, d_in]
        del model
        self.sae_id = cfg.id

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors, errors = [], []
        n = len(self.w_dec)
        for s, f in zip(batch.column("sae_id").to_pylist(), batch.column("feature").to_pylist()):
            if s != self.sae_id:
                vectors.append(None)
                errors.append(f"feature of SAE {s!r}, but the decoder loaded is SAE {self.sae_id!r}")
            elif not 0 <= f < n:
                vectors.append(None)
                errors.append(f"feature {f} is not in the SAE (it has {n} features)")
            else:
                vectors.append(self.w_dec[f])
                errors.append(None)
        col = pa.array([v.tolist() if v is not None else None for v in vectors], pa.list_(pa.float32()))
        return batch.append_column("vector", col).append_column("decoder_error", pa.array(errors, pa.string()))


def label_nla_direct(features, sidecar_path: str, sae, llm: LLMConfig | None = None, shorten: bool | None = None,
                     max_retries: int = 2, av: dict | None = None, max_tokens: int = 200) -> pa.Table:
    """`nla_direct` (SPEC §2): the AV reads the feature's SAE decoder row (`sae`: the
    SAEConfig of the features' SAE); its explanation is the label, or, with `shorten`
    (default: `av["nla_direct_shorten"]`), the explainer `llm` condenses it into one. Every
    label row keeps the AV's text (`evidence`, one item) and the prompt version
    `nla_direct/v1+av:<sidecar name>`; a feature whose row or explanation failed gets its
    row with the error."""
    from baez_ray.models.av import load_sidecar

    sc = load_sidecar(sidecar_path)
    if shorten is None:
        shorten = bool((av or {}).get("nla_direct_shorten", False))
    if shorten and llm is None:
        raise ValueError("nla_direct with shorten needs an explainer LLM")
    run = _run_kwargs(av)
    engine = run.get("engine", "transformers")
    version = f"{prompts.NLA_DIRECT_VERSION}+av:{sc.name}"
    keys = features.select_columns(["sae_id", "layer", "feature"])
    rows = keys.map_batches(DecoderRows, fn_constructor_kwargs={"sae": sae.model_dump()}, batch_size=max(64, run.get("batch_size", 8)),
                            batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5)
    # one pass: rows without a decoder row reach the AV actor too, which skips them
    expl = _collect(verbalize_vectors(rows, sidecar_path, **run).drop_columns(["vector"]))

    base = {"method": "nla_direct", "prompt_version": version, "n_examples": 0, "input_tokens": 0, "output_tokens": 0,
            "cost_usd": 0.0, "tries": 0}
    out, prompt_rows = [], []
    for r in expl.to_pylist() if expl.num_rows else []:
        key = {"sae_id": r["sae_id"], "layer": r["layer"], "feature": r["feature"]}
        text = r["explanation"]
        if r["decoder_error"]:
            out.append({**base, **key, "label": None, "error": r["decoder_error"]})
        elif r["av_error"] or not text:
            out.append({**base, **key, "label": None, "backend": f"av:{engine}", "model": sc.av_model, "tries": 1,
                        "error": r["av_error"] or "the AV wrote no explanation", "raw": text, "evidence": [text] if text else None})
        elif not shorten:
            out.append({**base, **key, "label": text, "backend": f"av:{engine}", "model": sc.av_model, "tries": 1, "error": None,
                        "raw": text, "evidence": [text]})
        else:
            prompt_rows.append({"request_id": f"{r['sae_id']}|{r['feature']}|nla_direct", "messages": prompts.nla_direct_messages(text),
                                "max_tokens": max_tokens, "temperature": 0.0, "stop": None, "constraint": None, **key,
                                "n_examples": 0, "evidence": [text]})
    parts = [schema.conform(pa.Table.from_pylist([{f: r.get(f) for f in schema.LABELS.names} for r in out]), schema.LABELS)] if out else []
    if prompt_rows:
        parts.append(_label_rounds(ray.data.from_arrow(_table(prompt_rows)), "nla_direct", prompts.ELEUTHER_MARKER, version, llm, max_retries))
    return pa.concat_tables(parts) if parts else schema.empty(schema.LABELS)


def _collect(ds) -> pa.Table:
    batches = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
    return pa.concat_tables(batches, promote_options="default") if batches else pa.table({})


def failure_rate(labels: pa.Table) -> float:
    return 0.0 if labels.num_rows == 0 else pc.sum(pc.is_null(labels.column("label"))).as_py() / labels.num_rows
