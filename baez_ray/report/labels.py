"""The `label` job's report: routing (tier shares, score histograms, tokens saved), the
scores of the sample, the labels with their tier, method and cost (failures as failures,
labels shared by several features marked), and the features section of collect."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from baez_ray.report.html import duplicates, label_key, label_sharing, render_page

N_SHOWN = 200  # labels shown (all are in labels/)


def label_rows(labels: list[dict]) -> list[dict]:
    """The labels by tier, then SAE and feature, each with the number of features sharing its label
    (`shared`) and what stands in for a missing label (`missing`: failed, for a human, no
    label): never an error text where a label goes."""
    sharing = label_sharing([(r["sae_id"], r["feature"]) for r in labels], [r["label"] for r in labels])
    return [{**r, "shared": sharing.get(label_key(r["label"]), 1) if r["label"] else 1,
             "missing": "failed" if r["tries"] > 0 else "for a human" if r["tier"] == 3 else "no label"}
            for r in sorted(labels, key=lambda r: (r["tier"] or 9, r["sae_id"], r["feature"]))]


def write_label_report(run_dir: str | Path, n_examples: int = 3) -> Path:
    from baez_ray.report.benchmark import score_failures, scoring_section
    from baez_ray.report.routing import write_routing_report

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = manifest["spec"]
    taus = {k: spec["route"][k] for k in ("tau_in", "tau_out", "tau_cross")}
    routing = write_routing_report(pq.read_table(run_dir / "routes"), out, taus=taus)
    labels = pq.read_table(run_dir / "labels", columns=["sae_id", "feature", "tier", "kind", "method", "label", "error", "tries"]).to_pylist()
    rows = label_rows(labels)
    shown = rows[:N_SHOWN]
    # the examples of the features shown only: a filter on `feature` (Parquet statistics skip the other row groups)
    keep = sorted({r["feature"] for r in shown})
    features = pq.read_table(Path(spec.get("features") or run_dir / "features"), columns=["sae_id", "feature", "examples"],
                             filters=[("feature", "in", keep)]).to_pylist() if keep else []
    examples = {(r["sae_id"], r["feature"]): [e for e in r["examples"] if e["kind"] == "top"][:n_examples] for r in features}
    shown = [{**r, "examples": examples.get((r["sae_id"], r["feature"]), [])} for r in shown]
    st = manifest["stages"].get("label", {})
    n_failed = sum(1 for r in labels if r["label"] is None and r["tries"] > 0)
    n_backend = st.get("backend_failed", 0)
    failures = [f"{n_backend:,} failed in the LLM backend", f"{n_failed - n_backend:,} answers could not be parsed",
                "their errors are in the error column and in labels/"] if n_failed else []
    failures += score_failures(manifest)
    facts = [("features labelled", f"{st.get('labelled', 0):,} of {st.get('features', 0):,} ({st.get('features', 0) - st.get('labelled', 0):,} without a label)"),
             ("failed", f"{n_failed:,}"),
             ("LLM tokens in / out", f"{st.get('input_tokens', 0):,} / {st.get('output_tokens', 0):,}"),
             ("cost (USD)", f"{st.get('cost_usd', 0.0):.4f}")]
    return render_page("labels.html.j2", out / "index.html", name=manifest["name"], n_failed=n_failed, n_labels=len(labels),
                       failures=failures, retry=n_backend > 0, facts=facts, routing=routing["html"],
                       scoring=scoring_section(run_dir, out, spec.get("seed", 0)), labels=shown, duplicates=duplicates(rows),
                       features_link=(out / "features.html").exists())
