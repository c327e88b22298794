"""vLLM engine options in the job file (LLMConfig; AVRunConfig for the AV) become the engine
arguments. Pure config: runs in both venvs (no vllm import)."""

from __future__ import annotations

import pytest

from baez_ray.llm.backends.vllm_backend import engine_kwargs
from baez_ray.config import AVRunConfig, ConfigError, LLMConfig, validate
from baez_ray.methods import check_job_methods


def test_llm_config_engine_options():
    cfg = LLMConfig(backend="vllm", model="m", dtype="bfloat16", tensor_parallel_size=2, max_model_len=4096,
                    gpu_memory_utilization=0.8, engine_kwargs={"enable_prefix_caching": True, "max_num_seqs": 32})
    kw = engine_kwargs(cfg, gpus=1)
    assert kw == {"dtype": "bfloat16", "tensor_parallel_size": 2, "pipeline_parallel_size": 1, "gpu_memory_utilization": 0.8,
                  "max_model_len": 4096, "enable_prefix_caching": True, "max_num_seqs": 32}
    # call-site overrides win; defaults stay what they were
    assert engine_kwargs(cfg, gpus=1, overrides={"max_model_len": 512})["max_model_len"] == 512
    plain = engine_kwargs(LLMConfig(backend="vllm", model="m"), gpus=0.5)
    assert plain["gpu_memory_utilization"] == 0.45 and "max_model_len" not in plain and "enforce_eager" not in plain
    assert engine_kwargs(LLMConfig(backend="vllm", model="m"), gpus=0)["enforce_eager"] is True


def test_engine_options_validate():
    assert LLMConfig(backend="vllm", model="m", concurrency=[1, 4]).concurrency == (1, 4)
    with pytest.raises(ValueError):
        LLMConfig(backend="vllm", model="m", gpu_memory_utilization=1.5)
    av = AVRunConfig(engine="vllm", engine_kwargs={"gpu_memory_utilization": 0.9})
    assert av.engine == "vllm" and av.engine_kwargs == {"gpu_memory_utilization": 0.9}
    with pytest.raises(ConfigError, match=r"key 'label.av.engine'"):
        validate({"job": "label", "features": "x", "label": {"explainer": {"model": "m"}, "av": {"engine": "sglang"}}})
    # method names are checked against the registry when a job is loaded (jobs.load_job)
    wrong_tier = validate({"job": "label", "features": "x", "label": {"explainer": {"model": "m"}, "tier3": "eleuther_acts_top5"}})
    assert [key for key, _ in check_job_methods(wrong_tier)] == ["label.tier3"]
    spec = validate({"job": "label", "features": "x", "label": {"explainer": {"model": "m"}, "tier3": "nla_direct"}})
    assert spec.label.tier3 == "nla_direct" and spec.label.av.engine == "transformers"
