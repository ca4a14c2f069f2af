"""The report's document model: blocks (headings, paragraphs, tables, bullets, code, images) that the
templates render to Markdown and HTML, and the matplotlib setup every plot shares.

    python -c "from pipeline.stages.report.blocks import *; print(render('report.md.j2', {'title': 't', 'note': 'n', 'blocks': [para('hi')]}))"
"""

from __future__ import annotations

import base64
import functools
import html
import io
import re
from collections.abc import Mapping
from typing import Any

import jinja2
from markupsafe import Markup

from pipeline.core.corpus_stats import code_fence

# ---------------------------------------------------------------------------------------
# Document blocks: plain dicts, rendered to Markdown and to HTML by the templates
# ---------------------------------------------------------------------------------------

Block = dict[str, Any]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def heading(level: int, text: str) -> Block:
    return {"kind": "heading", "level": level, "text": text}


def para(text: str) -> Block:
    return {"kind": "para", "text": text}


def table(header: list[str], rows: list[list[Any]]) -> Block:
    return {"kind": "table", "header": header, "rows": [[_cell(c) for c in row] for row in rows]}


def bullets(entries: list[str]) -> Block:
    return {"kind": "bullets", "entries": entries}


def code(text: str, language: str = "python") -> Block:
    """A code excerpt, shown verbatim (fenced in Markdown, <pre> in HTML)."""
    return {"kind": "code", "text": text, "language": language, "fence": code_fence(text)}


def image(name: str, alt: str, png: bytes) -> Block:
    """A plot: `name` in plots/, its bytes for that file and as base64 for the HTML."""
    return {"kind": "image", "name": name, "alt": alt, "png": png, "base64": base64.b64encode(png).decode("ascii")}


# ---------------------------------------------------------------------------------------
# Templates (templates/*.j2)
# ---------------------------------------------------------------------------------------


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def inline_html(text: str) -> Markup:
    """The `inline` filter: the Markdown the report itself writes (code, links, bold) as HTML, the text escaped."""
    s = html.escape(text, quote=False)
    s = _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", s)
    s = _LINK.sub(lambda m: f'<a href="{html.escape(m.group(2))}">{m.group(1)}</a>', s)
    return Markup(_BOLD.sub(lambda m: f"<strong>{m.group(1)}</strong>", s))


@functools.cache
def environment() -> jinja2.Environment:
    """StrictUndefined (a missing context key fails), autoescape for *.html.j2 only."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.stages.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",),
                                            default=True),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["inline"] = inline_html
    return env


def render(template: str, context: Mapping[str, Any]) -> str:
    return environment().get_template(template).render(context)


# ---------------------------------------------------------------------------------------
# Plots (matplotlib, Agg, no metadata: the same data gives the same bytes)
# ---------------------------------------------------------------------------------------


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "report", "path.simplify": False})
    return plt


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
