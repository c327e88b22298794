"""What every report page shares: the Jinja2 environment that renders the pages from the
templates in `report/templates/` (autoescaped; the page layout and style are in
`base.html.j2`, the shared pieces in `macros.html.j2`), matplotlib on the Agg backend,
saving figures as PNG, and the count of features sharing each label.

Every figure is at most FIGURE_WIDTH_IN × dpi = 1,100 px wide, and the style scales images
and scrolls long or wide tables inside a box, so that every page fits 1,200 px."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jinja2
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


def label_sharing(features, labels) -> dict[str, int]:
    """How many distinct features carry each label (whitespace and case ignored): label key →
    count, for the labels that more than one feature carries. `features`, `labels`: the
    parallel columns of the rows that have a label."""
    seen: dict[str, set] = {}
    for f, lab in zip(features, labels):
        if isinstance(lab, str) and lab:
            seen.setdefault(label_key(lab), set()).add(f)
    return {k: len(v) for k, v in seen.items() if len(v) > 1}


def label_key(label: str) -> str:
    return " ".join(label.split()).casefold()


def duplicates(rows: list[dict]) -> dict[str, int]:
    """Of rows with `label` and `shared` (the features carrying that label): how many carry
    a label another feature carries too (`rows`), and how many distinct such labels (`texts`)."""
    dup = [r for r in rows if r["shared"] > 1]
    return {"rows": len(dup), "texts": len({label_key(r["label"]) for r in dup})}


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
