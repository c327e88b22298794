"""Ask until the answer parses: the one loop of every LLM stage (labels and scores).

    prompt rows ─backend─▶ answers ─parse (in workers)─▶ value ─────────────▶ done rounds
         ▲                                                │ unreadable        (object store)
         └── retry prompt (built in workers): the conversation, the failed answer and
             what was wrong with it (labels: the reply prefilled with the marker); only
             the unreadable rows of a round, up to `max_retries` further rounds

The API backends (`backends.asks_in_backend`: openai, anthropic messages) run this loop
inside their actors instead (`backends.Until`): each row is asked again as soon as its
answer fails to parse, no round waits for the slowest row, and the result is the same one
row per prompt. The rounds below serve the local engines (transformers, vllm), whose
batches are worth filling.

The loop keeps no row in the driver: each round's answered rows are materialized in the
object store, split there into final rows (a Dataset for the caller: the score stage
reduces it by a groupby; `label_rounds` returns its LABELS table, or the Dataset of its
rows that the label stage's workers write into a shard) and rows to ask again; the
driver keeps counts.

A prompt whose answer stays unreadable, or whose request failed in the backend (after the
backend's own retries), ends with `value = None` and its `problem`: never dropped. A row's
`token_logprobs` (a simulation answer's top log-probs) are read by its parser and then
emptied: the rounds keep values, not candidates. A row
carries its tries and the tokens and cost of its earlier tries (`spent_*`) from round to
round, so that its final row has the totals of all its tries. Log-prob scorer rows (one
answer token, `p_yes`) are not retried: their probability does not change when asked
again.
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from baez_ray import progress, schema
from baez_ray.llm import prompts
from baez_ray.llm.backends import Until, asks_in_backend, generate, logprob_targets, prompt_table
from baez_ray.rundir import log

ANSWER_COLUMNS = [f.name for f in schema.ANSWER_FIELDS]
SPENT = ("input_tokens", "output_tokens", "cost_usd")  # summed over a row's tries (spent_<name> before this one)
ROUND_COLUMNS = ["value", "problem", "tries", "retry", "retry_messages"] + [f"spent_{c}" for c in SPENT]


def rows_table(rows: list[dict], like: pa.Schema | None = None) -> pa.Table:
    """Prompt rows as a table; columns that `like` has too get its types."""
    t = prompt_table(rows)
    for f in like or []:
        if f.name in t.column_names and t.schema.field(f.name).type != f.type:
            t = t.set_column(t.schema.get_field_index(f.name), f.name, t.column(f.name).cast(f.type))
    return t


def _parse_batch(batch: pa.Table, parse, retry_messages, retryable, attempt: int, max_retries: int, value_type: pa.DataType) -> pa.Table:
    """A round's answered rows + value, problem, tries, the totals of every try, and
    (rows to ask again) `retry` = 1 and their `retry_messages`."""
    n = batch.num_rows
    rows = batch.to_pylist()
    values, problems, retry, retry_msgs = [], [], [], []
    for row in rows:
        value, problem = (None, row["error"]) if row["error"] else parse(row, attempt)
        final = attempt == max_retries or (retryable is not None and not retryable(row))
        again = value is None and row["error"] is None and not final
        values.append(value)
        problems.append(problem)
        retry.append(int(again))
        retry_msgs.append(retry_messages(row, problem, attempt) if again else None)
    spent = {c: batch.column(f"spent_{c}") if f"spent_{c}" in batch.column_names else None for c in SPENT}
    tries = batch.column("tries") if "tries" in batch.column_names else pa.array([0] * n, pa.int32())
    batch = batch.drop_columns([c for c in ROUND_COLUMNS if c in batch.column_names])
    if "token_logprobs" in batch.column_names:  # read into `value` above; heavy (k candidates per answer token)
        batch = batch.set_column(batch.schema.get_field_index("token_logprobs"), "token_logprobs", pa.nulls(n, schema.TOKEN_LOGPROBS))
    for c in SPENT:  # this try + the earlier ones
        if spent[c] is not None:
            batch = batch.set_column(batch.schema.get_field_index(c), c, pc.add(batch.column(c), spent[c]).cast(batch.schema.field(c).type))
    cols = {"value": pa.array(values, value_type), "problem": pa.array(problems, pa.string()),
            "tries": pc.add(tries, 1).cast(pa.int32()), "retry": pa.array(retry, pa.int8()),
            "retry_messages": pa.array(retry_msgs, pa.list_(schema.MESSAGE))}
    for k, v in cols.items():
        batch = batch.append_column(k, v)
    batch = batch.select(sorted(batch.column_names))  # one column order and nullability in every round
    return batch.cast(pa.schema([f.with_nullable(True) for f in batch.schema]))


def _final_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("retry"), 0)).drop_columns(["retry", "retry_messages"])


def _next_round(batch: pa.Table) -> pa.Table:
    """The rows to ask again as prompt rows: their retry messages, their totals so far."""
    batch = batch.filter(pc.equal(batch.column("retry"), 1))
    batch = batch.set_column(batch.schema.get_field_index("messages"), "messages", batch.column("retry_messages"))
    for c in SPENT:
        batch = batch.append_column(f"spent_{c}", batch.column(c))
    return batch.drop_columns(ANSWER_COLUMNS + ["value", "problem", "retry", "retry_messages"])


def ask_until_parsed(pending, llm, parse: Callable[[dict, int], tuple], retry_messages: Callable[[dict, str, int], list],
                     max_retries: int, value_type: pa.DataType, what: str = "llm", retryable: Callable[[dict], bool] | None = None,
                     total: int | None = None, lazy: bool = False):
    """Send `pending` (a Ray Dataset of prompt rows), parse every answer in the workers with
    `parse(row, attempt) -> (value, problem)` (`value` of `value_type`), resend the
    unreadable ones with `retry_messages(row, problem, attempt)` (those for which
    `retryable(row)`, when given). Returns a Ray Dataset (over materialized rounds) with one
    row per prompt: its row (last try), `value`, `problem`, `tries`, and the tokens and
    cost of all its tries. A progress bar counts the prompts answered, retry rounds
    included (`total`: the number of prompts, when the caller knows it; else counted).
    `lazy` (backends that ask in the backend only): the Dataset unexecuted, to stream
    into the caller's next step (the caller shows progress)."""
    until = Until(parse, retry_messages, max_retries, value_type, retryable)
    if lazy:
        if not asks_in_backend(llm):
            raise ValueError(f"{llm.backend}: retries go in rounds; lazy needs a backend that asks until parsed itself")
        return generate(pending, llm, until=until)
    if total is None:
        pending = pending.materialize()  # the prompts, counted for the bar
        total = pending.count()
    if asks_in_backend(llm):
        with progress.bar(what, total=total, unit="prompt") as bar:
            done = generate(pending, llm, until=until).materialize()
            again = int(done.sum("tries") or 0) - done.count() if done.count() else 0
            bar.add_total(again)  # the tries after the first joined the bar as they were sent
        if again:
            log(f"[{what}] {again} unreadable answers asked again (at most {max_retries} more tries each)")
        return done
    rounds = []
    with progress.bar(what, total=total, unit="prompt") as bar:
        for attempt in range(max_retries + 1):
            answered = generate(pending, llm).map_batches(
                _parse_batch, batch_format="pyarrow", zero_copy_batch=True,
                fn_kwargs=dict(parse=parse, retry_messages=retry_messages, retryable=retryable, attempt=attempt,
                               max_retries=max_retries, value_type=value_type)).materialize()
            rounds.append(answered.map_batches(_final_rows, batch_format="pyarrow"))
            n_retry = int(answered.sum("retry") or 0) if answered.count() else 0
            if not n_retry:
                break
            log(f"[{what}] retry {attempt + 1}/{max_retries}: {n_retry} unreadable answers")
            bar.add_total(n_retry)  # the retry round's prompts join the bar
            pending = answered.map_batches(_next_round, batch_format="pyarrow")
    return rounds[0].union(*rounds[1:]) if len(rounds) > 1 else rounds[0]


