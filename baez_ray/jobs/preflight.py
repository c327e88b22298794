"""Preflight: every check that can fail a job, made before Ray starts and before any paid
call (`baez-ray validate`, and the start of `run` and `submit`).

    problems, notes = preflight(spec, out=..., offline=False)

Each problem is one line `<file or key>: <problem>`; all are collected, none raised. What
is checked: every path exists and has the right kind (corpus files, the SAE folder and its
`cfg.json`, the model folder or the form of a hub id, AV sidecars, a features table, an
ingest export), each SAE's `d_in` against the model's hidden size and its layer
(`model.layer`, or `saes.N.layer`) against its layer count (both read from the model's `config.json`, no weights loaded), API
keys for the backends used, the AV sidecar's marker and neighbours against the AV's
tokenizer, that the run directory can be created, and that `ray.address` answers within a
few seconds. A hub id is looked up only when not `offline` and the hub answers; otherwise
a note says what was skipped.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from baez_ray.config import ConfigError, JobSpec, LLMConfig
from baez_ray.models.lm import is_local_path as looks_local

CONNECT_TIMEOUT_S = 3.0
KEY_ENVS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


class Checks:
    """The problems and notes of one preflight."""

    def __init__(self, offline: bool):
        self.offline = offline or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        self.problems: list[str] = []
        self.notes: list[str] = []
        self._hub_up: bool | None = None

    def bad(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")

    def hub_reachable(self) -> bool:
        if self._hub_up is None:
            self._hub_up = not self.offline and reachable("huggingface.co", 443)
        return self._hub_up


def reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def model_config(chk: Checks, key: str, path: str) -> dict | None:
    """The config.json of a model given as a local folder, pypi:<name> or hub id (None
    when it cannot be read; a problem is recorded when it is certainly wrong)."""
    if path.startswith("pypi:"):
        from baez_ray.models.lm import resolve_model_path

        try:
            path = resolve_model_path(path)
        except ValueError as e:
            chk.bad(key, str(e))
            return None
    if looks_local(path):
        return folder_json(chk, key, Path(path).expanduser(), "config.json", "local model", "a Hugging Face model")
    return hub_config(chk, key, path)


def folder_json(chk: Checks, key: str, p: Path, name: str, what: str, kind: str) -> dict | None:
    """The JSON file `name` of the folder `p` (a model or SAE folder), or None with the
    problem recorded under `key`: no such folder, not a folder, no `name` in it."""
    if not p.exists():
        chk.bad(key, f"{p}: no such {what} folder")
    elif not p.is_dir():
        chk.bad(key, f"{p}: not a folder ({kind} folder holds {name} and the weights)")
    elif not (p / name).is_file():
        chk.bad(key, f"{p}: no {name} in this folder (not {kind} folder)")
    else:
        return json.loads((p / name).read_text())
    return None


def hub_config(chk: Checks, key: str, repo: str) -> dict | None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text())
    if not chk.hub_reachable():
        chk.notes.append(f"{key}: {repo}: hub id not checked (offline)")
        return None
    try:
        return json.loads(Path(hf_hub_download(repo, "config.json", etag_timeout=CONNECT_TIMEOUT_S)).read_text())
    except Exception as e:  # noqa: BLE001 - any hub failure is reported as a line
        chk.bad(key, f"{repo}: cannot read config.json from the hub ({type(e).__name__})")
        return None


def text_config(cfg: dict) -> dict:
    return cfg.get("text_config") or cfg


def sae_config(chk: Checks, spec: JobSpec, i: int) -> dict | None:
    """The cfg.json of the job's SAE i when it is a folder (None otherwise, or when it
    cannot be read: a problem is recorded)."""
    sae = spec.saes[i]
    if not sae.path:
        return None
    return folder_json(chk, spec.sae_key(i, "path"), Path(sae.path), "cfg.json", "SAE", "a sae-lens SAE")


def check_model_and_sae(chk: Checks, spec: JobSpec) -> None:
    """The model's folder or hub id; each SAE's folder, its d_in against the model's hidden
    size and its layer against the model's layer count."""
    cfg = model_config(chk, "model.path", spec.model.path) if spec.model else None
    saes = [sae_config(chk, spec, i) for i in range(len(spec.saes))]
    if cfg is None or spec.model is None:
        return
    tc = text_config(cfg)
    n_layers, hidden = tc.get("num_hidden_layers", tc.get("n_layer")), tc.get("hidden_size", tc.get("n_embd"))
    for i, (sae, found) in enumerate(zip(spec.saes, saes)):
        if n_layers is not None and sae.layer >= n_layers:
            chk.bad(spec.sae_key(i, "layer"), f"{sae.layer}, but {spec.model.path} has {n_layers} layers (0..{n_layers - 1})")
        if found is not None and hidden is not None and found.get("d_in") != hidden:
            chk.bad(spec.sae_key(i, "path"), f"{sae.path}: d_in={found.get('d_in')} does not match the hidden size {hidden} of {spec.model.path}")


