"""collect against a brute-force dense computation on the same corpus."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from baez_ray import schema
from baez_ray.config import validate
from baez_ray.jobs import execute
from conftest import make_text

TOP_K, WINDOW, LEFT, CTX_LEN, RES, PER_DEC = 5, 8, 5, 24, 12, 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"doc{i}.txt").write_text(make_text(260, seed=100 + i))
    (d / "more.jsonl").write_text("\n".join(json.dumps({"text": make_text(80, seed=200 + j)}) for j in range(4)))
    return d


def job(tiny_gemma, random_sae, corpus, **collect):
    return validate(
        {
            "job": "collect",
            "name": "t",
            "model": {"id": "tiny-gemma", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
            "sae": {"id": "0-res-random", "path": str(random_sae)},
            "corpus": {"paths": [str(corpus / "*.txt"), str(corpus / "*.jsonl")], "context_len": CTX_LEN},
            "collect": {
                "top_k": TOP_K, "window": WINDOW, "window_left": LEFT, "reservoir": RES,
                "samples_per_decile": PER_DEC, "keep_residual": True, "residual_top_n": 2, **collect,
            },
        }
    )


def read_features(run_dir):
    t = pq.read_table(run_dir / "features")
    assert t.schema.equals(schema.FEATURES, check_metadata=False)
    return t.to_pylist()


@pytest.fixture(scope="module")
def one_shard(ray_local, tiny_gemma, random_sae, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    execute(job(tiny_gemma, random_sae, corpus, batch_size=3, num_actors=1), out)
    return out


@pytest.fixture(scope="module")
def dense(one_shard, tiny_gemma, random_sae):
    """Every activation of every feature on every token, by a plain HF forward pass
    (hidden_states, no hook) and the SAE's encode."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx = pq.read_table(one_shard / "contexts").sort_by("context_id")
    ids = torch.tensor(np.stack(ctx.column("tokens").to_numpy(zero_copy_only=False)).astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma).eval()
    sae = SAE.load_from_disk(random_sae)
    bos = AutoTokenizer.from_pretrained(tiny_gemma).bos_token_id
    with torch.no_grad():
        hs = torch.cat([model(input_ids=ids[i : i + 3], output_hidden_states=True).hidden_states[1] for i in range(0, len(ids), 3)])
        acts = sae.encode(hs)
    acts[ids == bos] = 0
    return ids.numpy(), acts.numpy(), hs.numpy(), ctx.column("context_id").to_numpy()


def window(row, pos):
    lo, hi = max(0, pos - LEFT), min(len(row), pos - LEFT + WINDOW)
    return row[lo:hi], pos - lo


