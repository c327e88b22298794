"""The `label` job's report: routing (tier shares, score histograms, tokens saved), the
labels with their tier, method and cost, and the features section of collect."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pyarrow.parquet as pq

from baez_ray.report.html import STYLE, highlight


def write_label_report(run_dir: str | Path, n_examples: int = 3) -> Path:
    from baez_ray.report.routing import write_routing_report

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = manifest["spec"]
    routes = pq.read_table(run_dir / "routes")
    taus = {k: spec["route"][k] for k in ("tau_in", "tau_out", "tau_cross")}
    routing = write_routing_report(routes, out, taus=taus)
    labels = pq.read_table(run_dir / "labels").to_pylist()
    labels.sort(key=lambda r: (r["tier"] or 9, r["sae_id"], r["feature"]))
    features_dir = Path(spec.get("features") or run_dir / "features")
    shown = {(r["sae_id"], r["feature"]) for r in labels[:200]}
    examples = {(r["sae_id"], r["feature"]): [e for e in r["examples"] if e["kind"] == "top"][:n_examples]
                for r in pq.read_table(features_dir, columns=["sae_id", "feature", "examples"]).to_pylist()
                if (r["sae_id"], r["feature"]) in shown}
    st = manifest["stages"].get("label", {})
    n_failed = sum(1 for r in labels if r["label"] is None and r["tries"] > 0)
    banner = ""
    if n_failed:
        banner = (f"<div class=banner><b>{n_failed:,} of {len(labels):,} features failed</b> "
                  f"({st.get('backend_failed', 0):,} in the LLM backend: rerun the same command to retry only those; "
                  "the others' answers could not be parsed). Their errors are in the <i>error</i> column and in labels/.</div>")
    head = (f"<h1>Labels: {html.escape(manifest['name'])}</h1>{banner}<table>"
            f"<tr><th>features labelled</th><td>{st.get('labelled', 0):,} of {st.get('features', 0):,} ({st.get('failed', 0):,} without a label)</td></tr>"
            f"<tr><th>failed</th><td>{n_failed:,}</td></tr>"
            f"<tr><th>LLM tokens in / out</th><td>{st.get('input_tokens', 0):,} / {st.get('output_tokens', 0):,}</td></tr>"
            f"<tr><th>cost (USD)</th><td>{st.get('cost_usd', 0.0):.4f}</td></tr></table>")
    rows = ["<h2>Labels</h2><table><tr><th>SAE</th><th>feature</th><th>tier</th><th>kind</th><th>method</th><th>label</th><th>error</th><th>top examples</th></tr>"]
    for r in labels[:200]:
        # never an error text in the label column: a failure says so, its text goes to `error`
        label = (html.escape(r["label"]) if r["label"] else "<span class=failed>failed</span>" if r["tries"] > 0
                 else "<i>for a human</i>" if r["tier"] == 3 else "<i>no label</i>")
        err = html.escape(r["error"] or "")
        ex = "<br>".join(f"<span class=ex>{highlight(e['token_strs'], e['acts'])}</span>" for e in examples.get((r["sae_id"], r["feature"]), []))
        rows.append(f"<tr><td>{html.escape(r['sae_id'])}</td><td>{r['feature']}</td><td>{r['tier']}</td><td>{r['kind']}</td><td>{r['method']}</td><td>{label}</td><td>{err}</td><td>{ex}</td></tr>")
    rows.append("</table>")
    if len(labels) > 200:
        rows.append(f"<p>First 200 of {len(labels):,} labels; all are in labels/.</p>")
    from baez_ray.report.benchmark import scoring_section

    scoring = scoring_section(run_dir, out, spec.get("seed", 0))
    features_link = "<p><a href='features.html'>Features: firing statistics and examples</a></p>" if (out / "features.html").exists() else ""
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>baez_ray labels</title><style>{STYLE}</style></head><body>"
            f"{head}{routing['html']}{scoring}{''.join(rows)}{features_link}</body></html>")
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
