"""The `label` job's report: routing (tier shares, score histograms, tokens saved), the
scores of the sample, the labels with their tier, method and cost (failures as failures,
labels shared by several features marked), and the features section of collect.

Every table is read as the columns a section needs and counted with pyarrow; only the
labels shown (N_SHOWN) become Python rows, and only their features' examples are read."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from markupsafe import Markup

from baez_ray.report.html import duplicates, label_shared, render_page
from baez_ray.schema import NOT_ROUTED_KIND, key_table, read_keyed

N_SHOWN = 200  # labels shown (all are in labels/)
COLUMNS = ["sae_id", "feature", "tier", "kind", "method", "label", "error", "tries"]


def label_rows(labels: pa.Table, n: int = N_SHOWN) -> tuple[list[dict], dict[str, int]]:
    """The first `n` labels by tier, then SAE and feature, each with the number of features
    sharing its label (`shared`) and what stands in for a missing label (`missing`: failed,
    for a human, no label): never an error text where a label goes; and the duplicates
    among all the labels. Sorting, counting and sharing are pyarrow over the columns: only
    the rows shown become Python objects."""
    shared = label_shared(labels.column("sae_id"), labels.column("feature"), labels.column("label"))
    order = pc.sort_indices(pa.table({"tier": pc.fill_null(labels.column("tier"), 9), "sae_id": labels.column("sae_id"),
                                      "feature": labels.column("feature")}),
                            sort_keys=[("tier", "ascending"), ("sae_id", "ascending"), ("feature", "ascending")])
    top = order[:n]
    rows = labels.take(top).append_column("shared", pa.array(shared).take(top)).to_pylist() if len(top) else []
    rows = [{**r, "shared": r["shared"] if r["label"] else 1,
             "missing": "failed" if r["tries"] > 0 else "for a human" if r["tier"] == 3 else "no label"} for r in rows]
    return rows, duplicates(labels.column("label"), shared)


def routed(routes: pa.Table) -> bool:
    """Whether a label job routed its features (false: `label.route: false`, kind not_routed)."""
    return routes.num_rows == 0 or not pc.all(pc.equal(routes.column("kind"), NOT_ROUTED_KIND)).as_py()


def not_routed_html(routes: pa.Table, spec: dict) -> Markup:
    """The routing section of a job without routing: what labelled every feature."""
    label = spec.get("label") or {}
    method = label.get("method") or label.get("tier2") or "eleuther_acts_top5"
    fired = int(pc.sum(pc.greater(routes.column("n_examples"), 0)).as_py() or 0)
    return Markup("<h2>Routing</h2>\n<p>Not routed (<code>label.route: false</code>): the {:,} features that fired were all labelled "
                  "with <code>{}</code>; no routing scores, no tiers.</p>\n").format(fired, method)


def write_label_report(run_dir: str | Path, n_examples: int = 3) -> Path:
    from baez_ray.report.benchmark import score_failures, scoring_section
    from baez_ray.report.routing import read_routes, write_routing_report

    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    spec = manifest["spec"]
    taus = {k: spec["route"][k] for k in ("tau_in", "tau_out", "tau_cross")}
    routes = read_routes(run_dir / "routes")
    routing = write_routing_report(routes, out, taus=taus) if routed(routes) else {"html": not_routed_html(routes, spec)}
    labels = pq.read_table(run_dir / "labels", columns=COLUMNS)
    shown, dups = label_rows(labels)
    # the examples of the features shown only (`read_keyed`: Parquet statistics skip the other
    # row groups); the rows shown become Python objects, not the rest of the row groups read
    wanted = sorted({(r["sae_id"], r["feature"]) for r in shown})
    features = read_keyed(Path(spec.get("features") or run_dir / "features"), key_table(wanted),
                          ["sae_id", "feature", "examples"]).to_pylist() if wanted else []
    examples = {(r["sae_id"], r["feature"]): [e for e in r["examples"] if e["kind"] == "top"][:n_examples] for r in features}
    shown = [{**r, "examples": examples.get((r["sae_id"], r["feature"]), [])} for r in shown]
    n_failed = int(pc.sum(pc.and_(pc.is_null(labels.column("label")), pc.greater(labels.column("tries"), 0))).as_py() or 0)
    st = manifest["stages"].get("label", {})
    n_backend = st.get("backend_failed", 0)
    failures = [f"{n_backend:,} failed in the LLM backend", f"{n_failed - n_backend:,} answers could not be parsed",
                "their errors are in the error column and in labels/"] if n_failed else []
    failures += score_failures(manifest)
    facts = [("features labelled", f"{st.get('labelled', 0):,} of {st.get('features', 0):,} ({st.get('features', 0) - st.get('labelled', 0):,} without a label)"),
             ("failed", f"{n_failed:,}"),
             ("LLM tokens in / out", f"{st.get('input_tokens', 0):,} / {st.get('output_tokens', 0):,}"),
             ("cost (USD)", f"{st.get('cost_usd', 0.0):.4f}")]
    return render_page("labels.html.j2", out / "index.html", name=manifest["name"], n_failed=n_failed, n_labels=labels.num_rows,
                       failures=failures, retry=n_backend > 0, facts=facts, routing=routing["html"],
                       scoring=scoring_section(run_dir, out, spec.get("seed", 0)), labels=shown, duplicates=dups,
                       features_link=(out / "features.html").exists())
