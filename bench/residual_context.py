"""What an export's shorter left context costs the residual the AV reads.

A collect run keeps each example's corpus context (contexts/): the residuals stage reads
the context up to the top token, exactly what the SAE encoded. An export carries only a
window around the top token (the demo's: 16 tokens before it), so the stage reads the
window, BOS first. For a seeded sample of features per SAE of a collect run, and their top
examples, this compares the two vectors (one forward each, `models.lm.ResidualReader`, in
this process): their cosine and relative L2 distance, and the feature's activation when the
SAE encodes each, against the value collect recorded (the context's reproduces it). Also
the window without BOS, to show what the BOS costs.

    .venv/bin/python bench/residual_context.py RUN_DIR [--features 40] [--examples 5] [--seed 0]
Last line: {"bench": "residual_context", "per_layer": {layer: {"cos_median", "cos_p10", "rel_l2_median",
            "act_ratio_window_median", "fires_window", "act_ratio_context_median", "cos_no_bos_median", ...}}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

from baez_ray import schema
from baez_ray.config import ModelConfig, SAEConfig
from baez_ray.models.lm import ResidualReader, load_tokenizer
from baez_ray.models.sae import load_sae
from baez_ray.stages.split import sample_per_sae


def examples(run: Path, per_sae: int, n_examples: int, seed: int) -> list[dict]:
    keys = pq.read_table(run / "features", columns=["sae_id", "feature", "n_firing"])
    keys = keys.filter(np.asarray(keys.column("n_firing").to_numpy()) >= 20).sort_by([("sae_id", "ascending"), ("feature", "ascending")])
    keys = keys.take(sample_per_sae(keys.column("sae_id").to_pylist(), per_sae, seed))
    out = []
    for f in schema.read_keyed(run / "features", keys.select(["sae_id", "feature"])).to_pylist():
        for e in [e for e in f["examples"] if e["kind"] == "top"][:n_examples]:
            out.append({"sae_id": f["sae_id"], "layer": f["layer"], "feature": f["feature"], **e})
    return out


def last(reader: ResidualReader, ids: list[int], layer: int) -> torch.Tensor:
    return reader.residuals(torch.tensor([ids]), until=layer)[layer][0, -1].float()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--features", type=int, default=40, help="features per SAE")
    p.add_argument("--examples", type=int, default=5, help="top examples per feature")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    spec = yaml.safe_load((a.run / "job.yaml").read_text())
    model = ModelConfig(**{**spec["model"], "device": "cpu"})
    saes = {s["id"]: SAEConfig(**s) for s in spec["saes"]}
    torch.set_num_threads(2)
    reader = ResidualReader(model, "cpu", layers=sorted({s.layer for s in saes.values()}))
    bos = load_tokenizer(model).bos_token_id
    encoders = {sid: load_sae(c, "cpu") for sid, c in saes.items()}
    ctx = pq.read_table(a.run / "contexts")
    ctx = dict(zip(ctx.column("context_id").to_pylist(), ctx.column("tokens").to_pylist()))
    rows: dict[int, list[dict]] = {}
    with torch.no_grad():
        for e in examples(a.run, a.features, a.examples, a.seed):
            full = ctx[e["context_id"]][: e["position"] + 1]
            win = list(e["tokens"][: e["top_index"] + 1])
            vc = last(reader, full, e["layer"])
            vw = last(reader, win if win[0] == bos else [bos, *win], e["layer"])
            vn = last(reader, win[1:] if win[0] == bos else win, e["layer"]) if len(win) > 1 else vw
            acts = [float(encoders[e["sae_id"]].encode(v[None])[0, e["feature"]]) for v in (vc, vw)]
            rows.setdefault(e["layer"], []).append({
                "cos": float(torch.nn.functional.cosine_similarity(vc, vw, dim=0)), "rel_l2": float((vc - vw).norm() / vc.norm()),
                "cos_no_bos": float(torch.nn.functional.cosine_similarity(vc, vn, dim=0)), "act_context": acts[0] / e["value"],
                "act_window": acts[1] / e["value"], "same": win == full[-len(win):] and len(win) == len(full)})
    out = {}
    for layer, rs in sorted(rows.items()):
        col = {k: np.asarray([r[k] for r in rs], float) for k in ("cos", "rel_l2", "cos_no_bos", "act_context", "act_window")}
        out[layer] = {"examples": len(rs), "window_is_whole_context": int(sum(r["same"] for r in rs)),
                      "cos_median": round(float(np.median(col["cos"])), 4), "cos_p10": round(float(np.percentile(col["cos"], 10)), 4),
                      "rel_l2_median": round(float(np.median(col["rel_l2"])), 4),
                      "cos_no_bos_median": round(float(np.median(col["cos_no_bos"])), 4),
                      "act_ratio_context_median": round(float(np.median(col["act_context"])), 4),
                      "act_ratio_window_median": round(float(np.median(col["act_window"])), 4),
                      "fires_window": round(float(np.mean(col["act_window"] > 0)), 4)}
        print(f"layer {layer}: {out[layer]}", file=sys.stderr)
    print(json.dumps({"bench": "residual_context", "run": str(a.run), "features_per_sae": a.features, "examples": a.examples,
                      "per_layer": out}))


if __name__ == "__main__":
    main()
