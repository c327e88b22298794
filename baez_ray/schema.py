"""Every table's columns, in one place.

Stages name the columns they read and the columns they add against these schemas, so
the path of the data through the system can be read off the stage list. All tables are
Parquet; nested columns (the examples of a feature) are Arrow list<struct>.

Tables
------
contexts    the corpus as token contexts (collect's input).
features    one row per SAE feature: firing statistics and its activation examples
            (written by `collect` and `ingest`).
candidates  collect's intermediate rows, streamed from the base-model actors to the merge.
prompts     one row per LLM request (messages, sampling parameters, output constraint);
answers     the same rows with the answer, token counts, cost and error (every backend).
routes      one row per feature: correlation scores, tier, kind            (route stage)
residuals   one row per example an AV method reads: the layer-L residual vector at its
            top token, computed from its left context, or the error    (residuals stage)
labels      one row per (feature, method): the label and its provenance    (label stage)
scores      one row per (feature, method, benchmark): metrics and counts   (score stage)
rejects     one row per input record that could not be used, with the reason.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1"

# One activation example: a window of tokens of one context, with the feature's activation
# at every token. `top_index` is the position of the top-activating token inside the window.
EXAMPLE = pa.struct(
    [
        pa.field("kind", pa.string(), nullable=False),  # "top" | "sample" (decile sample)
        pa.field("rank", pa.int32(), nullable=False),  # 0-based rank within its kind
        pa.field("decile", pa.int8()),  # 1..10 for samples: ceil(10*value/max_activation)
        pa.field("context_id", pa.int64()),  # corpus context (collect); null for ingest
        pa.field("position", pa.int32()),  # top token's position in its context
        pa.field("value", pa.float32(), nullable=False),  # activation at the top token
        pa.field("top_index", pa.int32(), nullable=False),
        pa.field("tokens", pa.list_(pa.int32())),  # token ids (null when unknown: ingest)
        pa.field("token_strs", pa.list_(pa.string()), nullable=False),
        pa.field("acts", pa.list_(pa.float32()), nullable=False),
        # layer-L residual vector at the top token (optional, collect only)
        pa.field("residual", pa.list_(pa.float32())),
    ]
)

FEATURES = pa.schema(
    [
        pa.field("sae_id", pa.string(), nullable=False),  # e.g. "gemma-3-270m/12-res-demo"
        pa.field("model_id", pa.string(), nullable=False),  # the base model's id (model.id; modelId for ingest)
        pa.field("layer", pa.int32(), nullable=False),  # the block whose output the SAE reads
        pa.field("feature", pa.int64(), nullable=False),  # the feature's index within its SAE
        pa.field("n_tokens", pa.int64(), nullable=False),  # tokens seen (0 when unknown)
        pa.field("n_firing", pa.int64(), nullable=False),  # tokens with activation > 0
        pa.field("max_activation", pa.float32(), nullable=False),  # the largest activation seen (0 for a feature that never fired)
        pa.field("examples", pa.list_(EXAMPLE), nullable=False),  # top examples (kind top, by rank) and decile samples (kind sample)
        # top logits of the decoder direction, when known (Neuronpedia pos_str/neg_str)
        pa.field("pos_tokens", pa.list_(pa.string())),
        pa.field("pos_values", pa.list_(pa.float32())),  # their logit values
        pa.field("neg_tokens", pa.list_(pa.string())),  # the most suppressed tokens
        pa.field("neg_values", pa.list_(pa.float32())),  # their logit values
        # labels that came with an export (Neuronpedia explanations), for comparison
        pa.field("source_explanations", pa.list_(pa.string())),
    ],
    metadata={"table": "features", "schema_version": SCHEMA_VERSION},
)

# A corpus cut into contexts of equal length (each starts with BOS when the tokenizer has
# one). `context_id` is the context's index in the corpus token stream.
CONTEXTS = pa.schema(
    [
        pa.field("context_id", pa.int64(), nullable=False),  # the context's index in the corpus token stream
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),  # token ids, BOS first
    ],
    metadata={"table": "contexts", "schema_version": SCHEMA_VERSION},
)

# collect: what one base-model actor emits per batch. `kind` is "top" or "sample" for an
# example that entered the actor's running top-k (by value) or reservoir (by hashed key);
# "count" rows carry per-feature firing counts (feature = -1 carries the token count).
CANDIDATES = pa.schema(
    [
        pa.field("kind", pa.string(), nullable=False),  # top | sample | count
        pa.field("feature", pa.int64(), nullable=False),  # the feature, numbered across every SAE of the job
        pa.field("value", pa.float32(), nullable=False),  # activation at the top token
        pa.field("key", pa.float64(), nullable=False),  # sort key (value or hashed key)
        pa.field("context_id", pa.int64(), nullable=False),  # the corpus context
        pa.field("position", pa.int32(), nullable=False),  # the top token's position in its context
        pa.field("top_index", pa.int32(), nullable=False),  # the top token's index in the window
        pa.field("tokens", pa.list_(pa.int32())),  # the window's token ids
        pa.field("acts", pa.list_(pa.float32())),  # the activation at every token of the window
        pa.field("residual", pa.list_(pa.float32())),  # the residual at the top token (keep_residual)
        pa.field("count", pa.int64(), nullable=False),  # count rows: the firing count
    ],
    metadata={"table": "candidates", "schema_version": SCHEMA_VERSION},
)

# LLM requests: one row per prompt, in any stage's table (other columns pass through the
# backend untouched). `constraint`: null, or "binary_list:N" (a JSON list of N 0/1 values;
# backends with structured outputs enforce it, the others rely on the prompt and the parser).
# `top_logprobs`: null, or k > 0: the row asks for the top-k log-probs of every token of its
# answer (`token_logprobs`), where the backend gives them (transformers, vllm, openai).
MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
PROMPTS = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),  # unique per prompt; answers come back under it
        pa.field("messages", pa.list_(MESSAGE), nullable=False),  # the chat: system, user and assistant (a prefill) turns
        pa.field("max_tokens", pa.int32(), nullable=False),  # longest answer
        pa.field("temperature", pa.float32(), nullable=False),  # sampling temperature (0: greedy)
        pa.field("stop", pa.list_(pa.string())),  # stop strings
        pa.field("constraint", pa.string()),  # null | binary_list:N | activation_lines:N | choice:A,B | logprob:A,B
        pa.field("top_logprobs", pa.int32()),  # null | k: the top-k log-probs of every answer token (token_logprobs)
    ],
    metadata={"table": "prompts", "schema_version": SCHEMA_VERSION},
)
# the answer token by token, each with the k most likely tokens at its place (a row's
# `top_logprobs`); the token's own entry is always there, among `top` or not
TOKEN_LOGPROB = pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float64())])
TOKEN_LOGPROBS = pa.list_(pa.struct([pa.field("token", pa.string()), pa.field("logprob", pa.float64()),
                                     pa.field("top", pa.list_(TOKEN_LOGPROB))]))
# what every backend adds to each prompt row
ANSWER_FIELDS = [
    pa.field("answer", pa.string()),  # null when the request failed
    pa.field("input_tokens", pa.int64(), nullable=False),  # prompt tokens
    pa.field("output_tokens", pa.int64(), nullable=False),  # answer tokens
    pa.field("cost_usd", pa.float64(), nullable=False),  # price x tokens
    pa.field("error", pa.string()),  # null on success
    pa.field("backend", pa.string(), nullable=False),  # the backend that answered
    pa.field("model", pa.string(), nullable=False),  # the model that answered
    # a `logprob:A,B` row: P(A) / (P(A) + P(B)) for the first answer token, from the
    # scorer's log-probs; null on every other row and when neither token was among them
    pa.field("p_yes", pa.float64()),
    # a row with `top_logprobs`: every answer token with its top-k (null elsewhere, and where
    # the backend gives no log-probs: anthropic)
    pa.field("token_logprobs", TOKEN_LOGPROBS),
]
ANSWERS = pa.schema(list(PROMPTS) + ANSWER_FIELDS, metadata={"table": "answers", "schema_version": SCHEMA_VERSION})

ROUTES = pa.schema(
    [
        pa.field("sae_id", pa.string(), nullable=False),  # the feature's SAE
        pa.field("layer", pa.int32(), nullable=False),  # its layer
        pa.field("feature", pa.int64(), nullable=False),  # its index within the SAE
        pa.field("n_examples", pa.int32(), nullable=False),  # top examples the scores were computed over
        pa.field("c_in", pa.float32()),  # correlation score of the input window (null: fewer than two windows)
        pa.field("c_out", pa.float32()),  # correlation score of the output window
        pa.field("c_cross", pa.float32()),  # null when not computed (tier 1)
        pa.field("tier", pa.int8(), nullable=False),  # 1, 2, 3; 0: not routed (label.route: false)
        pa.field("kind", pa.string(), nullable=False),  # input | output | cross | obscure | not_routed
    ],
    metadata={"table": "routes", "schema_version": SCHEMA_VERSION},
)
NOT_ROUTED_TIER = 0  # a label job without routing (label.route: false): one method labels every feature
NOT_ROUTED_KIND = "not_routed"

# residuals stage: one row per (sae_id, feature, kind, rank) example of a features table that
# an AV method reads; `source` says which left context the base model read: "context" (the
# corpus context up to the top token, collect), "window" (the example's own window up to its
# top token: an export's, or a collect's without its contexts table), "refused" (no residual:
# `error` says why, e.g. a token string that maps to no single id)
RESIDUALS = pa.schema(
    [
        pa.field("sae_id", pa.string(), nullable=False),  # the feature's SAE
        pa.field("layer", pa.int32(), nullable=False),  # its layer: the block whose output is read
        pa.field("feature", pa.int64(), nullable=False),  # its index within the SAE
        pa.field("kind", pa.string(), nullable=False),  # the example's kind in the features table (top)
        pa.field("rank", pa.int32(), nullable=False),  # the example's rank within its kind
        pa.field("context_id", pa.int64()),  # its corpus context (collect); null for an export's
        pa.field("position", pa.int32()),  # its top token's position in that context
        pa.field("top_index", pa.int32(), nullable=False),  # its top token's position in its window
        pa.field("source", pa.string(), nullable=False),  # context | window | refused
        pa.field("n_tokens", pa.int32(), nullable=False),  # tokens the model read (BOS included); 0 when refused
        pa.field("mapped", pa.bool_(), nullable=False),  # token ids mapped from the example's strings (ingest)
        pa.field("residual", pa.list_(pa.float32())),  # the residual after block `layer` at the top token; null when refused
        pa.field("error", pa.string()),  # why there is no residual (e.g. an unmappable token string); null on success
    ],
    metadata={"table": "residuals", "schema_version": SCHEMA_VERSION},
)

LABELS = pa.schema(
    [
        pa.field("sae_id", pa.string(), nullable=False),  # the feature's SAE
        pa.field("layer", pa.int32(), nullable=False),  # its layer
        pa.field("feature", pa.int64(), nullable=False),  # its index within the SAE
        pa.field("method", pa.string(), nullable=False),  # the labelling method (manual: tier 3 flagged for a human)
        pa.field("label", pa.string()),  # null when labelling failed
        pa.field("tier", pa.int8()),  # the feature's tier (1, 2, 3)
        pa.field("kind", pa.string()),  # input | output | cross | obscure
        pa.field("prompt_version", pa.string()),  # the prompt's version (none: no LLM)
        pa.field("backend", pa.string()),  # the LLM backend that answered
        pa.field("model", pa.string()),  # the LLM that answered
        pa.field("n_examples", pa.int32(), nullable=False),  # examples the method read
        pa.field("input_tokens", pa.int64(), nullable=False),  # prompt tokens, retries included
        pa.field("output_tokens", pa.int64(), nullable=False),  # answer tokens, retries included
        pa.field("cost_usd", pa.float64(), nullable=False),  # the row's cost (price x tokens)
        pa.field("tries", pa.int32(), nullable=False),  # tries made (0: not tried, e.g. tier 3 flagged for a human)
        pa.field("error", pa.string()),  # why there is no label (null on success)
        pa.field("raw", pa.string()),  # the explainer's full answer
        pa.field("evidence", pa.list_(pa.string())),  # e.g. AV explanations used by baez
        pa.field("evidence_scores", pa.list_(pa.int32())),  # their 1-10 activation scores
    ],
    metadata={"table": "labels", "schema_version": SCHEMA_VERSION},
)

SCORES = pa.schema(
    [
        pa.field("sae_id", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("feature", pa.int64(), nullable=False),
        pa.field("method", pa.string(), nullable=False),  # or "random_label"
        pa.field("benchmark", pa.string(), nullable=False),  # detection | fuzz | embedding | ... (metrics.HEADLINE)
        pa.field("label", pa.string()),
        pa.field("n_shown", pa.int32(), nullable=False),
        pa.field("n_failed", pa.int32(), nullable=False),  # examples in failed batches
        pa.field("balanced_accuracy", pa.float64()),
        pa.field("accuracy", pa.float64()),
        pa.field("precision", pa.float64()),
        pa.field("recall", pa.float64()),
        pa.field("f1", pa.float64()),
        pa.field("gap", pa.float64()),
        pa.field("auroc", pa.float64()),
        # simulation: Pearson correlation of the predicted and the true activations
        pa.field("correlation", pa.float64()),
        # the headline metric (metrics.HEADLINE: balanced accuracy, AUROC, correlation) on each half of the
        # feature's excerpts (metrics.split_halves): split-half reliability
        pa.field("score_half_a", pa.float64()),
        pa.field("score_half_b", pa.float64()),
        pa.field("prompt_version", pa.string()),
        pa.field("input_tokens", pa.int64(), nullable=False),
        pa.field("output_tokens", pa.int64(), nullable=False),
        pa.field("cost_usd", pa.float64(), nullable=False),
    ],
    metadata={"table": "scores", "schema_version": SCHEMA_VERSION},
)

REJECTS = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # file the record came from
        pa.field("line", pa.int64()),  # 1-based line number, when line-based
        pa.field("reason", pa.string(), nullable=False),
        pa.field("record", pa.string()),  # the record itself, truncated
    ],
    metadata={"table": "rejects", "schema_version": SCHEMA_VERSION},
)

TABLES = {
    "contexts": CONTEXTS,
    "features": FEATURES,
    "candidates": CANDIDATES,
    "prompts": PROMPTS,
    "answers": ANSWERS,
    "routes": ROUTES,
    "residuals": RESIDUALS,
    "labels": LABELS,
    "scores": SCORES,
    "rejects": REJECTS,
}


def empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast `table` to `schema` (column order and types); missing nullable columns are
    filled with nulls. Raises ValueError naming the column that does not fit."""
    cols = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise ValueError(f"column {field.name!r}: cannot cast {col.type} to {field.type}: {e}") from e
        elif field.nullable:
            col = pa.nulls(table.num_rows, field.type)
        else:
            raise ValueError(f"missing required column {field.name!r} for table {schema.metadata.get(b'table', b'?').decode()}")
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def key_table(keys) -> pa.Table:
    """(sae_id, feature) keys as a two-column table (for joins)."""
    keys = list(keys)
    return pa.table({"sae_id": pa.array([s for s, _ in keys], pa.string()), "feature": pa.array([f for _, f in keys], pa.int64())})


def rows_of(table: pa.Table, keys: pa.Table) -> pa.Array:
    """Indices (ascending) of the rows of `table` whose (sae_id, feature) is among `keys`: a
    semi join on the two key columns alone (Acero joins carry no list columns)."""
    rows = pa.table({"sae_id": table.column("sae_id"), "feature": table.column("feature"), "row": pa.array(np.arange(table.num_rows))})
    hit = rows.join(keys, ["sae_id", "feature"], join_type="left semi")
    return pa.array(np.sort(hit.column("row").to_numpy()), pa.int64())


def read_keyed(path, keys: pa.Table, columns: list[str] | None = None) -> pa.Table:
    """The rows of the Parquet table at `path` whose (sae_id, feature) is among `keys` (a
    non-empty table of the two), read with a filter on `feature` (row-group statistics
    skip the rest of a big table) and taken by `rows_of`: only those rows, in table order."""
    feats = sorted(set(keys.column("feature").to_pylist()))
    table = pq.read_table(path, columns=columns, filters=[("feature", "in", feats)])
    return table.take(rows_of(table, keys))
