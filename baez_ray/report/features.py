"""The features table → report/index.html: firing statistics, a histogram of firing
frequencies (PNG), and the top examples of the most active features with their strongest
tokens highlighted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from baez_ray.report.html import pyplot, render_page, save_figure


def _plot_firing(freq: np.ndarray, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    live = freq[freq > 0]
    if len(live):
        ax.hist(np.log10(live), bins=40, color="#4c72b0")
    ax.set_xlabel("log10 firing frequency (share of tokens)")
    ax.set_ylabel("features")
    ax.set_title(f"{len(live):,} live features, {int((freq == 0).sum()):,} never fired")
    save_figure(fig, path)


def _shown_rows(features_dir: Path, meta, pick: list[int]) -> list[dict]:
    """The rows of the features at positions `pick` of `meta`, read alone: a filter on
    `feature` (Parquet statistics skip the other row groups) and the columns shown, never
    the whole table's examples."""
    keys = set(zip(meta.column("sae_id").take(pick).to_pylist(), meta.column("feature").take(pick).to_pylist()))
    if not keys:
        return []
    cols = ["sae_id", "feature", "n_firing", "max_activation", "examples"]
    from baez_ray.schema import key_table, read_keyed

    rows = read_keyed(features_dir, key_table(sorted(keys)), cols).to_pylist()  # the rows shown only become Python objects
    return sorted(rows, key=lambda r: -r["n_firing"])


def write_features_report(run_dir: str | Path, n_show: int = 25, n_examples: int = 5, name: str = "index.html") -> Path:
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    meta = pq.read_table(run_dir / "features", columns=["sae_id", "feature", "n_tokens", "n_firing", "max_activation"])
    n_tok = meta.column("n_tokens").to_numpy()
    freq = meta.column("n_firing").to_numpy() / np.maximum(n_tok, 1)
    _plot_firing(freq, out / "firing.png")
    # the features shown: the most frequently firing ones, then a spread of rarer ones
    order = np.argsort(-freq, kind="stable")
    live = order[freq[order] > 0]
    pick = sorted(set(live[: n_show // 2].tolist() + live[:: max(1, len(live) // max(1, n_show - n_show // 2))][: n_show - n_show // 2].tolist()))
    rows = _shown_rows(run_dir / "features", meta, pick)
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").exists() else {}
    stage = manifest.get("stages", {}).get("collect", {})
    facts = [
        ("SAE", ", ".join(sorted(set(meta.column("sae_id").to_pylist())))),
        ("features", f"{meta.num_rows:,}"),
        ("tokens", f"{int(n_tok.max()) if len(n_tok) else 0:,}"),
        ("features that fired", f"{int((freq > 0).sum()):,} ({100 * (freq > 0).mean():.1f}%)"),
        ("median firing frequency (live)", f"{np.median(freq[freq > 0]):.2e}" if (freq > 0).any() else "-"),
        ("collect seconds", f"{stage.get('seconds', '-')}"),
    ]
    for r in rows:
        r["top"] = [e for e in r["examples"] if e["kind"] == "top"][:n_examples]
    return render_page("features.html.j2", out / name, name=manifest.get("name", run_dir.name), facts=facts, rows=rows,
                       n_live=len(live), n_features=meta.num_rows, n_most=min(n_show // 2, len(live)))