# ---- labels: the answer's last line is `<marker> <label>` ----------------------------------

def _label_rows(batch: pa.Table, method: str, version: str) -> pa.Table:
    """Final rows of label prompts → LABELS rows."""
    out = [{
        "sae_id": r["sae_id"], "layer": r["layer"], "feature": r["feature"], "method": method, "label": r["value"],
        "prompt_version": version, "backend": r["backend"], "model": r["model"], "n_examples": r["n_examples"],
        "input_tokens": r["input_tokens"], "output_tokens": r["output_tokens"], "cost_usd": r["cost_usd"], "tries": r["tries"],
        "error": None if r["value"] is not None else (r["problem"] or "no label"), "raw": r["answer"],
        **{c: r.get(c) for c in ("evidence", "evidence_scores") if c in r},
    } for r in batch.to_pylist()]
    return schema.conform(pa.Table.from_pylist(out), schema.LABELS) if out else schema.empty(schema.LABELS)


def label_rounds(pending, method: str, marker: str, version: str, llm, max_retries: int, dataset: bool = False, lazy: bool = False):
    """Label prompt rows (with sae_id, layer, feature, n_examples; optional evidence,
    evidence_scores) → LABELS rows, one per prompt (the label stage's table); with
    `dataset`, the Ray Dataset of those rows (the label stage writes it from the workers:
    no answer reaches the driver); with `lazy` too, unexecuted where the backend asks until
    parsed itself (the label stage streams the rows on to their scoring)."""
    from baez_ray.ray_pool import gather

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

    done = ask_until_parsed(pending, llm, parse, retry, max_retries, pa.string(), what=f"label:{method}",
                            lazy=dataset and lazy and asks_in_backend(llm))
    rows = done.map_batches(_label_rows, batch_format="pyarrow", fn_kwargs={"method": method, "version": version})
    if dataset:
        return rows
    return gather(rows, schema.LABELS)


