"""Tables as text: CSV, markdown and HTML from a header and rows of cells; percentages.

The one renderer behind every table spotdiff writes: ``scores.csv`` of ``test``/``predict``,
fine-tuning's ``table.md``/``table.csv``/``aggregate.csv``, the benchmark's and demo's
``results.csv``/``tables.md`` and the tables of the HTML report (:mod:`spotdiff.report.tables`
builds the paper's tables, :mod:`spotdiff.report.html` the page). Callers choose the cells;
these functions only format numbers and lay cells out.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from typing import Any

MISSING = "-"  # a missing value in a table of percentages


def format_percent(value: float | None, std: float | None = None, missing: str = MISSING) -> str:
    """A fraction as a percentage with one decimal (``0.8765`` -> ``"87.7"``; with ``std=0.012``:
    ``"87.7 ± 1.2"``); ``missing`` if the value is missing."""
    if value is None:
        return missing
    return f"{100.0 * value:.1f}" + ("" if std is None else f" ± {100.0 * std:.1f}")


def format_fraction(value: float | None) -> str:
    """A fraction for CSV: six decimals, empty when missing."""
    return "" if value is None else f"{value:.6f}"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV text (``\\n`` line ends): the header row, then ``rows``; None is written as an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def markdown_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    align: Sequence[str],
    bold: Sequence[bool] = (),
    title: str = "",
    notes: Sequence[str] = (),
) -> str:
    """A GitHub-flavoured markdown table of display strings.

    ``align`` holds one separator cell per column (``"---"``, ``":---"``, ``"---:"``); a row whose
    ``bold`` flag is set has every cell in bold; ``title`` (bold) goes above, ``notes`` as a list below.
    """
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for i, cells in enumerate(rows):
        if i < len(bold) and bold[i]:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _class(name: str) -> str:
    return f' class="{name}"' if name else ""


def html_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    cell_classes: Sequence[Sequence[str]],
    row_classes: Sequence[str],
    title: str,
    notes: Sequence[str] = (),
) -> str:
    """A table of display strings as HTML (escaped) under an ``<h3>`` title, notes as captions below.

    ``cell_classes[i][j]`` / ``row_classes[i]`` are CSS classes of cell ``j`` / of row ``i`` (empty: none).
    """
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = [
        f"<tr{_class(row_class)}>"
        + "".join(f"<td{_class(c)}>{html.escape(cell)}</td>" for cell, c in zip(cells, classes, strict=True))
        + "</tr>"
        for cells, classes, row_class in zip(rows, cell_classes, row_classes, strict=True)
    ]
    captions = "".join(f'\n<p class="caption">{html.escape(n)}</p>' for n in notes)
    return (
        f'<h3>{html.escape(title)}</h3>\n<div class="table-wrap"><table>\n'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody></table></div>" + captions
    )
