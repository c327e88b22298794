"""What every report page shares: the page style, highlighted examples, matplotlib on the
Agg backend, and saving figures as PNG."""

from __future__ import annotations

import html
from pathlib import Path


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}.ex{font-family:ui-monospace,monospace;font-size:.85em;white-space:pre-wrap}
mark{background:#ffb347}.num{text-align:right}
.banner{background:#fde2e1;border:1px solid #e0a0a0;padding:.6em 1em;margin:1em 0}.failed{color:#a00;font-weight:600}"""


def highlight(tokens: list[str], acts: list[float], frac: float = 0.6) -> str:
    """Tokens as HTML, those at >= frac × the example's max in <mark>."""
    peak = max(acts) if acts else 0.0
    out = []
    for t, a in zip(tokens, acts):
        t = html.escape(t)
        out.append(f"<mark title='{a:.3g}'>{t}</mark>" if peak > 0 and a >= frac * peak else t)
    return "".join(out)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
