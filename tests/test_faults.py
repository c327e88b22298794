"""Faults: an actor that dies mid-batch is restarted by Ray and its batch retried (the LLM
backend's actor pool, and collect's model actor, whose restart must not change the
result); an LLM backend outage beyond its retries fails only the rows it touched, with the
error in the labels table, and the same command run again retries only those rows."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from baez_ray.config import LLMConfig, validate
from baez_ray.jobs import execute
from baez_ray.ray_pool import ACTOR_FAULT_TOLERANCE
from conftest import make_text, serve_local
from helpers import KEY, KEY_ENV, Outage, tagged_features, tiny_chat_model


@pytest.fixture(scope="module", autouse=True)
def by_value():
    """The dying actor classes below live in this test module, which Ray's workers cannot
    import: ship them by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_actor_pools_restart_and_retry():
    assert ACTOR_FAULT_TOLERANCE["max_restarts"] == -1 and ACTOR_FAULT_TOLERANCE["max_task_retries"] >= 1


# ---- (a) an actor dies mid-batch ----------------------------------------------------------

from baez_ray.llm.backends.transformers_backend import TransformersChat  # noqa: E402
from baez_ray.stages.collect import CollectWorker  # noqa: E402


class DyingChat(TransformersChat):
    """Dies (os._exit, as an OOM kill would) on its first batch unless `state/died`
    exists; records the PID of every process that answered a batch."""

    state = ""  # set by the test before the class is shipped

    def __call__(self, batch):
        state = Path(self.state)
        if not (state / "died").exists():
            (state / "died").write_text(str(os.getpid()))
            os._exit(1)
        (state / f"served-{os.getpid()}").touch()
        return super().__call__(batch)


