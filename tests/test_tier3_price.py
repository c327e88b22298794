"""Tier 3's price: near-duplicate examples verbalized once, `baez_kN`, and the capacity plan
read from results files (bench/capacity.py) with its tier-3 policies and their quality."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def example(rank: int, tokens: list[int], top: int, value: float, with_ids: bool = True) -> dict:
    return {"kind": "top", "rank": rank, "value": value, "top_index": top, "tokens": tokens if with_ids else None,
            "token_strs": [f"t{t}" for t in tokens], "acts": [0.0] * len(tokens), "residual": [float(rank), 1.0]}


def test_near_duplicate_examples_are_verbalized_once():
    """Examples whose last N tokens up to the top token are the same become one AV row
    (the highest-ranked, `same` counting the others); tokens after the top token and before
    the window do not matter; window 0 keeps every example; token strings stand in for
    unknown ids; features of other layers give no rows."""
    from baez_ray.av.worker import distinct_examples, top_example_vectors

    exs = [example(0, [1, 2, 3, 4, 9], 3, 8.0), example(1, [7, 2, 3, 4, 5], 3, 6.0),  # same 3 tokens up to the top
           example(2, [1, 2, 3, 4], 2, 5.0), example(3, [2, 3, 4], 2, 4.0), example(4, [8, 8, 3, 4], 3, 1.0)]
    assert [(e["rank"], n) for e, n in distinct_examples(exs, 3)] == [(0, 3), (2, 1), (4, 1)]
    assert [(e["rank"], n) for e, n in distinct_examples(exs, 2)] == [(0, 4), (2, 1)]
    assert [n for _, n in distinct_examples(exs, 0)] == [1] * 5
    no_ids = [example(e["rank"], e["tokens"], e["top_index"], e["value"], with_ids=False) for e in exs]
    assert [(e["rank"], n) for e, n in distinct_examples(no_ids, 3)] == [(0, 3), (2, 1), (4, 1)]

    feats = pa.Table.from_pylist([
        {"sae_id": "s", "layer": 12, "feature": 7, "max_activation": 8.0, "examples": exs},
        {"sae_id": "s", "layer": 3, "feature": 8, "max_activation": 8.0, "examples": exs},
    ])
    rows = top_example_vectors(4, layer=12, dedup_window=3)(feats).to_pylist()
    assert [(r["feature"], r["rank"], r["same"], r["score"]) for r in rows] == [(7, 0, 3, 10), (7, 2, 1, 7)]  # of the top 4
    assert rows[1]["vector"] == [2.0, 1.0]
    assert top_example_vectors(4, layer=12)(feats).column("same").to_pylist() == [1, 1, 1, 1]
    assert top_example_vectors(4, layer=5)(feats).num_rows == 0


def test_baez_with_k_explanations_is_a_method_family():
    """`baez_kN` / `baez_last_kN` are registered tier-3 families; N overrides av_examples,
    the plain names read the job's count; a benchmark job may list several side by side."""
    from baez_ray import methods
    from baez_ray.jobs import load_job
    from baez_ray.methods.av_explanations import explanations_of

    assert methods.get("baez_k3").shown == "baez_kN" and methods.get("baez_last_k10").shown == "baez_last_kN"
    assert methods.get("baez").shown == "baez" and 3 in methods.get("baez_k3").tiers
    assert [explanations_of(methods.LabelContext(name=n, n_examples=7)) for n in ("baez_k3", "baez_last_k12", "baez", "baez_last")] == [3, 12, 7, 7]
    spec = load_job(ROOT / "jobs" / "benchmark_tier3.yaml")
    assert {"baez_k3", "baez_k5", "baez_k10", "nla_direct", "eleuther_acts_top5"} <= set(spec.benchmark.methods)
    assert spec.benchmark.train_examples >= 10 and spec.collect.residual_top_n >= 10


# ---- the capacity plan ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def capacity():
    sys.path.insert(0, str(ROOT / "bench"))
    import capacity

    return capacity


def results_file(folder: Path, bench: str, machine: str, *runs: tuple[str, dict]) -> None:
    data = {"bench": bench, "machine": machine, "machine_description": "test", "script": f"bench/{bench}.py",
            "runs": [{"date": d, "commit": "abc1234", "command": f"python bench/{bench}.py", "conditions": "test", "result": r}
                     for d, r in runs]}
    (folder / f"{bench}-{machine}.json").write_text(json.dumps(data))


