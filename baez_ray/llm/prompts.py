"""Every LLM prompt of the project, in one place, each with a version string.

The version is recorded with every label and score row (`prompt_version`); change the
version whenever the wording of a prompt changes. Prompts are the project's own text.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- eleuther_acts_topK
ELEUTHER_VERSION = "eleuther_acts/v2"  # v2: tokens as text (an export's pieces, no <bos>)
ELEUTHER_MARKER = "[EXPLANATION]:"

ELEUTHER_SYSTEM = """You study the features of a language model. A feature is a direction in the model's internal activations that is active on some tokens of some texts.

You will be shown text excerpts where one feature is active. In each excerpt the tokens where the feature is most active are wrapped in << and >>.

Work out what the marked tokens have in common, and what in the surrounding text makes the feature active there. Then name the feature with a short label: a phrase of a few words, as specific as the evidence allows (a word or word family, a grammatical role, a topic, a formatting pattern), not a sentence about the excerpts.

You may reason in a few lines first. The last line of your answer must be:
[EXPLANATION]: <label>"""

ELEUTHER_FEWSHOT = [
    (
        "Example 1: I left the keys<< on>> the kitchen table\n"
        "Example 2: the cat jumped<< onto>> the sofa and slept\n"
        "Example 3: a painting hung<< above>> the fireplace",
        "The marked tokens are prepositions of place that link an object to where it is.\n"
        "[EXPLANATION]: spatial prepositions (on, onto, above)",
    ),
    (
        "Example 1: Revenue rose 12<<%>> in the third quarter\n"
        "Example 2: a discount of 30<< percent>> on all items\n"
        "Example 3: unemployment fell to 4.1<<%>> last month",
        "Each marked token is the percent unit right after a number.\n"
        "[EXPLANATION]: percent sign or word after a number",
    ),
]

# ---------------------------------------------------------------- np_max_act
NP_VERSION = "np_max_act/v2"  # v2: tokens as text (an export's pieces, no <bos>)
NP_MARKER = "Explanation:"

NP_SYSTEM = """You label features of a language model. For each example you get the token where the feature is most active and the text around it. Give a label of 1 to 6 words that says what the feature responds to. Answer with one line:
Explanation: <label>"""

# ---------------------------------------------------------------- np_max_act_logits
# np_max_act's windows, plus the tokens the feature's decoder direction promotes most (the
# logit lens: features' pos_tokens); same answer line.
NP_LOGITS_VERSION = "np_max_act_logits/v2"  # v2: tokens as text (np_max_act/v2's examples; an export's promoted pieces)

NP_LOGITS_SYSTEM = """You label features of a language model. For each example you get the token where the feature is most active and the text around it. You also get the tokens the feature promotes most: the next tokens the model predicts more often when the feature is active. A feature may be about what it reads (the examples) or about what it makes the model say next (the promoted tokens), or both. Give a label of 1 to 6 words that says what the feature responds to or does. Answer with one line:
Explanation: <label>"""


def promoted_line(pos_tokens: list[str] | None, n: int = 10) -> str:
    """The feature's top promoted tokens as one line of quoted texts (an export's vocabulary
    pieces as text, `texts_of`; leading and trailing whitespace of each token kept visible by
    the quotes), or a note that none are known."""
    texts = [t for t in texts_of([t for t in (pos_tokens or []) if t is not None]) if t.strip()][:n]
    return "Top promoted tokens: " + (", ".join(repr(t) for t in texts) if texts else "(none known)")


def np_logits_messages(examples: list[dict], pos_tokens: list[str] | None) -> list[dict]:
    body = np_user(examples) + "\n\n" + promoted_line(pos_tokens)
    return [{"role": "system", "content": NP_LOGITS_SYSTEM}, {"role": "user", "content": body}]


# ---------------------------------------------------------------- baez / baez_last
BAEZ_VERSION = "baez/v1"

BAEZ_SYSTEM = """You label features of a language model. For one feature you get several descriptions. Each was written by a verbalizer model that read the language model's internal state at a token where the feature was strongly active, and comes with how active the feature was there, from 1 (weak) to 10 (its strongest).

