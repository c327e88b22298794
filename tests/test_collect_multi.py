"""collect with several SAEs at several layers in one pass (`saes:`), against a brute-force
dense computation per layer; the forward pass stops at the deepest layer read; the job
file's `saes:` form, its checks, and resume after an interrupted multi-SAE run."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from baez_ray.config import ConfigError, validate
from baez_ray.jobs import execute
from baez_ray.stages.collect import CollectWorker
from conftest import build_random_sae, build_tiny_gemma, make_text

TOP_K, WINDOW, LEFT, CTX_LEN, RES, PER_DEC = 5, 8, 5, 24, 12, 2
LAYERS = {"l0-a": 0, "l2-b": 2}  # SAE id → layer, in the job's order
D_SAE = {"l0-a": 96, "l2-b": 64}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A 4-layer tiny Gemma, two random SAEs of different widths, a corpus."""
    d = tmp_path_factory.mktemp("multi")
    model = build_tiny_gemma(d / "model", layers=4)
    saes = {sid: build_random_sae(d / sid, d_sae=D_SAE[sid], seed=i + 1) for i, sid in enumerate(LAYERS)}
    (d / "corpus").mkdir()
    for i in range(3):
        (d / "corpus" / f"doc{i}.txt").write_text(make_text(220, seed=300 + i))
    return model, saes, d / "corpus"


def multi_job(parts, name="multi", **collect):
    model, saes, corpus = parts
    return validate({
        "job": "collect", "name": name,
        "model": {"id": "tiny4", "path": str(model), "num_cpus": 0.5},
        "saes": [{"id": sid, "layer": layer, "path": str(saes[sid])} for sid, layer in LAYERS.items()],
        "corpus": {"paths": [str(corpus / "*.txt")], "context_len": CTX_LEN},
        "collect": {"top_k": TOP_K, "window": WINDOW, "window_left": LEFT, "reservoir": RES, "samples_per_decile": PER_DEC,
                    "keep_residual": [2], "residual_top_n": 2, "batch_size": 3, **collect},
    })


@pytest.fixture(scope="module")
def one_pass(ray_local, parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_multi")
    execute(multi_job(parts), out)
    return out


def by_sae(run_dir):
    rows = pq.read_table(run_dir / "features").to_pylist()
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["sae_id"], []).append(r)
    return out