COMPARISONS = [
    {"method": "nla_direct", "against": "baez_k10", "benchmark": "detection", "metric": "balanced_accuracy", "n": 40,
     "mean_diff": -0.05, "ci_low": -0.1, "ci_high": 0.0, "p_holm": 0.3},
    {"method": "nla_direct", "against": "eleuther_acts_top5", "benchmark": "detection", "metric": "balanced_accuracy", "n": 40,
     "mean_diff": -0.08, "ci_low": -0.12, "ci_high": -0.03, "p_holm": 0.01},
]


@pytest.fixture()
def results(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    gpu = {"device": "NVIDIA H200", "collect_full_state_tokens_per_s": 10000.0, "av_generated_tokens_per_s": 500.0, "av_batch": 64,
           "embedder_texts_per_s": 50000.0, "embedder_tokens": 24}
    results_file(folder, "capacity_measure_gpu", "h200", ("2026-11-26", gpu))
    results_file(folder, "av", "cpu2", ("2026-12-01", {"model": "m", "vllm_over_plain": 9.0}), ("2026-12-07", {"model": "m", "vllm_over_plain": 2.0}))
    results_file(folder, "demo", "cpu2", ("2026-11-27", {"route": {"tier1": 20, "tier2": 20, "tier3": 60}}))
    results_file(folder, "tier3_trade", "cpu2", ("2026-12-07", {"features": 40, "comparisons": COMPARISONS, "dedup_window": 8,
                                                               "duplicate_share": {"3": 0.0, "5": 0.1, "10": 0.2}}))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "job": "label", "features": str(tmp_path / "features"),
        "label": {"tier1": "token_freq", "tier2": "eleuther_acts_top5", "tier3": "nla_direct",
                  "explainer": {"backend": "anthropic", "model": "m", "mode": "batches",
                                "price": {"input_per_mtok": 3.0, "output_per_mtok": 15.0, "batch_discount": 0.5}},
                  "av_sidecar": "jobs/av/nla-gemma3-27b-L41.yaml", "av": {"engine": "vllm", "max_new_tokens": 176}}}))
    return folder, job


def test_capacity_plans_from_results_files_only(capacity, results):
    """Every figure from the files, each cited; the AV rate for the job's vLLM engine is the
    GPU's plain-generate figure × the latest vLLM/plain ratio (an estimate, said so); the
    tier shares from the demo record; the saving of a policy is labelling everything with
    tier 2 over routing; near-duplicates cut baez's AV work; quality beside each policy."""
    folder, job = results
    p = capacity.plan(capacity.parser().parse_args(["--results", str(folder), "--job", str(job)]))
    assert p["tier_shares"] == [0.2, 0.2, 0.6] and p["tier3_default"] == "nla_direct" and p["av_engine"] == "vllm"
    assert p["av_generated_tokens_per_s"] == 1000.0  # 500 x 2.0 (the later av run, not the earlier 9.0)
    src = p["sources"]
    assert "capacity_measure_gpu-h200.json" in src["av_gpu"] and "av-cpu2.json" in src["av_gpu"] and src["av_gpu"].startswith("estimate")
    assert "demo-cpu2.json" in src["tier_shares"] and "tier3_trade-cpu2.json" in src["duplicate_share"]
    assert "README" not in json.dumps(src) and "Message Batches (x0.5)" in src["prices"]
    # by hand: per live feature, tier 2 in dollars against route + 0.2 tier 2 + 0.6 tier 3
    t2 = (p["per_feature"]["tier2_input_tokens"] * 3 + p["per_feature"]["tier2_output_tokens"] * 15) / 1e6 * 0.5
    route = 20 * (3 - 0.2) / 50000 / 3600 * 6.88
    nla = 148 / 1000 / 3600 * 6.88
    assert p["policies"]["nla_direct"]["saving"] == pytest.approx(t2 / (route + 0.2 * t2 + 0.6 * nla), rel=0.01)
    assert p["policies"]["manual"]["saving"] == pytest.approx(t2 / (route + 0.2 * t2), rel=0.01)
    assert p["saving_default"] == p["policies"]["nla_direct"]["saving"]
    assert p["per_feature"]["baez_k10_gpu_s"] == pytest.approx(10 * 0.8 * 148 / 1000, rel=0.01)
    assert p["per_feature"]["baez_k3_gpu_s"] == pytest.approx(3 * 148 / 1000, rel=0.01)
    savings = [p["policies"][k]["saving"] for k in ("manual", "nla_direct", "baez_k3", "baez_k5", "baez_k10")]
    assert savings == sorted(savings, reverse=True)
    assert p["policies"]["nla_direct"]["quality"] == COMPARISONS and p["policies"]["baez_k3"]["quality"] == []
    # the AV rate each policy needs for a 3x saving: at that rate the plan gives 3x
    need = p["policies"]["nla_direct"]["av_tokens_per_s_for_3x"]
    at = capacity.plan(capacity.parser().parse_args(["--results", str(folder), "--job", str(job), "--av-tokens-per-s", str(need)]))
    assert at["policies"]["nla_direct"]["saving"] == pytest.approx(3.0, abs=0.01)
    assert p["policies"]["manual"]["av_tokens_per_s_for_3x"] == 0.0
    shares = [r["tier3_share"] for r in p["by_tier3_share"]]
    assert 0.6 in shares and shares == sorted(shares)
    assert all(r["manual"] >= r["nla_direct"] for r in p["by_tier3_share"])


