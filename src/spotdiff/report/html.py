"""One self-contained HTML report: tables, figures as base64 PNG data URIs, inline CSS.

The page loads nothing from anywhere (no CDN, no external fonts, scripts or images), so it can be
mailed or archived as one file. Build it from :class:`Section` blocks::

    sections = [Section("Results", [table]), Section("Curves", [Figure("pcb", png_bytes)])]
    write_html_report("report.html", "spotdiff demo", sections, intro="...")
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from spotdiff import __version__
from spotdiff.files import write_text_atomic
from spotdiff.report.plots import (
    FEW_IMAGES,
    Predictions,
    curves_figure,
    defect_breakdown_figure,
    gallery_figure,
    per_defect_type_auroc,
)
from spotdiff.report.tables import Table, split_shared_notes
from spotdiff.tabular import html_table

_CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --head:#f6f8fa; --accent:#0969da; }
* { box-sizing: border-box; }
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; background: #fff; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 64px; }
header { border-bottom: 3px solid var(--accent); margin-bottom: 24px; }
h1 { font-size: 28px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 8px; }
p.meta, p.caption { color: var(--muted); font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; font-size: 14px; }
.table-wrap { overflow-x: auto; margin: 8px 0 20px; }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: 4px 10px; }
th { background: var(--head); font-weight: 600; }
td.num { text-align: right; }
td.best { font-weight: 700; color: #1a7f37; }
tr.mean td { background: #eef4ff; font-weight: 600; }
figure { margin: 8px 0 24px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; }
"""


@dataclass(frozen=True)
class Figure:
    """A PNG image (raw bytes) with a heading and an optional caption."""

    title: str
    png: bytes
    caption: str = ""


@dataclass
class Section:
    """A report section: a heading and blocks (tables, figures, paragraphs of plain text)."""

    title: str
    blocks: Sequence[Table | Figure | str] = field(default_factory=list)


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding PNG bytes in an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _best_by_column(table: Table) -> set[tuple[int, int]]:
    """(row, column) cells holding the column maximum among non-mean rows (highlighted in bold)."""
    best: set[tuple[int, int]] = set()
    data_rows = [i for i, r in enumerate(table.rows) if not r.is_mean]
    if len(data_rows) < 2 or len(table.label_columns) != 1:
        return best  # only for "methods as rows" tables
    for j in range(len(table.columns)):
        column = [(table.rows[i].values[j], i) for i in data_rows]
        values = [(v, i) for v, i in column if v is not None]
        if values:
            top = max(v for v, _ in values)
            best.update((i, j) for v, i in values if round(100 * v, 1) == round(100 * top, 1))
    return best


def table_html(table: Table) -> str:
    """One table as HTML (values as percentages with one decimal; column best in bold)."""
    best = _best_by_column(table)
    classes = [
        [""] * len(row.labels) + [f"num{' best' if (i, j) in best else ''}" for j in range(len(row.values))]
        for i, row in enumerate(table.rows)
    ]
    return html_table(
        table.header,
        table.formatted_rows(),
        classes,
        ["mean" if r.is_mean else "" for r in table.rows],
        table.title,
        table.notes,
    )


def figure_html(fig: Figure) -> str:
    caption = f"<figcaption>{html.escape(fig.caption)}</figcaption>" if fig.caption else ""
    return (
        f"<figure><h3>{html.escape(fig.title)}</h3>"
        f'<img alt="{html.escape(fig.title, quote=True)}" src="{data_uri(fig.png)}">{caption}</figure>'
    )


