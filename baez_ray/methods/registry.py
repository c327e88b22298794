"""The registry of labelling methods: a name (or a family of names, as a pattern) → one
function with one signature:

    label(features: ray.data.Dataset of FEATURES rows, ctx: LabelContext) -> LABELS table
                                                                             (or a Dataset of its rows)

A method module registers itself with `@register(...)`; `baez_ray.methods` imports every
module of the folder, so adding a method is adding one module. Job files name methods; the
names are checked here when a job is loaded (`check_job_methods`), before anything runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from baez_ray.config import AVRunConfig, JobSpec, LLMConfig, RouteConfig, SAEConfig


@dataclass(frozen=True)
class LabelContext:
    """What a method may read besides the features: the job's settings for it."""

    name: str  # the method name as the job gives it (e.g. eleuther_acts_top5)
    explainer: LLMConfig | None = None
    small_llm: LLMConfig | None = None
    max_retries: int = 2
    n_examples: int = 10  # examples an AV-based method verbalizes per feature
    av_sidecar: str | None = None
    av_sidecars: tuple[tuple[int, str], ...] = ()  # (layer, sidecar path) of every AV the job has
    av: AVRunConfig = AVRunConfig()
    saes: tuple[SAEConfig, ...] = ()  # the job's SAEs: nla_direct reads their decoder rows
    route: RouteConfig = RouteConfig()  # token_freq counts over route.top_n examples and its windows
    routes_dir: Path | None = None  # the routes table (kinds) of these features
    residuals_dir: Path | None = None  # the residuals table of these features (the residuals stage's)
    stream: bool = False  # the rows go on to be scored as they come: a method may return its Dataset unexecuted


NEEDS = {
    "explainer": "an LLM writes the label (the section's explainer; small_llm: label.small_llm when set)",
    "av_sidecar": "an activation verbalizer (av_sidecar / av_sidecars)",
    "sae": "the SAE's weights (the job's sae / saes section)",
    "residuals": "the residual vector at each top example's top token (kept by collect, or the residuals stage's, "
                 "which needs the job's model section)",
}


@dataclass(frozen=True)
class Method:
    pattern: str  # a name, or a regular expression for a family (eleuther_acts_top(\d+))
    label: Callable  # (features Dataset, LabelContext) -> LABELS table or a Dataset of its rows
    tiers: tuple[int, ...]  # the label job's tiers that may use it
    needs: tuple[str, ...] = ()  # keys of NEEDS
    shown: str = ""  # the name shown in messages (eleuther_acts_topK)
    description: str = ""  # one line, for `baez-ray methods` and the docs

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None

    def examples(self) -> list[str]:
        """Names this method answers to, for the overlap check: its shown name, and a
        family's pattern with each group filled in (eleuther_acts_top5)."""
        return [self.shown, re.sub(r"\([^)]*\)", "5", self.pattern)]


_METHODS: list[Method] = []


def register(pattern: str, *, tiers: tuple[int, ...], needs: tuple[str, ...] = (), shown: str | None = None,
             description: str | None = None):
    """Decorator: register `fn(features, ctx)` under `pattern`. Raises ValueError on a name
    (or family) that an already registered method answers to, or on an unknown need.
    `description` defaults to the first line of `fn`'s docstring."""

    def add(fn: Callable) -> Callable:
        unknown = set(needs) - set(NEEDS)
        if unknown:
            raise ValueError(f"method {pattern!r}: unknown needs {sorted(unknown)} (known: {', '.join(NEEDS)})")
        doc = (fn.__doc__ or "").strip().splitlines()
        new = Method(pattern, fn, tiers, needs, shown or pattern, description or (doc[0] if doc else ""))
        for old in _METHODS:
            if old.pattern == pattern or any(old.matches(n) for n in new.examples()) or any(new.matches(n) for n in old.examples()):
                raise ValueError(f"method {new.shown!r} overlaps the registered method {old.shown!r} "
                                 f"(patterns {pattern!r} and {old.pattern!r}); give it another name")
        _METHODS.append(new)
        return fn

    return add


def methods() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_METHODS)


def get(name: str) -> Method:
    for m in _METHODS:
        if m.matches(name):
            return m
    raise ValueError(f"unknown labelling method {name!r} (known: {', '.join(known())})")


def known(tier: int | None = None) -> list[str]:
    return [m.shown for m in _METHODS if tier is None or tier in m.tiers]


def label(name: str, features, ctx: LabelContext):
    """Label `features` with the method `name`: the LABELS table, one row per feature."""
    import pyarrow as pa

    from baez_ray import schema
    from baez_ray.ray_pool import gather

    out = label_rows(name, features, ctx)
    if isinstance(out, pa.Table):
        return out
    return gather(out, schema.LABELS)