class DyingCollectWorker(CollectWorker):
    """Dies on its third call (two parts merged, the third in its hands) unless
    `state/died` exists: the restarted actor starts with an empty running top-k."""

    state = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        state = Path(self.state)
        if self.calls == 3 and not (state / "died").exists():
            (state / "died").write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("chat"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kept", [False, True], ids=["ray-data-pool", "kept-pool"])
def test_llm_actor_dies_mid_batch_is_restarted_and_batch_retried(ray_local, chat_model, tmp_path, monkeypatch, kept):
    from baez_ray.llm.backends import generate, prompt_table, transformers_backend
    from baez_ray.ray_pool import kept_pools

    DyingChat.state = str(tmp_path)
    monkeypatch.setattr(transformers_backend, "TransformersChat", DyingChat)
    rows = [{"request_id": f"r{i}", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4,
             "temperature": 0.0, "stop": None, "constraint": None, "feature": i} for i in range(8)]
    cfg = LLMConfig(backend="transformers", model=str(chat_model), batch_size=2, num_actors=1, num_cpus=0.5)
    with kept_pools() if kept else contextlib.nullcontext():  # a job's long-lived pool, or Ray Data's
        out = generate(ray_local.data.from_arrow(prompt_table(rows)), cfg).to_pandas().sort_values("feature")

    dead = int((tmp_path / "died").read_text())
    served = {int(p.name.split("-")[1]) for p in tmp_path.glob("served-*")}
    assert served and dead not in served  # another process (the restarted actor) answered
    assert list(out["feature"]) == list(range(8))  # every row, once
    assert out["error"].isna().all() and out["answer"].notna().all() and (out["output_tokens"] > 0).all()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_collect_actor_dies_mid_corpus_same_result(ray_local, tiny_gemma, random_sae, tmp_path, monkeypatch):
    from baez_ray.stages import collect

    (tmp_path / "c.txt").write_text(make_text(900, 3))

    def spec():
        return validate({
            "job": "collect", "name": "faults",
            "model": {"id": "tiny", "path": str(tiny_gemma), "layer": 0, "num_cpus": 0.5},
            "sae": {"id": "s", "path": str(random_sae)},
            "corpus": {"paths": [str(tmp_path / "c.txt")], "context_len": 24},
            "collect": {"top_k": 5, "window": 8, "window_left": 4, "reservoir": 6, "batch_size": 1, "keep_residual": True,
                        "residual_top_n": 2},
        })

    clean = execute(spec(), tmp_path / "clean")
    DyingCollectWorker.state = str(tmp_path)
    monkeypatch.setattr(collect, "CollectWorker", DyingCollectWorker)
    faulty = execute(spec(), tmp_path / "faulty")

    assert (tmp_path / "died").exists()
    a, b = (pq.read_table(r.dir / "features").sort_by("feature").to_pylist() for r in (clean, faulty))
    assert a == b  # exact: each part runs in the same batches; no context counted twice
    st = faulty.manifest["stages"]["collect"]
    assert st["tokens"] == clean.manifest["stages"]["collect"]["tokens"]
    # the restarted actor began with an empty top-k: it sent more candidates, merged away
    assert st["candidate_rows"] > clean.manifest["stages"]["collect"]["candidate_rows"]


# ---- (b) an LLM backend outage beyond its retries -----------------------------------------

@pytest.fixture
def outage():
    fake = Outage(failing={2, 5})
    with serve_local(fake.handler()) as fake.url:
        yield fake


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_llm_outage_fails_only_its_rows_and_rerun_retries_only_them(ray_local, outage, tmp_path, monkeypatch):
    from baez_ray.rundir import write_table

    monkeypatch.setenv(KEY_ENV, KEY)
    write_table(tagged_features(8), tmp_path / "features")
    spec = validate({
        "job": "label", "name": "outage", "features": str(tmp_path / "features"),
        "route": {"tau_in": 1.0, "tau_out": 1.0, "tau_cross": -1.0, "num_cpus": 0.5},
        "label": {"tier2": "eleuther_acts_top5", "max_retries": 0, "shard_features": 4,
                  "explainer": {"backend": "anthropic", "model": "claude-sonnet-4-5", "base_url": outage.url, "api_key_env": KEY_ENV,
                                "max_retries": 2, "timeout_s": 10, "batch_size": 4, "max_concurrency": 2,
                                "price": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}},
    })
    out = tmp_path / "run"

    # 1. the backend is down for features 2 and 5: their rows fail after the SDK's retries
    run = execute(spec, out)
    first = {r["feature"]: r for r in pq.read_table(out / "labels").to_pylist()}
    assert sorted(first) == list(range(8))
    for f, r in first.items():
        if f in outage.failing:
            assert r["label"] is None and r["raw"] is None and r["tries"] == 1 and r["cost_usd"] == 0.0
            assert "529" in r["error"] and "Overloaded" in r["error"] and KEY not in r["error"]
        else:
            assert r["label"] == f"the word zq{f}x" and r["error"] is None and r["tier"] == 2
    per_feature = Counter(f for f, _ in outage.log)
    assert all(per_feature[f] == 3 for f in outage.failing)  # 1 try + the SDK's 2 retries
    assert all(per_feature[f] == 1 for f in set(range(8)) - outage.failing)
    st = run.manifest["stages"]["label"]
    assert st["backend_failed"] == 2 and st["llm_failed"] == 2 and st["not_tried"] == 0 and st["labelled"] == 6 and run.manifest["status"] == "done"

    # 2. the same command with the backend healthy again: only the two failed rows are sent
    outage.down = False
    n_before = len(outage.log)
    run = execute(spec, out)
    assert sorted(f for f, _ in outage.log[n_before:]) == [2, 5]
    labels = pq.read_table(out / "labels").to_pylist()
    assert sorted(r["feature"] for r in labels) == list(range(8))  # one row each
    for r in labels:
        assert r["label"] == f"the word zq{r['feature']}x" and r["error"] is None
        if r["feature"] not in outage.failing:
            assert r == first[r["feature"]]  # untouched
    st = run.manifest["stages"]["label"]
    assert st["retried_backend_failed"] == 2 and st["resumed_features"] == 6 and st["backend_failed"] == 0
    assert st["labelled"] == 8 and run.manifest["attempts"] == 2

    # 3. once more: nothing is left to do, nothing is sent
    n_before = len(outage.log)
    run = execute(spec, out)
    assert len(outage.log) == n_before and "label" in run.manifest["stages"]
    assert pq.read_table(out / "labels").num_rows == 8
