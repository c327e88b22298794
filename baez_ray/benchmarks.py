"""The scoring benchmarks (SPEC §3) as data: one `Benchmark` each, registered in this module.

    name               side    headline            chance  scorer
    detection          input   balanced_accuracy   0.5     LLM: a 0/1 list per prompt of excerpts
    fuzz               input   balanced_accuracy   0.5     LLM: a 0/1 list per prompt of highlighted excerpts
    embedding          input   auroc               0.5     sentence embedder: label vs excerpts
    detection_logprob  input   auroc               0.5     LLM log-probs: P("1") per excerpt
    fuzz_logprob       input   auroc               0.5     LLM log-probs: P("1") per highlighted excerpt
    simulation         input   correlation         0       LLM: every token's activation predicted, 0-10 (log-probs
                                                          where the backend gives them)
    logit_embedding    output  auroc               0.5     sentence embedder: label vs promoted tokens
    intervention       output  balanced_accuracy   0.5     LLM: which of (steered, unsteered) continuations the label
                                                          describes (steers the base model)
    intervention_logprob output auroc              0.5     LLM log-probs: P("1") of that choice (steers the base model)

`side` says what a benchmark tests a label against: *input* benchmarks show the scorer the
contexts where the feature fires (what makes it fire), *output* benchmarks what the
feature does to the model's output (its promoted tokens, steering). The reports put the
two sides side by side per kind of feature (report/by_kind.py). `headline` is the column
of the scores table (schema.SCORES) that is the benchmark's score; `chance` its value for
a label that says nothing.

The job file's `score.benchmarks` accepts the names registered here (config.py), the
metrics and reports read headline, chance and side from here, and the score stage
(stages/score.py) runs each benchmark the job asks for. Adding a benchmark: one
`register(Benchmark(...))` below, its scoring code in stages/ called from `score_labels`,
and its metric column in schema.SCORES if it has a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Benchmark:
    name: str
    side: Literal["input", "output"]
    headline: str  # the schema.SCORES column that is its score
    chance: float  # the headline's value for an uninformative label
    llm: bool  # needs a scorer LLM (prompts, tokens, cost)
    logprobs: bool = False  # needs a scorer backend that gives log-probs
    about: str = ""  # one line: what it measures
    steers: bool = False  # steers the base model: needs the job's model and saes sections


_BENCHMARKS: dict[str, Benchmark] = {}


def register(b: Benchmark) -> Benchmark:
    if b.name in _BENCHMARKS:
        raise ValueError(f"benchmark {b.name!r} is registered twice")
    if b.side not in ("input", "output"):
        raise ValueError(f"benchmark {b.name!r}: side must be input or output, not {b.side!r}")
    _BENCHMARKS[b.name] = b
    return b


def get(name: str) -> Benchmark:
    if name not in _BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(_BENCHMARKS)})")
    return _BENCHMARKS[name]


def names() -> list[str]:
    """Every benchmark, in registration order (the reports' order)."""
    return list(_BENCHMARKS)


def side(name: str) -> str:
    return get(name).side


register(Benchmark("detection", "input", "balanced_accuracy", 0.5, llm=True,
                   about="the scorer picks the feature's excerpts out of a shuffled batch, given the label"))
register(Benchmark("fuzz", "input", "balanced_accuracy", 0.5, llm=True,
                   about="the scorer tells the feature's active tokens from random highlights, given the label"))
register(Benchmark("embedding", "input", "auroc", 0.5, llm=False,
                   about="the label's embedding is closer to the feature's excerpts than to other features'"))
register(Benchmark("detection_logprob", "input", "auroc", 0.5, llm=True, logprobs=True,
                   about="detection, one excerpt per prompt, scored by the scorer's P('1')"))
register(Benchmark("fuzz_logprob", "input", "auroc", 0.5, llm=True, logprobs=True,
                   about="fuzz, one excerpt per prompt, scored by the scorer's P('1')"))
register(Benchmark("simulation", "input", "correlation", 0.0, llm=True,
                   about="from the label, the scorer predicts the feature's activation at every token of an excerpt; "
                         "Pearson r with the true activations (stages/simulation.py)"))
register(Benchmark("logit_embedding", "output", "auroc", 0.5, llm=False,
                   about="the label's embedding is closer to the feature's promoted tokens than to other features' promoted tokens"))
register(Benchmark("intervention", "output", "balanced_accuracy", 0.5, llm=True, steers=True,
                   about="the scorer tells which of a steered and an unsteered continuation the label describes "
                         "(stages/intervention.py)"))
register(Benchmark("intervention_logprob", "output", "auroc", 0.5, llm=True, logprobs=True, steers=True,
                   about="intervention scored by the scorer's P('1') against P('2')"))