The descriptions are noisy and partly about other things present in the state. Find what they share, giving more weight to the most active ones, and name the feature with a short label: a phrase of a few words, as specific as the evidence allows.

You may reason in a few lines first. The last line of your answer must be:
[EXPLANATION]: <label>"""


def baez_messages(explanations: list[str], scores: list[int]) -> list[dict]:
    body = "\n\n".join(f"Description {i} (activation {s}/10):\n{t.strip()}" for i, (t, s) in enumerate(zip(explanations, scores), 1))
    return [{"role": "system", "content": BAEZ_SYSTEM}, {"role": "user", "content": body}]


# ---------------------------------------------------------------- retries
RETRY_TEMPLATE = """Your answer could not be read: {problem}. Reply with the label only, on one line after {marker}"""


def mark_tokens(tokens: list[str], acts: list[float], threshold: float) -> str:
    """Join tokens into text, wrapping runs of tokens with activation >= threshold in << >>
    (consecutive marked tokens share one pair)."""
    out, open_ = [], False
    for tok, a in zip(tokens, acts):
        hit = a >= threshold and a > 0
        if hit and not open_:
            out.append("<<")
            open_ = True
        elif not hit and open_:
            out.append(">>")
            open_ = False
        out.append(tok)
    if open_:
        out.append(">>")
    return "".join(out)


def eleuther_user(examples: list[dict], mark_frac: float = 0.6) -> str:
    lines = []
    for i, ex in enumerate(examples, 1):
        peak = max(ex["acts"]) if ex["acts"] else 0.0
        text = mark_tokens(texts_of(ex["token_strs"]), ex["acts"], mark_frac * peak)
        lines.append(f"Example {i}: {one_line(text).strip()}")
    return "\n".join(lines)


def eleuther_messages(examples: list[dict]) -> list[dict]:
    msgs = [{"role": "system", "content": ELEUTHER_SYSTEM}]
    for user, assistant in ELEUTHER_FEWSHOT:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    msgs.append({"role": "user", "content": eleuther_user(examples)})
    return msgs


def np_user(examples: list[dict], radius: int = 24) -> str:
    lines = []
    for i, ex in enumerate(examples, 1):
        t = ex["top_index"]
        toks = texts_of(ex["token_strs"])
        lo, hi = max(0, t - radius), min(len(toks), t + radius + 1)
        window = one_line("".join(toks[lo:hi])).strip()
        lines.append(f"Example {i}: top token {toks[t].strip()!r} in: {window}")
    return "\n".join(lines)


def np_messages(examples: list[dict]) -> list[dict]:
    return [{"role": "system", "content": NP_SYSTEM}, {"role": "user", "content": np_user(examples)}]


def texts_of(token_strs: list[str]) -> list[str]:
    """An example's tokens as the text they spell: an export's vocabulary pieces ('▁the',
    'Ġthe') become ' the', special tokens ('<bos>') nothing (`models.windows.token_text`);
    decoded strings (collect's) stay as they are."""
    from baez_ray.models.windows import token_text

    return [token_text(t) for t in token_strs]


def one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", "\\n")


_CLEAN = re.compile(r"^[\s\"'`*_<>]+|[\s\"'`*_<>.]+$")


def parse_marked(answer: str | None, marker: str) -> tuple[str | None, str | None]:
    """The label after the last `marker` in `answer` → (label, None), or (None, problem).
    Tolerates markdown emphasis, quotes, a missing pair of brackets and case."""
    if not answer:
        return None, "the answer was empty"
    bare = marker.strip("[]: ").lower()
    pattern = re.compile(r"\[?\s*" + re.escape(bare) + r"\s*\]?\s*[:：]", re.IGNORECASE)
    hits = list(pattern.finditer(answer))
    if not hits:
        return None, f"it has no line starting with '{marker}'"
    rest = answer[hits[-1].end() :].strip().split("\n")[0]
    label = _CLEAN.sub("", rest).strip()
    if not label:
        return None, f"nothing follows '{marker}'"
    return label[:200], None


# ---------------------------------------------------------------- scoring: detection, fuzz
DETECTION_VERSION = "detection/v1"
FUZZ_VERSION = "fuzz/v1"

DETECTION_SYSTEM = """You check labels of language-model features. A feature is active on some tokens of some texts; its label says what it responds to.

You get a label and numbered text excerpts. For each excerpt decide whether the feature described by the label is active somewhere in it.

Answer with a list of 0 and 1, one per excerpt, in order (1: the feature is active in that excerpt), and nothing else, e.g. [1,0,0,1,0]."""

FUZZ_SYSTEM = """You check labels of language-model features. A feature is active on some tokens of some texts; its label says what it responds to.

You get a label and numbered text excerpts in which some tokens are wrapped in << and >>. For each excerpt decide whether the marked tokens are the ones where the feature described by the label is active (1), or were marked at random (0).

Answer with a list of 0 and 1, one per excerpt, in order, and nothing else, e.g. [1,0,0,1,0]."""


def scorer_messages(benchmark: str, label: str, texts: list[str]) -> list[dict]:
    system = {"detection": DETECTION_SYSTEM, "fuzz": FUZZ_SYSTEM}[benchmark]
    body = f"Label: {one_line(label).strip()}\n\n" + "\n".join(f"Excerpt {i}: {one_line(t).strip()}" for i, t in enumerate(texts, 1))
    return [{"role": "system", "content": system}, {"role": "user", "content": body + f"\n\nAnswer with a list of {len(texts)} values."}]


SCORE_RETRY_TEMPLATE = "Your answer could not be read: {problem}. Answer with a list of exactly {n} values, each 0 or 1, like {example}, and nothing else."

_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_binary_list(answer: str | None, n: int) -> tuple[list[int] | None, str | None]:
    """The last bracketed list of 0/1 in `answer` (JSON or Python: 0/1, true/false) →
    (values, None), or (None, problem) when there is none, its length is not n, or it has
    an empty slot (`[1,,0]`: which excerpt was skipped is unknown, so every later answer
    could be shifted; a single trailing comma, as Python allows, is not a slot)."""
    if not answer:
        return None, "the answer was empty"
    hits = _LIST.findall(answer)
    if not hits:
        return None, "it has no list in brackets"
    items = [x.strip().strip("'\"").lower() for x in hits[-1].split(",")]
    if items[-1] == "":
        items.pop()  # `[1, 0,]` (and `[]`)
    if "" in items:
        return None, "the list has an empty slot (a value missing between commas)"
    table = {"0": 0, "1": 1, "false": 0, "true": 1, "0.0": 0, "1.0": 1}
    if any(x not in table for x in items):
        return None, "the list holds values other than 0 and 1"
    if len(items) != n:
        return None, f"the list has {len(items)} values, not {n}"
    return [table[x] for x in items], None


# ---------------------------------------------------------------- nla_direct
# The AV reads the feature's SAE decoder row; its explanation is the label, or (option) the
# explainer shortens it with this prompt. Labels record f"{NLA_DIRECT_VERSION}+av:<sidecar name>"
# (the AV's own prompt is the sidecar's template).
NLA_DIRECT_VERSION = "nla_direct/v1"

NLA_DIRECT_SYSTEM = """You label features of a language model. A feature is a direction in the model's internal activations. A verbalizer model read the feature's direction itself and described in a few paragraphs what it represents; the last paragraph is usually about the token the direction sits on.

The description may be long and partly speculative. Condense it into a short label for the feature: a phrase of a few words, as specific as the description allows, not a sentence about the description.

You may reason in a few lines first. The last line of your answer must be:
[EXPLANATION]: <label>"""


def nla_direct_messages(explanation: str) -> list[dict]:
    return [{"role": "system", "content": NLA_DIRECT_SYSTEM}, {"role": "user", "content": f"Description:\n{explanation.strip()}"}]


# ---------------------------------------------------------------- scoring: log-prob
# One excerpt per prompt, after a prefix shared by a feature's prompts (instructions +
# label), so that a prefix cache runs it once per feature; the answer is one token, and the
# score is the scorer's probability of "1" against "0" for it (constraint `logprob:1,0`).
DETECTION_LOGPROB_VERSION = "detection_logprob/v1"
FUZZ_LOGPROB_VERSION = "fuzz_logprob/v1"
LOGPROB_CONSTRAINT = "logprob:1,0"

DETECTION_LOGPROB_SYSTEM = """You check labels of language-model features. A feature is active on some tokens of some texts; its label says what it responds to.

You get a label and one text excerpt. Decide whether the feature described by the label is active somewhere in the excerpt.

Answer with one digit and nothing else: 1 if it is active, 0 if it is not."""

FUZZ_LOGPROB_SYSTEM = """You check labels of language-model features. A feature is active on some tokens of some texts; its label says what it responds to.

You get a label and one text excerpt in which some tokens are wrapped in << and >>. Decide whether the marked tokens are the ones where the feature described by the label is active, or were marked at random.

Answer with one digit and nothing else: 1 if the marks are where the feature is active, 0 if they were marked at random."""


def logprob_messages(benchmark: str, label: str, text: str) -> list[dict]:
    """A `detection_logprob` or `fuzz_logprob` prompt: the label first, then the excerpt."""
    system = {"detection_logprob": DETECTION_LOGPROB_SYSTEM, "fuzz_logprob": FUZZ_LOGPROB_SYSTEM}[benchmark]
    body = f"Label: {one_line(label).strip()}\n\nExcerpt: {one_line(text).strip()}\n\nAnswer 1 or 0."
    return [{"role": "system", "content": system}, {"role": "user", "content": body}]


# ---------------------------------------------------------------- scoring: intervention
# The base model is steered along a feature's decoder direction while it continues a
# neutral prompt (stages/intervention.py); the scorer sees the label, the prompt and the
# steered and unsteered continuations in a seeded random order, and names the steered one.
# `intervention`: the answer is parsed (1 or 2); `intervention_logprob`: one answer token,
# P("1") against P("2") from the log-probs (constraint `logprob:1,2`).
INTERVENTION_VERSION = "intervention/v1"
INTERVENTION_LOGPROB_VERSION = "intervention_logprob/v1"
INTERVENTION_CONSTRAINT = "logprob:1,2"
INTERVENTION_CHOICE = "choice:1,2"  # the parsed form: local backends admit only these two answers
# the base model's prompts: openings with no topic of their own, so that what a steered
# continuation is about comes from the feature; `score.intervention_pairs` of them are used,
# in a seeded order (stages/intervention.py). Change the version when the list changes.
NEUTRAL_PROMPTS_VERSION = "neutral/v1"
NEUTRAL_PROMPTS = [
    "I think", "We", "The reason is simple:", "Yesterday", "In my opinion,", "She said that", "Here is what happened:",
    "It was", "One thing I know is", "They told me", "The best part is", "At first", "My friend asked",
    "This is", "When I came home,", "There is",
]

INTERVENTION_SYSTEM = """You check labels of language-model features. A feature is a direction in the model's internal activations; its label says what it stands for.

The model continued a short prompt twice: once unchanged, and once with the feature switched on strongly, which pushes the text towards what the feature stands for (words, topics or a style). You get the label, the prompt and the two continuations in random order.

Decide which continuation was written with the feature switched on: the one that shows more of what the label describes. Judge the content, not the quality of the text.

Answer with one digit and nothing else: 1 or 2."""


def intervention_messages(label: str, prompt: str, first: str, second: str) -> list[dict]:
    """An `intervention` / `intervention_logprob` prompt: label, prompt, the two continuations."""
    body = (f"Label: {one_line(label).strip()}\n\nPrompt: {one_line(prompt).strip()}\n\n"
            f"Continuation 1: {one_line(first).strip()}\nContinuation 2: {one_line(second).strip()}\n\nAnswer 1 or 2.")
    return [{"role": "system", "content": INTERVENTION_SYSTEM}, {"role": "user", "content": body}]


INTERVENTION_RETRY_TEMPLATE = "Your answer could not be read: {problem}. Answer with one digit, 1 or 2, and nothing else."
_CHOICE = re.compile(r"(?<![\d.])([12])(?![\d.])")


def parse_choice(answer: str | None) -> tuple[int | None, str | None]:
    """The continuation an `intervention` answer names → (1 or 2, None): the first 1 or 2
    that stands alone ('2', 'Continuation 1', '**2**'); (None, problem) without one."""
    if not answer or not answer.strip():
        return None, "the answer was empty"
    m = _CHOICE.search(answer)
    if m is None:
        return None, "it names neither continuation 1 nor 2"
    return int(m.group(1)), None


# ---------------------------------------------------------------- scoring: simulation
# Bills et al. (2023): the scorer predicts the feature's activation at every token of an
# excerpt, 0-10, from the label alone, all tokens in one answer of `index: value` lines.
SIMULATION_VERSION = "simulation/v1"

SIMULATION_SYSTEM = """You simulate a feature of a language model. A feature is active on some tokens of some texts; its label says what it responds to.

You get the label and a text excerpt cut into numbered tokens. For each token, predict how strongly the feature is active on it, from 0 (not active) to 10 (as active as it ever gets). The feature is silent (0) on most tokens of most texts.

Answer with one line per token, in order, each `number: value` (for example `1: 0`), and nothing else."""


def simulation_messages(label: str, tokens: list[str]) -> list[dict]:
    """A `simulation` prompt: the label, the excerpt as text, then its tokens numbered from 1
    (each as a JSON string, so that spaces and newlines are visible)."""
    import json

    listing = "\n".join(f"{i}: {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(tokens, 1))
    body = (f"Label: {one_line(label).strip()}\n\nExcerpt: {one_line(''.join(tokens)).strip()}\n\nTokens:\n{listing}\n\n"
            f"Answer with {len(tokens)} lines, `1: value` to `{len(tokens)}: value`.")
    return [{"role": "system", "content": SIMULATION_SYSTEM}, {"role": "user", "content": body}]


SIMULATION_RETRY_TEMPLATE = ("Your answer could not be read: {problem}. Answer with exactly {n} lines, `1: value` to `{n}: value`, "
                             "each value a whole number from 0 to 10, and nothing else.")
SIMULATION_LINE = re.compile(r"^[ \t>*`\-]*(\d+)[ \t*`]*[:=.)\t][ \t*`]*(\d+)", re.M)


def parse_simulation(answer: str | None, n: int) -> tuple[list[int] | None, str | None]:
    """The n predicted activations of a `simulation` answer (`index: value` lines, index 1..n,
    each once; values 0-10) → (values in token order, None), or (None, problem)."""
    if not answer or not answer.strip():
        return None, "the answer was empty"
    found: dict[int, int] = {}
    for m in SIMULATION_LINE.finditer(answer):
        i, v = int(m.group(1)), int(m.group(2))
        if not 1 <= i <= n:
            return None, f"it numbers a token {i}, but the excerpt has tokens 1 to {n}"
        if i in found:
            return None, f"it gives token {i} twice"
        if v > 10:
            return None, f"token {i} has value {v}, above 10"
        found[i] = v
    missing = [i for i in range(1, n + 1) if i not in found]
    if missing:
        return None, f"it has no value for token(s) {', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}"
    return [found[i] for i in range(1, n + 1)], None
