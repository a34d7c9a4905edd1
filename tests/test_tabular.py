"""The one table renderer (spotdiff.tabular): CSV, markdown, HTML and percentages."""

from __future__ import annotations

import csv
import io

from spotdiff.tabular import csv_text, format_fraction, format_percent, html_table, markdown_table


def test_format_percent_and_fraction():
    assert format_percent(0.87654) == "87.7"
    assert format_percent(0.5, 0.0123) == "50.0 ± 1.2"
    assert format_percent(None) == "-"
    assert format_percent(None, 0.1, missing="–") == "–"
    assert format_fraction(0.5) == "0.500000" and format_fraction(None) == ""


def test_csv_text_quotes_cells_and_writes_none_as_empty():
    text = csv_text(["path", "score"], [["a,b.png", 0.25], ["c", None]])
    assert text == 'path,score\n"a,b.png",0.25\nc,\n'
    assert list(csv.reader(io.StringIO(text))) == [["path", "score"], ["a,b.png", "0.25"], ["c", ""]]


def test_markdown_table_title_alignment_bold_rows_and_notes():
    md = markdown_table(
        ["Method", "pcb1"],
        [["a", "90.0"], ["Mean", "80.0"]],
        [":---", "---:"],
        bold=[False, True],
        title="AU-PR",
        notes=["one seed"],
    )
    assert md == ("**AU-PR**\n\n| Method | pcb1 |\n|:---|---:|\n| a | 90.0 |\n| **Mean** | **80.0** |\n\n- one seed\n")
    assert markdown_table(["x"], [["1"]], ["---"]) == "| x |\n|---|\n| 1 |\n"


def test_html_table_escapes_cells_and_sets_classes():
    page = html_table(["Method", "a<b"], [["x&y", "90.0"]], [["", "num best"]], ["mean"], "T <1>", ["n>0"])
    assert "<th>a&lt;b</th>" in page and "<h3>T &lt;1&gt;</h3>" in page
    assert '<tr class="mean"><td>x&amp;y</td><td class="num best">90.0</td></tr>' in page
    assert page.endswith('</tbody></table></div>\n<p class="caption">n&gt;0</p>')