def test_capacity_manifest_shares_and_a_transformers_engine(capacity, results, tmp_path, capsys):
    """A run's manifest gives the tier shares; the transformers engine (no vLLM record
    needed) bills a batch's explanations at the cap (the batch runs to its longest row);
    the printed plan names the job's policy and its sources."""
    folder, job = results
    (folder / "av-cpu2.json").unlink()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"stages": {"route": {"tier1": 1, "tier2": 1, "tier3": 2}}}))
    spec = yaml.safe_load(job.read_text())
    spec["label"]["av"] = {"engine": "transformers", "max_new_tokens": 160}
    spec["label"]["tier3"], spec["label"]["av_examples"] = "baez", 5
    job.write_text(yaml.safe_dump(spec))
    p = capacity.plan(capacity.parser().parse_args(["--results", str(folder), "--job", str(job), "--manifest", str(manifest)]))
    assert p["tier_shares"] == [0.25, 0.25, 0.5] and str(manifest) in p["sources"]["tier_shares"]
    assert p["tier3_default"] == "baez_k5" and p["av_tokens_per_explanation"] == 160 and p["av_generated_tokens_per_s"] == 500.0
    capacity.print_plan(p)
    out = capsys.readouterr().out
    assert "baez_k5" in out and "<- the job's" in out and "capacity_measure_gpu-h200.json" in out and "nla_direct − baez_k10: detection -0.050" in out


def test_measure_gpu_times_the_tuned_av_engine(capacity):
    """measure-gpu's AV part runs the engine's own generate (Generation) on a random model,
    each cache mode, without a tokenizer (the tiny shapes: the code path only)."""
    args = capacity.measure_gpu_parser().parse_args(["--tiny", "--time", "av", "--av-modes", "prefix,dynamic"])
    out = capacity.measure_gpu(args)
    assert out["tiny"] and {r["cache"] for r in out["av_runs"]} == {"prefix", "dynamic"}
    assert out["av_tuned_tokens_per_s"] > 0 and out["av_plain_tokens_per_s"] > 0


def test_real_scale_default_is_priced(capacity):
    """The real-scale job's tier-3 default is one the plan prices."""
    from baez_ray.config import read_yaml_mapping, validate

    spec = validate(read_yaml_mapping(ROOT / "jobs" / "gemma27b_l41_label.yaml", "job"), "job")
    assert capacity.policy_name(spec.label) in capacity.POLICIES


def test_capacity_counts_the_residuals_stage(capacity, results):
    """baez_kN's GPU time adds the residuals stage: N forwards of --residual-tokens left-context
    tokens at measure-gpu's forward rate (cited); none with --residuals kept."""
    folder, job = results
    results_file(folder, "capacity_measure_gpu", "h200", ("2026-11-26", {
        "device": "NVIDIA H200", "collect_full_state_tokens_per_s": 10000.0, "av_generated_tokens_per_s": 500.0, "av_batch": 64,
        "embedder_texts_per_s": 50000.0, "embedder_tokens": 24, "forward_tokens_per_s": 12800.0}))
    args = ["--results", str(folder), "--job", str(job), "--residual-tokens", "256"]
    p = capacity.plan(capacity.parser().parse_args(args))
    assert p["per_feature"]["baez_k10_gpu_s"] == pytest.approx(10 * 0.8 * 148 / 1000 + 10 * 256 / 12800, rel=0.01)
    assert p["per_feature"]["nla_direct_gpu_s"] == pytest.approx(148 / 1000, rel=0.01)
    assert "forward_tokens_per_s" in p["sources"]["residuals_gpu"]
    kept = capacity.plan(capacity.parser().parse_args(args + ["--residuals", "kept"]))
    assert kept["per_feature"]["baez_k10_gpu_s"] == pytest.approx(10 * 0.8 * 148 / 1000, rel=0.01)