@pytest.mark.slow
def test_each_sae_equals_brute_force_at_its_layer(one_pass, parts):
    """Top-k of every feature of every SAE from the one-pass collect equals the dense
    computation (plain HF forward, hidden_states[layer + 1], the SAE's encode), exactly."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, saes, _ = parts
    ctx = pq.read_table(one_pass / "contexts").sort_by("context_id")
    ids = torch.tensor(np.stack(ctx.column("tokens").to_numpy(zero_copy_only=False)).astype(np.int64))
    cids = ctx.column("context_id").to_numpy()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    bos = AutoTokenizer.from_pretrained(model_dir).bos_token_id
    with torch.no_grad():
        hidden = [model(input_ids=ids[i : i + 3], output_hidden_states=True).hidden_states for i in range(0, len(ids), 3)]
    got = by_sae(one_pass)
    assert sorted(got) == sorted(LAYERS)
    for sid, layer in LAYERS.items():
        hs = torch.cat([h[layer + 1] for h in hidden])
        with torch.no_grad():
            acts = SAE.load_from_disk(saes[sid]).encode(hs)
        acts[ids == bos] = 0
        acts, hs = acts.numpy(), hs.numpy()
        vmax, pmax = acts.max(axis=1), acts.argmax(axis=1)
        feats = sorted(got[sid], key=lambda r: r["feature"])
        assert [f["feature"] for f in feats] == list(range(D_SAE[sid]))
        checked = 0
        for f in feats:
            fi = f["feature"]
            assert f["layer"] == layer and f["model_id"] == "tiny4"
            firing = [c for c in range(len(cids)) if vmax[c, fi] > 0]
            expected = sorted(firing, key=lambda c: (-vmax[c, fi], cids[c]))[:TOP_K]
            top = [e for e in f["examples"] if e["kind"] == "top"]
            assert [e["context_id"] for e in top] == [int(cids[c]) for c in expected], (sid, fi)
            for e, c in zip(top, expected):
                assert e["position"] == pmax[c, fi] and e["value"] == vmax[c, fi]
                if layer == 2 and e["rank"] < 2:  # keep_residual: [2]
                    np.testing.assert_allclose(e["residual"], hs[c, pmax[c, fi]], rtol=1e-4, atol=1e-5)
                else:
                    assert e["residual"] is None
            assert f["n_firing"] == int((acts[:, :, fi] > 0).sum()) and f["n_tokens"] == ids.numel()
            checked += bool(top)
        assert checked > D_SAE[sid] // 2, f"the random SAE {sid} should fire on most features"


def test_forward_stops_at_the_deepest_layer_read(parts):
    """One batch through a two-SAE CollectWorker: blocks 0..2 each run once, block 3 is
    gone, and nothing after the deepest block read (the final norm) runs."""
    from baez_ray.stages.collect import CollectWorker

    spec = multi_job(parts)
    worker = CollectWorker(spec.model.model_dump(), [s.model_dump() for s in spec.saes], spec.collect.model_dump(), 0,
                           list(D_SAE.values()), 2, 1)
    calls = {i: 0 for i in range(len(worker.lm.layers))}
    for i, block in enumerate(worker.lm.layers):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    norm_calls = []
    worker.lm.model.model.norm.register_forward_pre_hook(lambda m, a: norm_calls.append(1))
    tokens = np.random.default_rng(0).integers(4, 200, size=(3, CTX_LEN))
    out = worker({"context_id": np.arange(3), "tokens": np.array(list(tokens), dtype=object)})
    assert calls == {0: 1, 1: 1, 2: 1} and norm_calls == []
    assert out.num_rows > 0 and int(np.max(out.column("feature").to_numpy())) >= D_SAE["l0-a"]  # both SAEs emitted


def test_saes_job_file_validates_and_refuses_duplicate_ids(parts, tmp_path):
    from baez_ray.jobs.preflight import preflight

    spec = multi_job(parts)
    assert [(s.id, s.layer) for s in spec.saes] == list(LAYERS.items()) and spec.sae is None
    assert preflight(spec, offline=True, ray_address=False)[0] == []
    data = spec.model_dump(mode="json")
    dup = {**data, "saes": [data["saes"][0], {**data["saes"][1], "id": "l0-a"}]}
    with pytest.raises(ConfigError, match=r"saes\.1\.id: 'l0-a' is the id of saes\.0 too"):
        validate(dup)
    with pytest.raises(ConfigError, match=r"saes\.1\.layer: missing"):
        validate({**data, "saes": [data["saes"][0], {**data["saes"][1], "layer": None}]})
    with pytest.raises(ConfigError, match=r"model\.layer is for the single sae form"):
        validate({**data, "model": {**data["model"], "layer": 1}})
    with pytest.raises(ConfigError, match=r"not both"):
        validate({**data, "sae": data["saes"][0]})
    # the single form reads back as a list of one, and both forms store the same spec
    single = validate({**data, "saes": [], "sae": {k: v for k, v in data["saes"][1].items() if k != "layer"},
                       "model": {**data["model"], "layer": 2}})
    assert single.saes == spec.saes[1:] and single.model.layer is None
    # preflight checks each SAE: a layer past the model's, an SAE of another width
    other = build_random_sae(tmp_path / "wide", d_in=32)
    bad = validate({**data, "saes": [{**data["saes"][0], "path": str(other)}, {**data["saes"][1], "layer": 4}]})
    problems = preflight(bad, offline=True, ray_address=False)[0]
    assert any(p.startswith("saes.1.layer: 4, but") and "has 4 layers" in p for p in problems), problems
    assert any(p.startswith("saes.0.path: ") and "d_in=32" in p for p in problems), problems


class WaitingWorker(CollectWorker):
    """Waits (up to 60 s) for the file `marker` before its second call."""

    marker = ""

    def __call__(self, batch):
        import time
        from pathlib import Path

        self.calls = getattr(self, "calls", 0) + 1
        deadline = time.monotonic() + 60
        while self.calls > 1 and not Path(self.marker).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return super().__call__(batch)


@pytest.mark.slow
def test_resume_after_an_interrupted_multi_sae_collect(one_pass, parts, tmp_path, monkeypatch):
    """A run that dies right after its first snapshot, run again: the same tables as the
    uninterrupted run (every SAE's rows), and the rerun merged only the other parts."""
    import json

    from baez_ray.stages import collect as collect_mod
    from baez_ray.stages.merge import Checkpoints

    spec = multi_job(parts, batch_size=3, checkpoint_s=0, checkpoint_contexts=1)
    save = Checkpoints.save
    # the worker pushes its second part only once the first snapshot round is committed
    # (the merge actors merge what they are pushed at once: they may be ahead of the
    # receipts the driver has seen, and a snapshot covers what they have merged)
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the class travels to the Ray workers
    WaitingWorker.marker = str(tmp_path / "collect_state" / "COMMITTED.json")
    monkeypatch.setattr(collect_mod, "CollectWorker", WaitingWorker)

    def save_then_die(self, merger):
        save(self, merger)
        raise RuntimeError("killed after the first snapshot")

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(RuntimeError, match="killed after the first snapshot"):
        execute(spec, tmp_path)
    monkeypatch.setattr(Checkpoints, "save", save)
    monkeypatch.setattr(collect_mod, "CollectWorker", CollectWorker)
    marker = json.loads((tmp_path / "collect_state" / "COMMITTED.json").read_text())
    assert 0 < len(marker["done"]) < len(marker["parts"])
    execute(spec, tmp_path)
    stage = json.loads((tmp_path / "manifest.json").read_text())["stages"]["collect"]
    assert stage["resumed_parts"] == len(marker["done"]) and stage["features_per_sae"] == D_SAE

    def rows(run_dir):
        return pq.read_table(run_dir / "features").sort_by([("sae_id", "ascending"), ("feature", "ascending")]).to_pylist()

    assert rows(tmp_path) == rows(one_pass)


@pytest.mark.slow
def test_corpus_negatives_of_two_saes(one_pass, parts):
    """`score.negatives: corpus` with features of both SAEs: one forward pass reads both
    layers, and every window returned is silent for its feature at its SAE's layer."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    from baez_ray.stages.negatives import corpus_negatives

    spec = multi_job(parts)
    keys = [(sid, f) for sid in LAYERS for f in range(0, 60, 7)]
    neg = corpus_negatives(one_pass / "contexts", spec.model, spec.saes, spec.corpus, spec.collect.window,
                           spec.collect.batch_size, keys, n=3, seed=0, n_contexts=12)
    contexts = {r["context_id"]: r["tokens"] for r in pq.read_table(one_pass / "contexts").to_pylist()}
    model = AutoModelForCausalLM.from_pretrained(parts[0]).eval()
    saes = {sid: SAE.load_from_disk(parts[1][sid]) for sid in LAYERS}
    found = {sid: 0 for sid in LAYERS}
    for row in neg.to_pylist():  # rows (sae_id, feature, examples)
        sid, f = row["sae_id"], row["feature"]
        for e in row["examples"]:
            with torch.no_grad():
                hs = model(input_ids=torch.tensor([contexts[e["context_id"]]]), output_hidden_states=True).hidden_states
                acts = saes[sid].encode(hs[LAYERS[sid] + 1])[0, e["position"] : e["position"] + WINDOW, f]
            assert float(acts.max()) <= 0, (sid, f, e["context_id"], e["position"])
            found[sid] += 1
    assert all(n >= 6 for n in found.values()), found
    with pytest.raises(ValueError, match=r"features of SAE\(s\) \['other'\]"):
        corpus_negatives(one_pass / "contexts", spec.model, spec.saes, spec.corpus, WINDOW, 3, [("other", 1)], n=1, seed=0)
