"""The report pages from real Parquet tables (rundir.write_table), rendered from the Jinja2
templates: the per-feature table has a row per feature × method that exists, features that
never fired are a class of their own, labels shared by several features are flagged, the
failure banners, every page at most 1,200 px wide in headless chromium, and the templates
in a wheel built from the source tree."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from baez_ray import schema
from baez_ray.rundir import write_table

ROOT = Path(__file__).resolve().parents[1]
TAUS = {"tau_in": 0.5, "tau_out": 0.5, "tau_cross": 0.4}
LONG = "unbroken" * 60  # 480 characters without a space: a page must wrap or scroll it


def example(rank: int, word: str) -> dict:
    tokens = ["The", " quick", f" {word}", " jumps", " over", " the", " lazy", " dog"]
    return {"kind": "top", "rank": rank, "value": 3.0 - rank, "top_index": 2, "token_strs": tokens,
            "acts": [0.0, 0.1, 3.0 - rank, 0.2, 0.0, 0.0, 0.0, 0.0]}


def features_table(n_live: int = 5) -> pa.Table:
    """n_live features that fired (feature 2's examples carry a 480-character token) and one
    that never did."""
    rows = [{"sae_id": "s", "model_id": "m", "layer": 0, "feature": f, "n_tokens": 1000, "n_firing": 10 * (f + 1),
             "max_activation": 3.0, "examples": [example(r, LONG if f == 2 else f"w{f}") for r in range(3)]} for f in range(n_live)]
    rows.append({"sae_id": "s", "model_id": "m", "layer": 0, "feature": n_live, "n_tokens": 1000, "n_firing": 0,
                 "max_activation": 0.0, "examples": []})
    return schema.conform(pa.Table.from_pylist(rows), schema.FEATURES)


def routes_table() -> pa.Table:
    """Features 0–4 fired (tiers 1, 1, 2, 3, 2); feature 5 never fired: no example, no score,
    routed to tier 3 as the route stage does."""
    tiers = [(1, "input", 0.8, 0.1, None), (1, "output", 0.1, 0.9, None), (2, "cross", 0.1, 0.2, 0.6),
             (3, "obscure", 0.1, 0.1, 0.1), (2, "cross", 0.2, 0.1, 0.5), (3, "obscure", None, None, None)]
    rows = [{"sae_id": "s", "layer": 0, "feature": f, "n_examples": 0 if f == 5 else 3, "c_in": ci, "c_out": co, "c_cross": cc,
             "tier": t, "kind": k} for f, (t, k, ci, co, cc) in enumerate(tiers)]
    return schema.conform(pa.Table.from_pylist(rows), schema.ROUTES)


def write_manifest(run_dir: Path, manifest: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def label_run(tmp_path_factory) -> Path:
    """A label run's tables: features, routes, labels (two features share a label up to case
    and spaces, one failed in the backend, one left for a human, one label 480 characters
    without a space)."""
    d = tmp_path_factory.mktemp("label") / "run"
    write_manifest(d, {"job": "label", "name": "label-run", "spec": {"route": TAUS, "seed": 0},
                       "stages": {"label": {"features": 5, "labelled": 3, "failed": 2, "backend_failed": 1, "input_tokens": 900,
                                            "output_tokens": 80, "cost_usd": 0.01}}})
    write_table(features_table(), d / "features")
    write_table(routes_table(), d / "routes")
    labels = [("token_freq", "the word cat", 1, None), ("token_freq", "The word  cat", 1, None), ("eleuther_acts_topK", LONG, 1, None),
              ("manual", None, 0, "tier 3: flagged for manual labelling (no AV configured)"),
              ("eleuther_acts_topK", None, 3, "HTTP 529 Overloaded")]
    tiers = [1, 1, 2, 3, 2]
    rows = [{"sae_id": "s", "layer": 0, "feature": f, "method": m, "label": lab, "tier": tiers[f], "n_examples": 3, "input_tokens": 0,
             "output_tokens": 0, "cost_usd": 0.0, "tries": tries, "error": err} for f, (m, lab, tries, err) in enumerate(labels)]
    write_table(schema.conform(pa.Table.from_pylist(rows), schema.LABELS), d / "labels")
    from baez_ray.report.features import write_features_report
    from baez_ray.report.labels import write_label_report

    write_features_report(d, name="features.html")
    write_label_report(d)
    return d


SCORED = {"A": [0, 1, 2, 3], "B": [0, 1], "random_label": [0, 1, 2, 3]}  # (method → features) that have scores
FAILED = {"B": [2]}  # B's label of feature 2 failed; B has no row at all for feature 3


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory) -> Path:
    """A benchmark run's tables: labels of methods A and B (A gives features 0 and 1 the same
    label), scores of the rows in SCORED on three benchmarks, routes with a dead feature."""
    d = tmp_path_factory.mktemp("bench") / "run"
    write_manifest(d, {"job": "benchmark", "name": "bench-run", "spec": {
        "seed": 0, "route": TAUS, "benchmark": {"methods": ["A", "B"], "explainer": {"model": "m"}, "train_examples": 5,
                                                "score": {"test_examples": 10}, "compare": ["A", "A"]}},
        "stages": {"split": {"sampled": 4, "eligible": 4, "min_examples": 3, "split": "top"},
                   "label:A": {"labelled": 4, "failed": 0}, "label:B": {"labelled": 2, "failed": 1},
                   "score": {"prompts": 60, "failed_prompts": 2, "rows": 30}}})
    write_table(routes_table(), d / "routes")
    label_of = {("A", 0): "dogs", ("A", 1): "Dogs", ("A", 2): "cats", ("A", 3): LONG, ("B", 0): "a dog", ("B", 1): "a cat"}
    labels = [{"sae_id": "s", "layer": 0, "feature": f, "method": m, "label": label_of.get((m, f)), "n_examples": 5, "input_tokens": 0,
               "output_tokens": 0, "cost_usd": 0.0, "tries": 1 if (m, f) in label_of else 3,
               "error": None if (m, f) in label_of else "boom: Overloaded"}
              for m, fs in (("A", SCORED["A"]), ("B", SCORED["B"] + FAILED["B"])) for f in fs]
    write_table(schema.conform(pa.Table.from_pylist(labels), schema.LABELS), d / "labels")
    scores = []
    for m, fs in SCORED.items():
        for f in fs:
            good = 0.9 if m == "A" else 0.7 if m == "B" else 0.5
            for bench in ("detection", "fuzz", "embedding"):
                metric = "auroc" if bench == "embedding" else "balanced_accuracy"  # every row has both keys: from_pylist reads the first
                value = good - 0.02 * f
                scores.append({"sae_id": "s", "layer": 0, "feature": f, "method": m, "benchmark": bench,
                               "label": label_of.get((m, f), "cats"), "n_shown": 20, "n_failed": 2 if f == 0 else 0,
                               "balanced_accuracy": None if metric == "auroc" else value, "auroc": value if metric == "auroc" else None, "gap": good - 0.5, "score_half_a": good - 0.02 * f, "score_half_b": good - 0.03 * f,
                               "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
    write_table(schema.conform(pa.Table.from_pylist(scores), schema.SCORES), d / "scores")
    from baez_ray.report.benchmark import write_benchmark_report

    write_benchmark_report(d)
    return d


def text(path: Path) -> str:
    """A page with every run of whitespace one space."""
    return " ".join(path.read_text().split())


def table_rows(page: str, css_class: str) -> list[str]:
    """The body rows (<tr> after the header) of the table of `css_class`."""
    table = page.split(f"<table class={css_class}>", 1)[1].split("</table>", 1)[0]
    return table.split("<tr>")[2:]


# ------------------------------------------------------------------ per feature × method
def test_per_feature_rows_are_the_features_times_methods_that_exist(benchmark_run):
    page = text(benchmark_run / "report" / "index.html")
    rows = table_rows(page, "perfeature")
    got = sorted((int(re.search(r"<td>(\d+)</td><td>([^<]+)</td>", r).group(1)), re.search(r"<td>(\d+)</td><td>([^<]+)</td>", r).group(2))
                 for r in rows)
    scores = pq.read_table(benchmark_run / "scores", columns=["feature", "method"]).to_pylist()
    want = sorted({(r["feature"], r["method"]) for r in scores} | {(f, m) for m, fs in FAILED.items() for f in fs})
    assert got == want and len(got) == 11  # a product of the 4 features and 3 methods would be 12
    failed_row = next(r for r in rows if "<td>2</td><td>B</td>" in r)
    assert "<span class=failed>failed</span>" in failed_row and "Overloaded" not in failed_row
    # the headline metric per benchmark: A on feature 1 is 0.88 on all three
    a1 = next(r for r in rows if "<td>1</td><td>A</td>" in r)
    assert a1.count("<td class=num>0.88</td>") == 3


def test_per_feature_rows_scale_with_the_rows_not_the_product():
    """10,000 features × 2 methods, each feature scored by one method only: 10,000 rows."""
    import pandas as pd

    from baez_ray.report.benchmark import per_feature_rows

    n = 10_000
    scores = pd.DataFrame({"sae_id": "s", "feature": range(n), "method": ["A", "B"] * (n // 2), "benchmark": "detection",
                           "label": [f"l{i}" for i in range(n)], "balanced_accuracy": 0.7, "auroc": None})
    rows = per_feature_rows(scores)
    assert len(rows) == n and {r["method"] for r in rows} == {"A", "B"} and all(r["values"] == [0.7] for r in rows)


# ------------------------------------------------------------------ never fired
def test_never_fired_is_its_own_class():
    from baez_ray.report.routing import tier_shares, tokens_saved

    routes = routes_table()
    overall = tier_shares(routes, None).iloc[0]
    assert overall["n"] == 5 and overall["never_fired"] == 1
    assert overall["tier3"] == pytest.approx(1 / 5) and overall["obscure"] == pytest.approx(1 / 5)  # the dead one is not obscure
    assert overall["tier1"] + overall["tier2"] + overall["tier3"] == pytest.approx(1.0)
    saved = tokens_saved(routes, 1000.0)
    # the baseline labels the 5 features that fired, not the dead one; tier 2 (2 features) is spent
    assert (saved["features"], saved["never_fired"], saved["baseline_tokens"], saved["saved_tokens"]) == (5, 1, 5000.0, 3000.0)


def test_routing_section_shows_never_fired_apart(label_run):
    page = text(label_run / "report" / "index.html")
    assert "5 features that fired: tier 1 40%, tier 2 40%, tier 3 20%" in page
    assert "1 more <b>never fired</b> (no example): a class of their own, left out of the shares and of the tokens saved. Estimated" in page
    routing = json.loads((label_run / "report" / "routing.json").read_text())
    assert routing["per_layer"][0]["never_fired"] == 1 and routing["tokens"]["never_fired"] == 1
    assert table_rows(page, "tiers")[0].count("<td class=num>") == 9


# ------------------------------------------------------------------ duplicates and banners
def test_labels_table_flags_shared_labels_and_failures(label_run):
    page = text(label_run / "report" / "index.html")
    assert "<b>2 labels are duplicates</b>: 1 distinct label(s)" in page
    rows = table_rows(page, "labels")
    label_cells = [r.split("<td>")[6] for r in rows]  # SAE, feature, tier, kind, method, label
    assert sum("<span class=dup" in c and "×2</span>" in c for c in label_cells) == 2
    assert sum("<span class=failed>failed</span>" in c for c in label_cells) == 1
    assert sum("<i>for a human</i>" in c for c in label_cells) == 1
    assert not any("Overloaded" in c or "manual labelling" in c for c in label_cells)  # errors have their own column
    assert "class=banner" in page and "1 of 5 features failed" in page and "1 failed in the LLM backend" in page
    assert "Rerun the same command to retry only those" in page


def test_label_report_banner_counts_a_scoring_that_scored_nothing(label_run, tmp_path):
    from baez_ray.report.labels import write_label_report

    d = tmp_path / "run"
    shutil.copytree(label_run, d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["stages"]["score"] = {"prompts": 0, "failed_prompts": 0, "rows": 0}
    (d / "manifest.json").write_text(json.dumps(manifest))
    write_table(schema.SCORES.empty_table(), d / "scores")
    page = text(write_label_report(d))
    banner = page.split("<div class=banner>", 1)[1].split("</div>", 1)[0]
    assert "1 of 5 features failed" in banner and "scoring: no label was scored" in banner
    assert "<h2>Scores</h2> <p>No label was scored.</p>" in page


def test_benchmark_report_failure_banner_and_duplicates(benchmark_run):
    page = text(benchmark_run / "report" / "index.html")
    banner = page.split("<div class=banner>", 1)[1].split("</div>", 1)[0]
    assert "B: 1 of 3 features got no label; they are not scored" in banner
    assert "scoring: 2 of 60 scorer prompts failed after their retries" in banner
    assert page.index("<div class=banner>") < page.index("<table class=verdict>")
    # A gave features 0 and 1 the same label ("dogs", "Dogs"); the control reuses labels by design and is not flagged
    assert "<b>2 labels are duplicates</b>: 1 distinct label(s)" in page
    flagged = [r for r in table_rows(page, "perfeature") if "<span class=dup" in r]
    assert len(flagged) == 2 and all("<td>A</td>" in r for r in flagged)


def test_benchmark_report_without_failures_has_no_banner(benchmark_run, tmp_path):
    from baez_ray.report.benchmark import write_benchmark_report

    d = tmp_path / "run"
    shutil.copytree(benchmark_run, d)
    labels = pq.read_table(d / "labels").to_pandas()
    write_table(schema.conform(pa.Table.from_pandas(labels[labels["label"].notna()], preserve_index=False), schema.LABELS), d / "labels")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["stages"]["score"]["failed_prompts"] = 0
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert "class=banner" not in write_benchmark_report(d).read_text()


def test_features_report_says_which_features_it_shows(label_run):
    page = text(label_run / "report" / "features.html")
    assert "5 of the 6 features fired; this page shows all of them, most frequent first." in page
    assert "<mark title='3'> w0</mark>" in page
    from baez_ray.report.features import write_features_report

    page = " ".join(write_features_report(label_run, n_show=3, name="few.html").read_text().split())
    assert "5 of the 6 features fired; this page shows 2 of them: the 1 that fired most often, and 1 more spread evenly over the rarer ones, most frequent first. Features that never" in page


def test_templates_escape_what_they_show(tmp_path):
    from baez_ray.report.html import render_page

    page = render_page("labels.html.j2", tmp_path / "x.html", name="<script>alert(1)</script>", n_failed=0, n_labels=0, failures=[],
                       retry=False, facts=[("a<b", "c&d")], routing="", scoring="", labels=[], duplicates={"rows": 0, "texts": 0},
                       features_link=False).read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "a&lt;b" in page and "c&amp;d" in page


# ------------------------------------------------------------------ 1,200 px in a browser
def test_every_page_fits_1200_px(label_run, benchmark_run):
    """Each page opened in Debian's chromium at a 1,200 px wide window: the document is no
    wider than the window (figures scale, long tables scroll in their box)."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("chromium is not installed (apt-get install chromium): the page width cannot be measured")
    from playwright.sync_api import sync_playwright

    pages = [label_run / "report" / "index.html", label_run / "report" / "features.html", benchmark_run / "report" / "index.html"]
    widths, broken = {}, []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        for path in pages:
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            widths[path.parent.parent.name + "/" + path.name] = page.evaluate("document.documentElement.scrollWidth")
            broken += [f"{path.name}: {src}" for src, ok in page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])") if not ok]
        browser.close()
    assert not broken, broken
    assert all(w <= 1200 for w in widths.values()), widths


# ------------------------------------------------------------------ packaging
def test_a_wheel_carries_the_templates(tmp_path):
    """A wheel built from the source tree holds every template (pyproject package-data)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "baez_ray", src / "baez_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("baez_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = {f"baez_ray/report/templates/{p.name}" for p in (ROOT / "baez_ray" / "report" / "templates").glob("*.html.j2")}
    assert len(templates) >= 5 and templates <= names, sorted(templates - names)
