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


def count(x) -> str:
    """A count or token figure with thousands separators, no decimals; '–' for a missing one."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}"


def usd(x) -> str:
    """Dollars: cents above $1, three significant digits below (a price per feature); '–'
    for a missing amount."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"${x:,.2f}" if abs(x) >= 1 or x == 0 else f"${x:.3g}"


def highlight(tokens: list[str], acts: list[float], frac: float = 0.6) -> Markup:
    """Tokens as HTML, those at >= frac × the example's max in <mark>."""
    peak = max(acts) if acts else 0.0
    return Markup("").join(Markup("<mark title='{:.3g}'>{}</mark>").format(a, t) if peak > 0 and a >= frac * peak else escape(t)
                           for t, a in zip(tokens, acts))


def breakable(name) -> Markup:
    """A method or benchmark name that may wrap after its underscores (eleuther_acts_top5),
    so that a narrow column does not push a table past the page."""
    return Markup(str(escape(name)).replace("_", "_<wbr>"))


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("baez_ray.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=fmt, pct=pct, highlight=highlight, name=breakable, count=count, usd=usd)
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


SMALL_N = 3  # a mean over fewer features is drawn hollow, its n written above it


def draw_bars(ax, x, means, lows, highs, ns, width: float, color, hatch: str | None = None) -> list[int]:
    """Bars of `means` at `x` with their 95% CI (`lows`, `highs`) as error bars; a mean
    over fewer than SMALL_N features (`ns`) is drawn hollow (its outline only), without an
    error bar (a CI of one or two values says nothing), and its n is written above it.
    Returns the indices drawn hollow. A NaN mean draws nothing."""
    hollow = []
    for i, (xi, m, lo, hi, n) in enumerate(zip(x, means, lows, highs, ns)):
        if m is None or not math.isfinite(m):
            continue
        small = n < SMALL_N
        err = None if small or not (math.isfinite(lo) and math.isfinite(hi)) else [[max(0.0, m - lo)], [max(0.0, hi - m)]]
        ax.bar(xi, m, width, yerr=err, capsize=3, facecolor="none" if small else color, edgecolor=color,
               linewidth=1.6 if small else 0.0, hatch=hatch)
        if small:
            hollow.append(i)
            ax.annotate(f"n={n}", (xi, m), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
    return hollow


def bar_legend(ax, entries: list[tuple[str, object, str | None]], chance: float | None = None, **kw) -> None:
    """A legend of filled patches (label, color, hatch), whatever the first bar looked
    like, the hollow bar's meaning, and the chance line when there is one."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor=c, hatch=h, label=lab) for lab, c, h in entries]
    handles.append(Patch(facecolor="none", edgecolor="#555555", linewidth=1.6, label=f"fewer than {SMALL_N} features"))
    if chance is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1, label="chance"))
    ax.legend(handles=handles, **kw)


def method_colors(methods: list[str], control: str = "random_label") -> dict[str, tuple | str]:
    """A color per method (tab10 in the order given), the random-label control grey."""
    cmap = pyplot().get_cmap("tab10")
    return {m: "#999999" if m == control else cmap(j % 10) for j, m in enumerate(methods)}


def n_col(summary) -> str:
    """A summary's count of the features behind each mean (`n_scored`; `n_features` in
    summaries written before it)."""
    return "n_scored" if "n_scored" in summary else "n_features"
