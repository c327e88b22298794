"""Ask until the answer parses: the one loop of every LLM stage (labels and scores).

    prompt rows ─backend─▶ answers ─parse─▶ value ──────────────────────▶ done
         ▲                                    │ unreadable
         └── retry prompt: the conversation, the failed answer and what was wrong with
             it (labels: the reply prefilled with the marker); every unreadable prompt of
             a round together, up to `max_retries` further rounds

A prompt whose answer stays unreadable, or whose request failed in the backend (after the
backend's own retries), ends with `value = None` and its `problem`: never dropped. Every
try's tokens and cost are summed per prompt (`tally`). Log-prob scorer rows (one answer
token, `p_yes`) are not retried: their probability does not change when asked again.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from baez_ray import progress, schema
from baez_ray.llm import prompts
from baez_ray.llm.backends import generate, logprob_targets, prompt_table
from baez_ray.rundir import log

ANSWER_COLUMNS = {f.name for f in schema.ANSWER_FIELDS}


def tally(spent: dict[str, list], row: dict) -> None:
    """Add one answered try of a request to its [input tokens, output tokens, cost, tries]."""
    acc = spent.setdefault(row["request_id"], [0, 0, 0.0, 0])
    acc[0] += row["input_tokens"]
    acc[1] += row["output_tokens"]
    acc[2] += row["cost_usd"]
    acc[3] += 1


def rows_table(rows: list[dict], like: pa.Schema | None = None) -> pa.Table:
    """Prompt rows as a table; columns that `like` has too get its types."""
    t = prompt_table(rows)
    for f in like or []:
        if f.name in t.column_names and t.schema.field(f.name).type != f.type:
            t = t.set_column(t.schema.get_field_index(f.name), f.name, t.column(f.name).cast(f.type))
    return t


def ask_until_parsed(pending, llm, parse: Callable[[dict, int], tuple], retry_messages: Callable[[dict, str, int], list],
                     max_retries: int, what: str = "llm", retryable: Callable[[dict], bool] | None = None) -> list[dict]:
    """Send `pending` (a Ray Dataset of prompt rows), parse every answer with
    `parse(row, attempt) -> (value, problem)`, resend the unreadable ones with
    `retry_messages(row, problem, attempt)` (those for which `retryable(row)`, when given).
    Returns one dict per prompt: its row (last try), `value`, `problem`, and the tokens,
    cost and tries of all its tries. A progress bar counts the prompts answered, retry
    rounds included."""
    import ray

    from baez_ray.ray_pool import gather

    spent: dict[str, list] = {}
    done: list[dict] = []
    pending = pending.materialize()  # the prompts, counted for the bar
    with progress.bar(what, total=pending.count(), unit="prompt") as bar:
        for attempt in range(max_retries + 1):
            answered = gather(generate(pending, llm))
            retry = []
            for row in answered.to_pylist():
                tally(spent, row)
                value, problem = (None, row["error"]) if row["error"] else parse(row, attempt)
                final = attempt == max_retries or (retryable is not None and not retryable(row))
                if value is not None or row["error"] is not None or final:
                    done.append({**row, "value": value, "problem": problem})
                else:
                    keep = {k: v for k, v in row.items() if k not in ANSWER_COLUMNS}
                    retry.append(keep | {"messages": retry_messages(row, problem, attempt)})
            if not retry:
                break
            log(f"[{what}] retry {attempt + 1}/{max_retries}: {len(retry)} unreadable answers")
            bar.add_total(len(retry))  # the retry round's prompts join the bar
            pending = ray.data.from_arrow(rows_table(retry, answered.schema))
    for row in done:
        row["input_tokens"], row["output_tokens"], row["cost_usd"], row["tries"] = spent[row["request_id"]]
    return done


# ---- labels: the answer's last line is `<marker> <label>` ----------------------------------

def label_rounds(pending, method: str, marker: str, version: str, llm, max_retries: int) -> pa.Table:
    """Label prompt rows (with sae_id, layer, feature, n_examples; optional evidence,
    evidence_scores) → LABELS rows, one per prompt."""

    def parse(row: dict, attempt: int):
        if attempt == 0:
            return prompts.parse_marked(row["answer"], marker)
        return prompts.parse_marked(f"{marker} {row['answer'] or ''}", marker)  # the retry prefilled the marker

    def retry(row: dict, problem: str, attempt: int) -> list:
        msgs = list(row["messages"])
        if attempt > 0:  # drop the previous retry's prefill
            msgs = msgs[:-1]
        return msgs + [
            {"role": "assistant", "content": row["answer"] or ""},
            {"role": "user", "content": prompts.RETRY_TEMPLATE.format(problem=problem, marker=marker)},
            {"role": "assistant", "content": marker},  # prefill: the reply starts with the marker
        ]

    done = ask_until_parsed(pending, llm, parse, retry, max_retries, what=f"label:{method}")
    out = [{
        "sae_id": r["sae_id"], "layer": r["layer"], "feature": r["feature"], "method": method, "label": r["value"],
        "prompt_version": version, "backend": r["backend"], "model": r["model"], "n_examples": r["n_examples"],
        "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"], "cost_usd": r["cost_usd"], "tries": r["tries"],
        "error": None if r["value"] is not None else (r["problem"] or "no label"), "raw": r["answer"],
        **{c: r.get(c) for c in ("evidence", "evidence_scores") if c in r},
    } for r in done]
    return schema.conform(pa.Table.from_pylist(out), schema.LABELS) if out else schema.empty(schema.LABELS)


# ---- scores: the answer is a list of 0/1, one per excerpt ----------------------------------

def score_rounds(rows: list[dict], llm, max_retries: int) -> list[dict]:
    """Scorer prompt rows (with `truth`, the 0/1 of each excerpt shown) → one dict per
    prompt with `pred` (the parsed list; for a log-prob row, `logprob:A,B`, the probability
    of A; None when failed) and `problem`."""
    if not rows:
        return []
    import ray

    def parse(row: dict, attempt: int):
        targets = logprob_targets(row["constraint"])
        if targets:
            if row.get("p_yes") is None:
                return None, f"neither {targets[0]!r} nor {targets[1]!r} was among the scorer's top log-probs"
            return row["p_yes"], None
        return prompts.parse_binary_list(row["answer"], len(row["truth"]))

    def retry(row: dict, problem: str, attempt: int) -> list:
        n = len(row["truth"])
        example = "[" + ",".join("01"[i % 2] for i in range(n)) + "]"
        return list(row["messages"]) + [
            {"role": "assistant", "content": row["answer"] or ""},
            {"role": "user", "content": prompts.SCORE_RETRY_TEMPLATE.format(problem=problem, n=n, example=example)},
        ]

    first = rows_table(rows, pa.schema([pa.field("layer", pa.int32()), pa.field("truth", pa.list_(pa.int8()))]))
    done = ask_until_parsed(ray.data.from_arrow(first), llm, parse, retry, max_retries, what="score",
                            retryable=lambda row: logprob_targets(row["constraint"]) is None)
    for r in done:
        r["pred"] = r.pop("value")
    return done
