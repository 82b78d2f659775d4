"""HTML pieces of the demo's report (``saeflow.report``): the style sheet, escaping, inlined
PNGs, tables and number formats."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:13px} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} td.l,th.l{text-align:left} img{max-width:100%} .muted{color:#666;font-size:13px}
.gen{display:grid;grid-template-columns:140px 1fr;gap:2px 12px;font-size:13px;margin:.5em 0 1.2em}
.gen div:nth-child(odd){color:#555;font-weight:600}
.svg{overflow-x:auto;border:1px solid #eee} .svg svg{max-width:none;height:auto}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""


def escape(x) -> str:
    return html.escape(str(x))


def image(path: Path, alt: str) -> str:
    if not path.exists():
        return f'<p class="muted">({escape(alt)}: not produced)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def table(header: list[str], rows: list[list], left: int = 1) -> str:
    def cell(i, v, tag):
        cls = ' class="l"' if i < left else ""
        if isinstance(v, float):
            v = f"{v:.3f}"
        return f"<{tag}{cls}>{escape(v)}</{tag}>"
    head = "".join(cell(i, h, "th") for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell(i, v, "td") for i, v in enumerate(r)) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def num(x, digits: int = 3) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def signed(x, se) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:+.3f}" + (f" ± {se:.3f}" if se is not None and se == se else "")
