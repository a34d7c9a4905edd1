"""Report library: tables (layout, means, formats), figures and the self-contained HTML page."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from spotdiff.errors import ConfigError
from spotdiff.report.html import Figure, Section, render_html, report_sections, write_html_report
from spotdiff.report.plots import (
    Predictions,
    curves_figure,
    defect_breakdown_figure,
    per_defect_type_auroc,
    select_gallery,
)
from spotdiff.report.tables import (
    HEADLINE_METRICS,
    MEAN_LABEL,
    ResultRecord,
    format_percent,
    metric_table,
    object_backbone_table,
    paper_tables,
    records_csv,
)

OBJECTS = ["pcb_synth", "capsules_synth", "cashew_synth"]
METHODS = ["random", "SimSiam", "SimSiam+SPD"]


def make_records(seed: int = 0) -> list[ResultRecord]:
    rng = np.random.default_rng(seed)
    return [
        ResultRecord(obj, method, "padim", {m: float(rng.uniform(0.3, 1.0)) for m in HEADLINE_METRICS})
        for method in METHODS
        for obj in OBJECTS
    ]


def make_predictions(seed: int = 0, n: int = 24, size: int = 32) -> list[Predictions]:
    """Predictions with images, masks and maps for every (object, method)."""
    rng = np.random.default_rng(seed)
    out = []
    for obj in OBJECTS:
        labels = np.array([0] * (n // 2) + [1] * (n // 2))
        types = ["good"] * (n // 2) + [("scratch", "hole")[i % 2] for i in range(n // 2)]
        masks = np.zeros((n, size, size), np.float32)
        masks[labels == 1, 8:16, 10:20] = 1
        images = rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32)
        for method in METHODS:
            scores = labels + rng.normal(0, 0.7, n)
            maps = rng.uniform(0, 1, (n, size // 4, size // 4)).astype(np.float32)
            out.append(Predictions(obj, method, scores, labels, types, maps, masks, images))
    return out


def test_format_percent_one_decimal():
    assert format_percent(0.87654) == "87.7"
    assert format_percent(1.0) == "100.0"
    assert format_percent(None) == "-"


def test_metric_table_layout_and_mean_row_equals_mean_of_objects():
    records = make_records()
    table = metric_table(records, "image_aupr")
    assert table.label_columns == ("Method",)
    assert table.columns == (*OBJECTS, MEAN_LABEL)
    assert [r.labels[0] for r in table.rows] == METHODS
    for row in table.rows:
        method = row.labels[0]
        expected = [
            next(r.metrics["image_aupr"] for r in records if r.method == method and r.object == o) for o in OBJECTS
        ]
        assert row.values[:-1] == pytest.approx(expected)
        assert row.values[-1] == pytest.approx(np.mean(expected))


def test_metric_table_mean_missing_when_an_object_is_missing():
    records = [r for r in make_records() if not (r.method == "SimSiam" and r.object == "cashew_synth")]
    table = metric_table(records, "pixel_aupro")
    row = next(r for r in table.rows if r.labels == ("SimSiam",))
    assert row.values[OBJECTS.index("cashew_synth")] is None and row.values[-1] is None
    assert "| SimSiam |" in table.to_markdown() and " - |" in table.to_markdown()


def test_nan_metric_counts_as_missing():
    records = [ResultRecord("a", "m", "padim", {"image_aupr": float("nan")})]
    assert metric_table(records, "image_aupr").rows[0].values == (None, None)


def test_duplicate_cell_is_an_error():
    records = make_records()
    with pytest.raises(ConfigError, match="two results"):
        metric_table([*records, records[0]], "image_aupr")


def test_paper_tables_aupr_first_and_skip_unmeasured_metrics():
    records = [
        ResultRecord(r.object, r.method, r.downstream, {k: v for k, v in r.metrics.items() if k.startswith("image")})
        for r in make_records()
    ]
    tables = paper_tables(records)
    assert [t.metric for t in tables] == ["image_aupr", "image_auroc"]


def test_markdown_csv_json_hold_every_row():
    table = metric_table(make_records(), "image_auroc")
    md = table.to_markdown()
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + len(METHODS)  # header, alignment, one per method
    assert lines[0] == "| Method | " + " | ".join(OBJECTS) + " | Mean |"
    for row in table.rows:
        assert f"| {row.labels[0]} | " + " | ".join(format_percent(v) for v in row.values) + " |" in md
    rows = list(csv.reader(io.StringIO(table.to_csv())))
    assert rows[0] == ["Method", *OBJECTS, "Mean"] and len(rows) == 1 + len(METHODS)
    assert float(rows[1][1]) == pytest.approx(table.rows[0].values[0], abs=1e-6)
    data = json.loads(json.dumps(table.to_json()))
    assert data["metric"] == "image_auroc" and len(data["rows"]) == len(METHODS)


def test_object_backbone_table_rows_and_per_backbone_means():
    records = make_records()
    table = object_backbone_table(records, backbones=METHODS)
    assert table.label_columns == ("Object", "Backbone")
    assert len(table.columns) == len(HEADLINE_METRICS)
    data_rows = [r for r in table.rows if not r.is_mean]
    mean_rows = [r for r in table.rows if r.is_mean]
    assert len(data_rows) == len(OBJECTS) * len(METHODS)
    assert [r.labels for r in mean_rows] == [(MEAN_LABEL, m) for m in METHODS]
    for mean_row in mean_rows:
        rows = [r for r in data_rows if r.labels[1] == mean_row.labels[1]]
        for j in range(len(HEADLINE_METRICS)):
            assert mean_row.values[j] == pytest.approx(np.mean([r.values[j] for r in rows]))


def test_records_csv_and_roundtrip():
    records = make_records()
    rows = list(csv.DictReader(io.StringIO(records_csv(records))))
    assert len(rows) == len(records)
    assert float(rows[0]["image_aupr"]) == pytest.approx(records[0].metrics["image_aupr"], abs=1e-6)
    assert ResultRecord.from_dict(json.loads(json.dumps(records[0].to_dict()))) == records[0]
    with pytest.raises(ConfigError):
        ResultRecord.from_dict({"object": "a"})


def test_select_gallery_worst_misses_first():
    scores = [0.1, 0.9, 0.5, 0.2, 0.8, 0.3]
    labels = [1, 0, 1, 0, 1, 0]
    # anomalous by ascending score: 0 (0.1), 2 (0.5), 4 (0.8); normal by descending: 1, 5, 3
    assert select_gallery(scores, labels, 6) == [0, 1, 2, 5, 4, 3]
    assert select_gallery(scores, labels, 3) == [0, 1, 2]
    assert select_gallery([0.3, 0.1], [0, 0], 5) == [0, 1]


def test_per_defect_type_auroc():
    scores = [0.0, 0.1, 0.2, 0.9, 0.05, 0.8]
    labels = [0, 0, 0, 1, 1, 1]
    types = ["good", "good", "good", "scratch", "hole", "hole"]
    out = per_defect_type_auroc(scores, labels, types)
    assert out["scratch"] == pytest.approx(1.0)
    # hole: 0.05 beats 1 of 3 normals, 0.8 beats all 3 -> (1 + 3) / 6
    assert out["hole"] == pytest.approx(4 / 6)


def _png_size(png: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(png)).size


def test_figures_are_png_images():
    preds = make_predictions()
    png = curves_figure([p.score_set() for p in preds[:3]], title="pcb")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and min(_png_size(png)) > 100
    png = defect_breakdown_figure({"a": {"x": 0.5, "y": 0.9}, "b": {"x": 0.7}})
    assert min(_png_size(png)) > 100
    # a method with a single class of labels is drawn as n/a, not an error
    single = Predictions("o", "m", np.array([0.1, 0.2]), np.array([0, 0]))
    assert curves_figure([single.score_set()])[:4] == b"\x89PNG"


def test_html_is_self_contained_and_holds_every_row_and_image(tmp_path):
    records = make_records()
    tables = [*paper_tables(records), object_backbone_table(records)]
    preds = make_predictions()
    path = tmp_path / "report.html"
    write_html_report(
        path, "spotdiff test report", report_sections(tables, preds, gallery_size=4), intro="Synthetic records."
    )
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for table in tables:
        for cells in table.formatted_rows():
            pattern = r"<tr[^>]*>" + "".join(rf"<td[^>]*>{re.escape(c)}</td>" for c in cells) + "</tr>"
            assert re.search(pattern, page), cells
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    # curves + breakdown per object, gallery per object and method
    assert len(srcs) == 2 * len(OBJECTS) + len(OBJECTS) * len(METHODS)
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    # nothing loaded from outside the file
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert "<script" not in page and "@import" not in page and "url(" not in page


def test_html_escapes_labels():
    records = [ResultRecord("<obj>", "a&b", "padim", {"image_aupr": 0.5})]
    page = render_html(
        "t", [Section("Results", [metric_table(records, "image_aupr")]), Section("Figs", [Figure("f", b"\x89PNG")])]
    )
    assert "&lt;obj&gt;" in page and "a&amp;b" in page and "<obj>" not in page


def test_report_without_predictions_has_tables_only():
    sections = report_sections(paper_tables(make_records()))
    assert [s.title for s in sections] == ["Results"]


def test_gallery_reads_images_from_paths_at_mask_size(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    masks = np.zeros((4, 16, 16), np.float32)
    masks[2:, 4:8, 4:8] = 1
    preds = Predictions(
        "o",
        "m",
        np.array([0.1, 0.9, 0.2, 0.8]),
        np.array([0, 0, 1, 1]),
        ["good", "good", "dent", "dent"],
        rng.uniform(size=(4, 4, 4)),
        masks,
        paths=paths,
    )
    items = preds.gallery_items(3)
    # the best detection first, then the worst cases: lowest-scoring defect, highest-scoring normal
    assert [(it.kind, it.score) for it in items] == [
        ("highest-scoring defect", 0.8),
        ("lowest-scoring defect", 0.2),
        ("highest-scoring normal", 0.9),
    ]
    assert all(it.image.shape == (16, 16, 3) and 0 <= it.image.min() and it.image.max() <= 1 for it in items)
    assert items[0].caption == "dent"
    assert Predictions("o", "m", np.zeros(2), np.array([0, 1])).gallery_items(2) == []


def test_std_over_seeds_is_shown_as_plus_minus():
    records = [
        ResultRecord("a", "m", "cls", {"image_aupr": 0.9, "image_aupr_std": 0.012}),
        ResultRecord("b", "m", "cls", {"image_aupr": 0.8, "image_aupr_std": None}),
    ]
    table = metric_table(records, "image_aupr")
    assert table.formatted_rows() == [["m", "90.0 ± 1.2", "80.0", "85.0"]]
    assert "| m | 90.0 ± 1.2 | 80.0 | 85.0 |" in table.to_markdown()
    assert table.to_json()["rows"][0]["stds"] == [0.012, None, None]
    assert table.to_csv().splitlines()[1] == "m,0.900000,0.800000,0.850000"
    assert format_percent(0.5, 0.0) == "50.0 ± 0.0"


def _records_with_test_sets() -> list[ResultRecord]:
    records = make_records()
    for rec in records:
        rec.metrics["test_set"] = {"normal": 3, "anomalous": 7, "pixels": 1000, "anomalous_pixels": 20}
    return records


def test_a_test_set_note_shared_by_a_sections_tables_is_shown_once():
    from spotdiff.report.tables import split_shared_notes, tables_markdown

    tables = paper_tables(_records_with_test_sets(), methods=METHODS)
    assert len(tables) >= 2 and all("pcb_synth: 3 normal + 7 anomalous" in " ".join(t.notes) for t in tables)
    own, shared = split_shared_notes(tables)
    assert any(n.startswith("pcb_synth: 3 normal") for n in shared)
    assert all(not set(shared) & set(t.notes) for t in own)
    assert [t.rows for t in own] == [t.rows for t in tables]  # only the notes move
    note = next(n for n in shared if n.startswith("pcb_synth"))
    assert tables_markdown(tables).count(note) == 1
    page = render_html("t", [Section("Results", list(tables))])
    assert page.count(html_escape(note)) == 1
    # a note one table lacks is not shared
    own, shared = split_shared_notes([tables[0], metric_table(make_records(), "image_aupr")])
    assert shared == [] or not any(n.startswith("pcb_synth") for n in shared)


def html_escape(text: str) -> str:
    import html

    return html.escape(text)


@pytest.mark.parametrize(
    ("label", "score", "expected"),
    [(1, 0.9, "caught"), (1, 0.1, "missed"), (0, 0.9, "false alarm"), (0, 0.1, "passed")],
)
def test_gallery_decisions_read_as_an_operator_would(label, score, expected):
    from spotdiff.report.plots import gallery_decision

    assert gallery_decision(label, score, 0.5) == expected
    assert gallery_decision(label, score, None) == ""


def test_gallery_never_calls_a_normal_image_a_miss():
    scores = np.array([0.1, 0.9, 0.95, 0.2])
    labels = np.array([1, 1, 0, 0])
    items = Predictions("o", "m", scores, labels, images=np.zeros((4, 8, 8, 3))).gallery_items(4)
    kinds = {(it.label, it.kind) for it in items}
    assert (0, "highest-scoring normal") in kinds and (1, "lowest-scoring defect") in kinds
    assert not any(it.label == 0 and "defect" in it.kind for it in items)


def test_curve_legend_area_equals_scikit_learns_auc():
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    from spotdiff.report.plots import curve_area

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    precision, recall, _ = precision_recall_curve(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert curve_area(recall, precision) == pytest.approx(auc(recall, precision), abs=1e-12)
    assert curve_area(fpr, tpr) == pytest.approx(auc(fpr, tpr), abs=1e-12)


def _record(obj, method, aupr, std=None, test_set=True):
    metrics = {"image_aupr": aupr, "image_auroc": aupr}
    if std is not None:
        metrics["image_aupr_std"] = std
    if test_set:
        metrics["test_set"] = {"normal": 16, "anomalous": 50, "pixels": 1000, "anomalous_pixels": 21}
    return ResultRecord(obj, method, "padim", metrics)


def test_tables_state_the_test_set_chance_levels_and_seed_spread():
    table = object_backbone_table([_record("pcb", "A", 0.9), _record("pcb", "B", 0.8)])
    text = table.to_markdown()
    assert "16 normal + 50 anomalous test images" in text and "1,000 pixels" in text
    assert "image AU-PR 75.8" in text and "pixel AU-PR 2.1" in text  # 50/66 and 21/1000
    assert "One seed per cell" in text
    seeded = metric_table(
        [
            _record("pcb", "A", 0.90, 0.01),
            _record("pcb", "B", 0.85, 0.01),
            _record("cap", "A", 0.80, 0.03),
            _record("cap", "B", 0.79, 0.02),
        ],
        "image_aupr",
    )
    note = seeded.notes[-1]
    assert "pcb: A leads B by 5.0, beyond their seed spread (2.0)" in note
    assert "cap: A leads B by 1.0, within their seed spread (5.0)" in note
    assert seeded.to_json()["notes"] == seeded.notes


def test_gallery_shows_best_detections_beside_worst_misses():
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.05])
    labels = np.array([1, 1, 1, 1, 0, 0])
    preds = Predictions("o", "m", scores, labels, images=np.zeros((6, 8, 8, 3)))
    items = preds.gallery_items(4)
    assert [(it.kind, it.score) for it in items] == [
        ("highest-scoring defect", 0.9),
        ("highest-scoring defect", 0.8),
        ("lowest-scoring defect", 0.1),
        ("highest-scoring normal", 0.3),
    ]
