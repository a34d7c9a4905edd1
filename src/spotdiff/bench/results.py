"""The benchmark's outputs: results.csv, results.json, tables.md and report.html from the stored cells."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spotdiff.bench.schema import BenchmarkConfig
from spotdiff.files import write_json_atomic, write_text_atomic
from spotdiff.models import describe_weights, file_record
from spotdiff.report.html import Section, report_sections, write_html_report
from spotdiff.report.plots import Predictions
from spotdiff.report.tables import HEADLINE_METRICS, ResultRecord, Table, paper_tables, records_csv, tables_markdown
from spotdiff.tabular import format_percent


def headline(metrics: Mapping[str, Any]) -> str:
    parts = []
    for key in ("image_aupr", "image_auroc", "pixel_aupro"):
        value = metrics.get(key)
        if isinstance(value, int | float) and not np.isnan(value):
            parts.append(f"{key} {format_percent(value)}")
    return ", ".join(parts) or "done"


def cell_records(cells: Sequence[Mapping[str, Any]]) -> list[ResultRecord]:
    """Result records (method = weights name) of stored cells."""
    return [ResultRecord(c["object"], c["weights"], c["downstream"], c["metrics"]) for c in cells]


def write_results(config: BenchmarkConfig, cells: Sequence[Mapping[str, Any]], out: Path) -> list[Table]:
    """results.csv, results.json, tables.md and report.html from the stored cells; returns the tables."""

    records = cell_records(cells)
    weights_order = [w.name for w in config.weights]
    used = {c["weights"]: cell_weights(c) for c in cells}
    notes = {name: "random init" for name, record in used.items() if record["name"] == "random"}
    tables: list[Table] = []
    for ds in config.downstream:
        mine = [r for r in records if r.downstream == ds.name]
        methods = [w for w in weights_order if any(r.method == w for r in mine)]
        tables += paper_tables(
            mine, objects=list(config.objects), methods=methods, title_prefix=f"{ds.name}: ", notes=notes
        )
    seconds = [c.get("seconds") for c in cells]
    write_text_atomic(out / "results.csv", records_csv(records, extra={"seconds": seconds}))
    write_json_atomic(
        out / "results.json",
        {
            "title": config.title,
            "objects": list(config.objects),
            "metrics": list(HEADLINE_METRICS),
            "cells": [{k: c[k] for k in ("weights", "downstream", "object", "metrics", "seconds")} for c in cells],
            "tables": [t.to_json() for t in tables],
        },
    )
    write_text_atomic(
        out / "tables.md", f"# {config.title}\n\nValues are percentages with one decimal.\n\n" + tables_markdown(tables)
    )
    predictions = []
    if config.figures:
        predictions = [
            Predictions(
                f"{c['downstream']}: {c['object']}",
                c["weights"],
                np.asarray(c["scores"]),
                np.asarray(c["labels"]),
                c.get("defect_types"),
            )
            for c in cells
            if c.get("scores") is not None and c.get("labels") is not None
        ]
    intro = (
        f"{len(cells)} cells: {len(config.weights)} weights x {len(config.downstream)} downstream methods x "
        f"{len(config.objects)} objects. Data: {config.data_root}. Rows: pre-trained weights; "
        "columns: objects and their mean (given only when every object was measured)."
    )
    provenance = [f"{w.name} ({w.arch}): {describe_weights(used[w.name])}" for w in config.weights if w.name in used]
    sections = [*report_sections(tables, predictions), Section("Backbone weights", provenance)]
    write_html_report(out / "report.html", config.title, sections, intro=intro)
    return tables


def cell_weights(cell: Mapping[str, Any]) -> dict[str, Any]:
    """The weights record of a stored cell; cells stored before records existed get one from their
    fingerprint (random init when it names no file)."""
    return dict(cell.get("init_weights") or file_record(cell.get("fingerprint", {}).get("weights_file")))