def check_inputs(chk: Checks, spec: JobSpec) -> None:
    from baez_ray.data.corpus import CorpusError, expand_paths

    if spec.corpus and spec.corpus.paths:
        for pat in spec.corpus.paths:
            try:
                expand_paths([pat])
            except (CorpusError, ValueError) as e:
                msg = str(e)
                chk.problems.append(msg if msg.startswith("corpus.paths") else f"corpus.paths: {msg}")
    if spec.features:
        p = Path(spec.features)
        if not p.is_dir():
            chk.bad("features", f"{p}: no such features folder")
        elif not any(p.glob("*.parquet")):
            chk.bad("features", f"{p}: no Parquet parts (run collect or ingest first)")
    for i, src in enumerate(spec.ingest.sources if spec.ingest else []):
        if not Path(src.path).is_dir():
            chk.bad(spec.ingest.source_key(i, "path"), f"{src.path}: no such export folder")


def llms(spec: JobSpec) -> list[tuple[str, LLMConfig]]:
    """Every LLM the job may call, with its key."""
    out = []
    for sec in ("label", "benchmark"):
        cfg = getattr(spec, sec)
        if cfg is None:
            continue
        out.append((f"{sec}.explainer", cfg.explainer))
        if getattr(cfg, "small_llm", None) is not None:
            out.append((f"{sec}.small_llm", cfg.small_llm))
        if cfg.score is not None and cfg.score.scorer is not None:
            out.append((f"{sec}.score.scorer", cfg.score.scorer))
    return out


def check_llms(chk: Checks, spec: JobSpec) -> None:
    for key, llm in llms(spec):
        if llm.backend in KEY_ENVS:
            var = llm.api_key_env or KEY_ENVS[llm.backend]
            if (llm.backend == "anthropic" or llm.api_key_env) and not os.environ.get(var, "").strip():
                chk.bad(f"{key}.api_key_env", f"the {llm.backend} backend reads its API key from ${var}, which is unset or empty")
        else:
            model_config(chk, f"{key}.model", llm.model)
    for key, emb in (("route.embedder", spec.route.embedder), ("label.score.embedder", spec.label and spec.label.score and spec.label.score.embedder),
                     ("benchmark.score.embedder", spec.benchmark and spec.benchmark.score.embedder)):
        if emb and looks_local(emb) and not Path(emb).expanduser().is_dir():
            chk.bad(key, f"{emb}: no such local embedder folder")


def check_sidecar(chk: Checks, key: str, path: str) -> None:
    from baez_ray.av.prompt import prompt_ids
    from baez_ray.av.sidecar import load_sidecar

    try:
        sc = load_sidecar(path)
    except ConfigError as e:
        chk.problems.append(f"{key}: {e}")
        return
    av_key = f"{key} ({path}) av_model"
    if model_config(chk, av_key, sc.av_model) is None:
        return
    from transformers import AutoTokenizer

    from baez_ray.models.lm import resolve_model_path

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(sc.av_model))
        prompt_ids(sc, tok, source=path)
    except (OSError, ValueError) as e:
        chk.problems.append(f"{key}: {e}")