def render_html(title: str, sections: Sequence[Section], intro: str = "") -> str:
    """The whole report page as a string."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{html.escape(title)}</h1>"
        f'<p class="meta">spotdiff {__version__} &middot; generated {stamp} &middot; '
        "values are percentages with one decimal</p></header>",
        f"<nav>{nav}</nav>",
    ]
    if intro:
        parts += [f"<p>{html.escape(p)}</p>" for p in intro.split("\n\n") if p.strip()]
    for section in sections:
        parts.append(f'<section id="{_anchor(section.title)}"><h2>{html.escape(section.title)}</h2>')
        own, shared = split_shared_notes([b for b in section.blocks if isinstance(b, Table)])
        tables = iter(own)
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append(table_html(next(tables)))
            elif isinstance(block, Figure):
                parts.append(figure_html(block))
            else:
                parts.append(f'<p class="caption">{html.escape(str(block))}</p>')
        if shared:  # e.g. the test-set line: once per section, not under each table
            parts.append('<p class="caption"><b>Notes for every table above:</b></p>')
            parts += [f'<p class="caption">{html.escape(n)}</p>' for n in shared]
        parts.append("</section>")
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


def write_html_report(path: str | os.PathLike[str], title: str, sections: Sequence[Section], intro: str = "") -> None:
    """Render and write the report atomically to ``path``."""
    write_text_atomic(path, render_html(title, sections, intro))


def report_sections(
    tables: Sequence[Table], predictions: Sequence[Predictions] = (), gallery_size: int = 8
) -> list[Section]:
    """The standard report: result tables, then (from ``predictions``) per-object PR/ROC curves,
    the per-defect-type breakdown and the gallery of best and worst cases, one figure per object
    (gallery: per object and method)."""
    sections = [Section("Results", list(tables))]
    by_object: dict[str, list[Predictions]] = {}
    for p in predictions:
        by_object.setdefault(p.object, []).append(p)
    if not by_object:
        return sections
    curves = [
        Figure(
            obj,
            curves_figure([p.score_set() for p in preds], title=obj),
            "Image-level curves; the legend gives the area under each curve in %.",
        )
        for obj, preds in by_object.items()
    ]
    sections.append(Section("PR and ROC curves", curves))
    breakdown = []
    for obj, preds in by_object.items():
        per_method = {
            p.method: per_defect_type_auroc(p.scores, p.labels, p.defect_types)
            for p in preds
            if p.defect_types is not None
        }
        counts: dict[str, int] = {}
        for p in preds[:1]:
            for t, label in zip(p.defect_types or [], p.labels, strict=False):
                counts[t] = counts.get(t, 0) + int(label == 1)
        if any(per_method.values()):
            breakdown.append(
                Figure(
                    obj,
                    defect_breakdown_figure(per_method, title=obj, counts=counts or None),
                    "Image AU-ROC of each defect type against all normal test images; n = "
                    f"anomalous test images of the type; grey: fewer than {FEW_IMAGES} images, "
                    "too few for the value to mean much.",
                )
            )
    if breakdown:
        sections.append(Section("Per-defect-type breakdown", breakdown))
    gallery: list[Table | Figure | str] = []
    for obj, preds in by_object.items():
        for p in preds:
            items = p.gallery_items(gallery_size)
            if items:
                gallery.append(
                    Figure(
                        f"{obj} / {p.method}",
                        gallery_figure(
                            items, columns=max(1, -(-gallery_size // 2)), map_range=p.map_range, threshold=p.threshold
                        ),
                    )
                )
    if gallery:
        gallery.insert(
            0,
            "Top row: the highest-scoring defects (anomalous images with the highest scores). "
            "Bottom row: the worst cases, the lowest-scoring defects (the likeliest misses) "
            "alternating with the highest-scoring normal images (the likeliest false alarms). "
            "Each tile says what it is, its score and the decision at the threshold: a defect "
            "is 'caught' or 'missed', a normal image a 'false alarm' or 'passed'; the threshold "
            "is a score above every normal test image (the zero-false-alarm threshold). Heat "
            "map: anomaly map (jet) on the model's one colour scale (colour bar), fixed from its "
            "scores on the normal test images: from their median map value to twice the way up "
            "to their highest image score; green outline: ground-truth defect mask.",
        )
        sections.append(Section("Gallery", gallery))
    return sections
