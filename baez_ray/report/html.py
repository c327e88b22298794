"""What every report page shares: the Jinja2 environment that renders the pages from the
templates in `report/templates/` (autoescaped; the page layout and style are in
`base.html.j2`, the shared pieces in `macros.html.j2`), matplotlib on the Agg backend,
saving figures as PNG, and the count of features sharing each label (pyarrow aggregates:
no Python object per row).

Every figure is at most FIGURE_WIDTH_IN × dpi = 1,100 px wide, and the style scales images
and scrolls long or wide tables inside a box, so that every page fits 1,200 px."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from markupsafe import Markup, escape

DPI = 110
FIGURE_WIDTH_IN = 10.0  # 1,100 px at DPI


def fmt(x, digits: int = 3) -> str:
    """A number with `digits` decimals; '–' for a missing one (None, NaN)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def pct(x) -> str:
    """A share as a whole percentage; '–' for a missing one."""
    return fmt(x) if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def highlight(tokens: list[str], acts: list[float], frac: float = 0.6) -> Markup:
    """Tokens as HTML, those at >= frac × the example's max in <mark>."""
    peak = max(acts) if acts else 0.0
    return Markup("").join(Markup("<mark title='{:.3g}'>{}</mark>").format(a, t) if peak > 0 and a >= frac * peak else escape(t)
                           for t, a in zip(tokens, acts))


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("baez_ray.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, pct=pct, highlight=highlight)
    return env


def render_page(template: str, path: str | Path, **context) -> Path:
    """Render `template` with `context` into the file `path`."""
    path = Path(path)
    path.write_text(environment().get_template(template).render(**context), encoding="utf-8")
    return path


def section(name: str, *args) -> Markup:
    """An HTML fragment: the macro `name` of sections.html.j2 called with `args`."""
    return Markup(getattr(environment().get_template("sections.html.j2").module, name)(*args))


def label_keys(labels: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """Each label with its whitespace runs made one space and lower-cased: labels that differ
    only there are the same label. Null stays null."""
    return pc.utf8_lower(pc.binary_join(pc.utf8_split_whitespace(labels), " "))


def label_shared(sae_id, feature, label) -> np.ndarray:
    """Per row of the parallel columns `sae_id`, `feature`, `label` (pyarrow arrays): how
    many distinct features carry its label (`label_keys`), 1 for a row without a label or
    whose label no other feature carries. A pyarrow group-by and a join: no Python object
    per row."""
    keys = label_keys(label)
    n = len(keys)
    rows = pa.table({"key": keys, "sae_id": sae_id, "feature": feature})
    rows = rows.filter(pc.and_(pc.is_valid(keys), pc.not_equal(keys, "")))
    per_key = rows.group_by(["key", "sae_id", "feature"]).aggregate([]).group_by("key").aggregate([("feature", "count")])
    joined = pa.table({"key": keys, "row": pa.array(np.arange(n))}).join(per_key, "key", join_type="left outer")
    joined = joined.sort_by("row")
    return pc.fill_null(joined.column("feature_count"), 1).to_numpy() if n else np.ones(0, np.int64)


def duplicates(label, shared: np.ndarray) -> dict[str, int]:
    """Of the rows with `label` and `shared` (label_shared): how many carry a label another
    feature carries too (`rows`), and how many distinct such labels (`texts`)."""
    dup = pa.array(np.asarray(shared) > 1)
    keys = label_keys(label).filter(dup) if len(shared) else pa.array([], pa.string())
    return {"rows": len(keys), "texts": len(pc.unique(keys))}


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """The figure as PNG, at most FIGURE_WIDTH_IN wide (a wider one is narrowed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = fig.get_size_inches()
    fig.set_size_inches(min(w, FIGURE_WIDTH_IN), h)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path
