"""np_max_act_logits (tier 2): Neuronpedia's method, np_max_act plus the logit lens.

    features (examples, pos_tokens) ─map_batches─▶ one prompt row per feature:
        the max-activating token of each of the top 10 examples in a ±24-token window
        (np_max_act's user text) + "Top promoted tokens: ..." (the feature's 10 most
        promoted tokens, collect's logit lens or the export's)
      ─llm.rounds.label_rounds─▶ LABELS rows (answer line `Explanation: <label>`)

A feature without promoted tokens (logit lens off, an export without them) is labelled
from its examples, its prompt saying that none are known.
"""

from __future__ import annotations

import pyarrow as pa

from baez_ray.llm import prompts
from baez_ray.llm.rounds import label_rounds, rows_table
from baez_ray.methods.registry import LabelContext, register

METHOD = "np_max_act_logits"
N_EXAMPLES = 10
MAX_TOKENS = 40
ROW_TYPES = pa.schema([pa.field("layer", pa.int32())])


def prompt_rows(batch: pa.Table, max_tokens: int = MAX_TOKENS, temperature: float = 0.0) -> pa.Table:
    """A map_batches function: FEATURES rows → one prompt row per feature."""
    cols = ["sae_id", "layer", "feature", "examples"] + (["pos_tokens"] if "pos_tokens" in batch.column_names else [])
    rows = []
    for f in batch.select(cols).to_pylist():
        examples = [e for e in f["examples"] if e["kind"] == "top"][:N_EXAMPLES]
        rows.append({
            "request_id": f"{f['sae_id']}|{f['feature']}|{METHOD}", "messages": prompts.np_logits_messages(examples, f.get("pos_tokens")),
            "max_tokens": max_tokens, "temperature": temperature, "stop": None, "constraint": None,
            "sae_id": f["sae_id"], "layer": f["layer"], "feature": f["feature"], "n_examples": len(examples),
        })
    return rows_table(rows, ROW_TYPES)


@register(METHOD, tiers=(2,), needs=("explainer",))
def np_max_act_logits(features, ctx: LabelContext):
    """The registered method: the Ray Dataset of its LABELS rows (labelled in the workers)."""
    llm = ctx.explainer
    pending = features.map_batches(prompt_rows, batch_format="pyarrow", fn_kwargs={"max_tokens": llm.max_tokens or MAX_TOKENS})
    return label_rounds(pending, METHOD, prompts.NP_MARKER, prompts.NP_LOGITS_VERSION, llm, ctx.max_retries, dataset=True)