def check_out(chk: Checks, out: Path) -> None:
    """`out` exists as a writable folder, or can be made: its nearest existing ancestor is
    a writable folder."""
    p = out.expanduser().absolute()
    if p.exists():
        if not p.is_dir():
            chk.bad("--out", f"{out}: exists and is not a folder")
        elif not os.access(p, os.W_OK):
            chk.bad("--out", f"{out}: folder not writable")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        chk.bad("--out", f"{out}: cannot be created, {parent} is a file, not a folder")
    elif not os.access(parent, os.W_OK):
        chk.bad("--out", f"{out}: cannot be created, {parent} is not writable")


def check_ray_address(chk: Checks, address: str | None) -> None:
    if not address or address == "auto" or address.startswith(("http://", "https://")):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        chk.bad("ray.address", f"{address}: expected host:port, ray://host:port or auto")
    elif not reachable(host, int(port)):
        chk.bad("ray.address", f"{address}: nothing answers there within {CONNECT_TIMEOUT_S:.0f} s (is the cluster up?)")


def check_resources(chk: Checks, spec: JobSpec) -> None:
    """The custom resources the job's actors ask for, against what a local cluster will
    advertise (`ray.resources`, and `accelerator_type:<GPU>`, which Ray adds for a GPU it
    finds): an actor asking for a resource that no node has would wait for ever. A joined
    cluster is not checked (its autoscaler may start a node type that has it)."""
    if spec.ray.address or os.environ.get("RAY_ADDRESS"):
        return
    asked = [("route.resources", spec.route.resources), ("collect.merge_resources", spec.collect.merge_resources)]
    asked += [("model.resources", spec.model.resources)] if spec.model else []
    asked += [(f"{key}.resources", llm.resources) for key, llm in llms(spec)]
    asked += [(f"{sec}.av.resources", getattr(spec, sec).av.resources) for sec in ("label", "benchmark") if getattr(spec, sec) is not None]
    have = spec.ray.resources
    for key, resources in asked:
        for name, amount in resources.items():
            if name.startswith("accelerator_type:") and name not in have and local_gpus():
                continue
            if name not in have:
                chk.bad(key, f"{name!r}: no node of the local Ray cluster has this resource (ray.resources: "
                             f"{', '.join(sorted(have)) or 'none'}), so the actors would wait for ever; add it to ray.resources or set ray.address")
            elif amount > have[name]:
                chk.bad(key, f"{name!r}: {amount} per actor, but the local Ray cluster has {have[name]} (ray.resources)")


def local_gpus() -> bool:
    """Whether this machine has a CUDA GPU (Ray then advertises its accelerator_type)."""
    import torch

    return torch.cuda.is_available()


def preflight(spec: JobSpec, out: str | Path | None = None, offline: bool = False, ray_address: bool = True) -> tuple[list[str], list[str]]:
    """(problems, notes) of `spec`; `out`: the run directory to check (None: not checked)."""
    chk = Checks(offline)
    check_inputs(chk, spec)
    check_model_and_sae(chk, spec)
    check_llms(chk, spec)
    check_resources(chk, spec)
    for sec in ("label", "benchmark"):
        cfg = getattr(spec, sec)
        if cfg is not None and cfg.av_sidecar:
            check_sidecar(chk, f"{sec}.av_sidecar", cfg.av_sidecar)
    if out is not None:
        check_out(chk, Path(out))
    if ray_address:
        check_ray_address(chk, spec.ray.address or os.environ.get("RAY_ADDRESS"))
    return chk.problems, chk.notes


def run_dir(spec: JobSpec, out: str | None) -> Path:
    """The run directory `baez-ray run` writes to."""
    return Path(out) if out else Path(spec.out) / spec.name