# ---- scores: the answer is a list of 0/1, one per excerpt ----------------------------------

def _score_parse(row: dict, attempt: int):
    """A scorer row's value: its 0/1 list (list benchmarks) or [p_yes] (log-prob rows)."""
    targets = logprob_targets(row["constraint"])
    if targets:
        if row.get("p_yes") is None:
            return None, f"neither {targets[0]!r} nor {targets[1]!r} was among the scorer's top log-probs"
        return [row["p_yes"]], None
    return prompts.parse_binary_list(row["answer"], len(row["truth"]))


def _score_retry(row: dict, problem: str, attempt: int) -> list:
    n = len(row["truth"])
    example = "[" + ",".join("01"[i % 2] for i in range(n)) + "]"
    return list(row["messages"]) + [
        {"role": "assistant", "content": row["answer"] or ""},
        {"role": "user", "content": prompts.SCORE_RETRY_TEMPLATE.format(problem=problem, n=n, example=example)},
    ]


def _score_retryable(row: dict) -> bool:
    return logprob_targets(row["constraint"]) is None


def score_rounds(pending, llm, max_retries: int, total: int | None = None, lazy: bool = False,
                 parsers: dict[str, tuple[Callable, Callable]] | None = None):
    """Scorer prompt rows (a Ray Dataset, with `truth`: the 0/1 of each excerpt shown) → a
    Ray Dataset with one row per prompt: `value` (list<double>: the parsed 0/1 list; for a
    log-prob row `logprob:A,B`, [P(A)]; null when failed), `problem`, `tries` and totals
    (`lazy`: unexecuted, `ask_until_parsed`). `parsers`: benchmark name → (parse(row,
    attempt), retry_messages(row, problem, attempt)) for rows whose `benchmark` reads its
    answer its own way (simulation, intervention)."""
    parsers = parsers or {}

    def parse(row: dict, attempt: int):
        own = parsers.get(row.get("benchmark"))
        return own[0](row, attempt) if own and not logprob_targets(row["constraint"]) else _score_parse(row, attempt)

    def retry(row: dict, problem: str, attempt: int) -> list:
        own = parsers.get(row.get("benchmark"))
        return own[1](row, problem, attempt) if own else _score_retry(row, problem, attempt)

    return ask_until_parsed(pending, llm, parse, retry, max_retries, pa.list_(pa.float64()), what="score",
                            retryable=_score_retryable, total=total, lazy=lazy)