@pytest.fixture(scope="module")
def three_merges(ray_local, tiny_gemma, random_sae, corpus, tmp_path_factory):
    """The run of `one_shard` with the features split over three merge actors."""
    out = tmp_path_factory.mktemp("run3")
    execute(job(tiny_gemma, random_sae, corpus, batch_size=3, num_actors=1, merge_actors=3), out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", ["one_shard", "three_merges"])
def test_topk_equals_brute_force(run, dense, request):
    """One merge actor, and three (each its range of the features: rows routed by the
    workers, thresholds fed back, each writing its own parts of the table)."""
    run_dir = request.getfixturevalue(run)
    ids, acts, hs, cids = dense
    feats = read_features(run_dir)
    assert [f["feature"] for f in feats] == list(range(acts.shape[2]))  # one row per feature, in order
    assert len(feats) == acts.shape[2]
    vmax, pmax = acts.max(axis=1), acts.argmax(axis=1)  # [C, F]
    checked = 0
    for f in feats:
        fi = f["feature"]
        firing = [c for c in range(len(cids)) if vmax[c, fi] > 0]
        expected = sorted(firing, key=lambda c: (-vmax[c, fi], cids[c]))[:TOP_K]
        top = [e for e in f["examples"] if e["kind"] == "top"]
        assert [e["context_id"] for e in top] == [int(cids[c]) for c in expected]
        assert [e["rank"] for e in top] == list(range(len(top)))
        for e, c in zip(top, expected):
            assert e["position"] == pmax[c, fi]
            assert e["value"] == vmax[c, fi]  # exact: same batch size, same float32 arithmetic
            toks, ti = window(ids[c], int(pmax[c, fi]))
            assert e["tokens"] == toks.tolist() and e["top_index"] == ti
            assert e["acts"] == window(acts[c, :, fi], int(pmax[c, fi]))[0].tolist()
            assert e["acts"][ti] == e["value"]
            if e["rank"] < 2:
                np.testing.assert_allclose(e["residual"], hs[c, pmax[c, fi]], rtol=1e-4, atol=1e-5)
            else:
                assert e["residual"] is None
        assert f["n_firing"] == int((acts[:, :, fi] > 0).sum())
        assert f["n_tokens"] == ids.size
        assert f["max_activation"] == pytest.approx(float(vmax[:, fi].max()), rel=1e-5)
        checked += bool(top)
    assert checked > acts.shape[2] // 2, "the random SAE should fire on most features"
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["collect"]
    n_merge = {"one_shard": 1, "three_merges": 3}[run]
    assert stage["merge_actors"] == n_merge
    assert {p.name.split("-")[1] for p in (run_dir / "features").glob("part-*.parquet")} == {f"{i:03d}" for i in range(n_merge)}


@pytest.mark.slow
def test_topk_equals_a_delphi_like_reference(one_shard, dense):
    """Stands in for bench/peer_delphi.py in CI: with delphi's definitions (activations
    above 1e-5 stored in float16, one example window per context, windows ranked by their
    float16 maximum) the top-k is ours on every feature where float16 leaves that order
    defined (the maxima of its top k+1 contexts all differ): exact match share 1.0."""
    _, acts, _, cids = dense
    vmax = np.where(np.abs(acts) > 1e-5, acts, 0).astype(np.float16).max(axis=1)  # [C, F]
    comparable = 0
    for f in read_features(one_shard):
        fi = f["feature"]
        firing = np.flatnonzero(vmax[:, fi] > 0)
        order = firing[np.argsort(-vmax[firing, fi].astype(np.float32), kind="stable")]
        head = vmax[order[: TOP_K + 1], fi]
        if len(np.unique(head)) < len(head):
            continue
        comparable += 1
        assert [e["context_id"] for e in f["examples"] if e["kind"] == "top"] == [int(cids[c]) for c in order[:TOP_K]]
    assert comparable >= 10


@pytest.mark.slow
def test_decile_samples(one_shard, dense):
    ids, acts, _, cids = dense
    vmax = acts.max(axis=1)
    by_ctx = {int(c): i for i, c in enumerate(cids)}
    n_samples = 0
    for f in read_features(one_shard):
        top_ctx = {e["context_id"] for e in f["examples"] if e["kind"] == "top"}
        samples = [e for e in f["examples"] if e["kind"] == "sample"]
        per_decile: dict[int, int] = {}
        for e in samples:
            c = by_ctx[e["context_id"]]
            assert e["context_id"] not in top_ctx
            assert e["value"] == pytest.approx(float(vmax[c, f["feature"]]), rel=1e-5)
            assert e["decile"] == min(10, max(1, math.ceil(10 * e["value"] / f["max_activation"])))
            per_decile[e["decile"]] = per_decile.get(e["decile"], 0) + 1
        assert all(v <= PER_DEC for v in per_decile.values())
        n_samples += len(samples)
    assert n_samples > 0


@pytest.mark.slow
def test_logit_lens_equals_brute_force(one_shard, tiny_gemma, random_sae, corpus):
    """After collect every feature carries its decoder row's top promoted and suppressed
    tokens (stages/logit_lens.py): the brute-force W_dec @ W_U top-k in float64, token
    strings as the tokenizer decodes each id; a rerun of the stage runs no part, and a
    part whose marker is gone is the only one run again."""
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baez_ray.config import LogitLensConfig
    from baez_ray.stages.logit_lens import MARKER, logit_lens

    W_U = AutoModelForCausalLM.from_pretrained(tiny_gemma).get_output_embeddings().weight.detach().double()
    logits = SAE.load_from_disk(random_sae).W_dec.detach().double() @ W_U.T
    k = LogitLensConfig().top_k
    pos, neg = torch.topk(logits, k, dim=1), torch.topk(logits, k, dim=1, largest=False)
    tok = AutoTokenizer.from_pretrained(tiny_gemma)
    feats = read_features(one_shard)
    for f in feats:
        i = f["feature"]
        assert f["pos_tokens"] == [tok.decode([int(t)]) for t in pos.indices[i]]
        assert f["neg_tokens"] == [tok.decode([int(t)]) for t in neg.indices[i]]
        np.testing.assert_allclose(f["pos_values"], pos.values[i].numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(f["neg_values"], neg.values[i].numpy(), rtol=1e-4, atol=1e-5)
    stage = json.loads((one_shard / "manifest.json").read_text())["stages"]["logit_lens"]
    assert stage["features"] == len(feats) and stage["parts_run"] == stage["parts"] >= 1
    # token_freq's output labels read them, as they read an export's
    import pyarrow as pa

    from baez_ray.methods.token_freq import normalise, token_freq_labels

    table = pq.read_table(one_shard / "features")
    n = table.num_rows
    routes = pa.table({"sae_id": table.column("sae_id"), "layer": table.column("layer"), "feature": table.column("feature"),
                       "tier": pa.array([1] * n, pa.int8()), "kind": ["output"] * n})
    for lab, f in zip(token_freq_labels(table, routes).to_pylist(), feats):
        want = list(dict.fromkeys(t for t in map(normalise, f["pos_tokens"]) if t))[:3]
        assert lab["feature"] == f["feature"] and lab["label"].endswith("; logits: " + " / ".join(want))
    spec = job(tiny_gemma, random_sae, corpus)
    assert logit_lens(one_shard / "features", spec.model, spec.saes, LogitLensConfig())["parts_run"] == 0
    part = sorted((one_shard / "features").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.replace_schema_metadata({k_: v for k_, v in table.schema.metadata.items() if k_ != MARKER}), part)
    again = logit_lens(one_shard / "features", spec.model, spec.saes, LogitLensConfig())
    assert again["parts_run"] == 1 and again["features"] == table.num_rows
    assert read_features(one_shard) == feats


@pytest.mark.slow
def test_shards_and_order_do_not_change_the_result(one_shard, ray_local, tiny_gemma, random_sae, corpus, tmp_path):
    execute(job(tiny_gemma, random_sae, corpus, batch_size=2, num_actors=2), tmp_path)
    a, b = read_features(one_shard), read_features(tmp_path)

    def strip(rows):  # float equality up to the last bits of a different batch size
        for r in rows:
            for e in r["examples"]:
                e["value"] = round(e["value"], 4)
                e["acts"] = [round(x, 4) for x in e["acts"]]
                e["residual"] = None if e["residual"] is None else [round(x, 3) for x in e["residual"]]
        return rows

    assert strip(a) == strip(b)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["stages"]["collect"]["features"] == len(a)


@pytest.mark.slow
def test_merger_compaction_is_exact(one_shard, tiny_gemma, random_sae, corpus):
    """Feeding the same candidates through a merger that compacts after every batch gives
    the same table as one that never compacts."""
    from baez_ray.config import CollectConfig
    from baez_ray.stages.collect import CollectWorker
    from baez_ray.stages.merge import Merger

    spec = job(tiny_gemma, random_sae, corpus)
    ctx = pq.read_table(one_shard / "contexts").to_pydict()
    worker = CollectWorker(spec.model.model_dump(), [spec.saes[0].model_dump()], spec.collect.model_dump(), 0, [96], 2, 1)
    batches = []
    for i in range(0, len(ctx["context_id"]), 4):
        batches.append(worker({"context_id": np.array(ctx["context_id"][i : i + 4]), "tokens": np.array(ctx["tokens"][i : i + 4], dtype=object)}))
    cfg = CollectConfig(**spec.collect.model_dump())
    eager, lazy = Merger(96, cfg, buffer_rows=1), Merger(96, cfg, buffer_rows=10**9)
    for bt in batches:
        eager.add(bt)
        lazy.add(bt)
    text = lambda ids: [str(i) for i in ids]  # noqa: E731
    assert eager.features_table([("s", 0, 96)], "m", text).equals(lazy.features_table([("s", 0, 96)], "m", text))
    # one context and one feature at a time through the SAE (a wide dictionary's budget)
    # changes nothing
    import baez_ray.stages.collect as collect_mod

    budget, collect_mod.ACTS_BUDGET = collect_mod.ACTS_BUDGET, 1
    try:
        narrow = Merger(96, cfg)
        worker1 = CollectWorker(spec.model.model_dump(), [spec.saes[0].model_dump()], spec.collect.model_dump(), 0, [96], 2, 1)
        for i in range(0, len(ctx["context_id"]), 4):
            narrow.add(worker1({"context_id": np.array(ctx["context_id"][i : i + 4]), "tokens": np.array(ctx["tokens"][i : i + 4], dtype=object)}))
    finally:
        collect_mod.ACTS_BUDGET = budget
    # (a block of features is a matmul on a column block of W_enc: the same activations up
    # to the last bits of float32, so floats are compared to 1e-5)
    def close(a, b):
        if isinstance(a, float) and isinstance(b, float):
            return a == pytest.approx(b, rel=1e-5, abs=1e-6)
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
        return a == b

    assert close(narrow.features_table([("s", 0, 96)], "m", text).to_pylist(), lazy.features_table([("s", 0, 96)], "m", text).to_pylist())
    # later batches emit fewer candidates than the first: the running top-k filters them
    top_rows = [bt.filter(np.array([k == "top" for k in bt.column("kind").to_pylist()])).num_rows for bt in batches]
    assert top_rows[-1] < top_rows[0]


@pytest.mark.slow
def test_rerun_skips_finished_stages_and_refuses_another_spec(one_shard, tiny_gemma, random_sae, corpus):
    first = sorted((one_shard / "features").glob("part-*.parquet"))[0]  # part-000-00000: merge actor 0's first
    before = first.stat().st_mtime_ns
    run = execute(job(tiny_gemma, random_sae, corpus, batch_size=3, num_actors=1), one_shard)
    assert first.stat().st_mtime_ns == before
    assert run.manifest["attempts"] == 2 and run.manifest["status"] == "done"
    with pytest.raises(ValueError, match="different job spec"):
        execute(job(tiny_gemma, random_sae, corpus, batch_size=4, num_actors=1), one_shard)


@pytest.mark.slow
def test_report_shows_examples(one_shard):
    page = (one_shard / "report" / "index.html").read_text()
    assert (one_shard / "report" / "firing.png").stat().st_size > 1000
    assert "<mark" in page and "features that fired" in page and "96" in page



def test_set_entries_equals_nonzero_at_every_density():
    """The word-wise search of a firing mask's set entries gives `nonzero`'s indices, in
    order, for sparse and dense masks and lengths that are not a multiple of 8."""
    import torch

    from baez_ray.stages.collect import _set_entries

    g = torch.Generator().manual_seed(1)
    for n in (0, 1, 7, 8, 9, 64, 1000, 16384 * 3 + 5):
        for p in (0.0, 0.0002, 0.01, 0.3, 1.0):
            mask = torch.rand(n, generator=g) < p
            assert torch.equal(_set_entries(mask), mask.nonzero().squeeze(1)), (n, p)


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_blocks_give_the_dense_counts_and_maxima(arch, monkeypatch):
    """`_Dictionary.blocks`, for an SAE encoded whole (TopK) and one encoded by column
    chunks (JumpReLU): over every chunk, the activations are sae-lens' encode with BOS
    zeroed, and the firing counts, each context's max and its first position equal the
    dense reductions (ties included: two positions of each context share a residual). A small
    budget forces several chunks, and `collect.features` keeps fewer features than the
    SAE has."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TopKSAE, TopKSAEConfig

    import baez_ray.stages.collect as stage
    from baez_ray.config import CollectConfig

    torch.manual_seed(3)
    d_in, d_sae, F, b, T, bos = 16, 40, 37, 3, 11, 2
    if arch == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=6))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae))
        with torch.no_grad():
            sae.threshold.fill_(0.3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    resid = torch.randint(-2, 3, (b, T, d_in)).float()
    resid[:, 8] = resid[:, 4]  # the same activations at two positions: ties for the max
    ids = torch.randint(3, 50, (b, T))
    ids[:, 0] = bos
    ids[1, 5] = bos
    with torch.no_grad():
        dense = sae.encode(resid)[..., :F].clone()
    dense[ids == bos] = 0.0  # (position 0 and one other)
    monkeypatch.setattr(stage, "ACTS_BUDGET", b * T * 8)  # chunks of 8 features
    d = stage._Dictionary(sae, 0, F, 0, CollectConfig(), "cpu")
    assert d.chunked == (arch == "jumprelu")
    seen = []
    with torch.no_grad():
        for a, acts, counts, vmax, pmax in d.blocks(resid, ids, bos):
            c = acts.shape[2]
            torch.testing.assert_close(acts, dense[..., a : a + c])  # (a column block's matmul may round differently)
            assert not acts.view(b * T, c)[(ids == bos).view(-1)].any()
            assert torch.equal(counts, (acts > 0).sum(dim=(0, 1)))
            rmax, rpos = acts.max(dim=1)
            assert torch.equal(vmax, rmax.clamp(min=0))
            fires = rmax > 0
            assert torch.equal(pmax[fires], rpos[fires]) and not pmax[~fires].any()
            seen.append((a, c))
    assert [a for a, _ in seen] == list(range(0, F, 8)) and sum(c for _, c in seen) == F
    at_max = (dense == dense.max(dim=1, keepdim=True).values) & (dense > 0)
    assert (at_max.sum(dim=1) > 1).any(), "the case should hold a tie for some context's max"
    assert (dense > 0).float().mean() > 0.05, "the SAE should fire"