def label_rows(name: str, features, ctx: LabelContext):
    """What the method `name` returns for `features`: the LABELS table, or (the methods that
    label in the workers) a Ray Dataset of LABELS rows, which the label stage writes from
    the workers without gathering it."""
    return get(name).label(features, ctx)


def needs_residuals(names) -> bool:
    """Whether any of the methods `names` reads the residual vectors at top examples."""
    return any("residuals" in get(n).needs for n in names)


def examples_read(name: str, default: int) -> int:
    """How many top examples the AV method `name` reads: N of `baez_kN` / `baez_last_kN`,
    else `default` (the job's av_examples)."""
    k = name.rsplit("_k", 1)[1] if "_k" in name else ""
    return int(k) if k.isdigit() else default


def _problem(name: str, tier: int | None) -> str | None:
    try:
        m = get(name)
    except ValueError:
        return f"unknown method {name!r}; known: {', '.join(known(tier))}"
    if tier is not None and tier not in m.tiers:
        return f"{name} cannot label tier-{tier} features; tier {tier} methods: {', '.join(known(tier))}"
    return None


def _missing_explainer(name: str, explainer) -> str | None:
    if "explainer" in get(name).needs and explainer is None:
        return f"{name} asks an LLM for its label: the section needs an explainer"
    return None


def _missing_input(name: str, section: str, av, spec: JobSpec) -> str | None:
    """What the method `name` reads that the job lacks: an AV (`av`: the section's
    av_sidecar or av_sidecars), or the SAE's weights."""
    if "av_sidecar" in get(name).needs and not av:
        return f"{name} needs {section}.av_sidecar or {section}.av_sidecars (an activation verbalizer)"
    if "sae" in get(name).needs and not spec.saes:
        return f"{name} reads the SAE's decoder rows: the job needs the sae (or saes) section"
    return None


def check_job_methods(spec: JobSpec) -> list[tuple[str, str]]:
    """(key, problem) for every method name of the job that the registry does not know
    or that lacks what it needs; empty when all is well."""
    out: list[tuple[str, str]] = []
    if spec.job == "label" and spec.label is not None and not spec.label.route:
        name = spec.label.single_method
        problem = _problem(name, None) or _missing_explainer(name, spec.label.explainer) or _missing_input(
            name, "label", spec.label.av_sidecar or spec.label.av_sidecars, spec)
        if problem:
            out.append(("label.method" if spec.label.method else "label.tier2", problem))
    elif spec.job == "label" and spec.label is not None:
        for t in (1, 2, 3):
            name = getattr(spec.label, f"tier{t}")
            problem = _problem(name, t) or _missing_explainer(name, spec.label.explainer)
            if problem:
                out.append((f"label.tier{t}", problem))
        has_av = bool(spec.label.av_sidecar or spec.label.av_sidecars)
        if not out and has_av and "sae" in get(spec.label.tier3).needs and not spec.saes:
            out.append(("label.tier3", f"{spec.label.tier3} reads the SAE's decoder rows: the job needs the sae (or saes) section"))
    if spec.job == "benchmark" and spec.benchmark is not None:
        b = spec.benchmark
        for i, name in enumerate(b.methods):
            problem = _problem(name, None) or _missing_explainer(name, b.explainer) or _missing_input(
                name, "benchmark", b.av_sidecar or b.av_sidecars, spec)
            if problem:
                out.append((f"benchmark.methods.{i}", problem))
        if len(set(b.methods)) != len(b.methods):
            out.append(("benchmark.methods", "a method is listed twice"))
        for key in ("tier1", "tier2", "tier3", "frontier"):  # the routing verdict's methods (benchmarked or not)
            name = getattr(b.verdict, key)
            problem = _problem(name, None) if name else None
            if problem:
                out.append((f"benchmark.verdict.{key}", problem))
    return out + _residuals_model(spec, out)


def _residuals_model(spec: JobSpec, found: list) -> list[tuple[str, str]]:
    """Features ingested in the job carry no residual vectors: an AV method that reads them
    needs the base model (the residuals stage computes them)."""
    section = spec.label if spec.job == "label" else spec.benchmark if spec.job == "benchmark" else None
    if found or section is None or spec.ingest is None or spec.model is not None or not (section.av_sidecar or section.av_sidecars):
        return []
    names = ([section.tier3] if section.route else [section.single_method]) if spec.job == "label" else section.methods
    reading = [n for n in names if "residuals" in get(n).needs]
    if not reading:
        return []
    return [("model", f"{', '.join(reading)} read the residual vectors at top examples, which an export does not carry: the "
                      "residuals stage computes them with the base model, so the job needs the model section")]
