"""Paper-style result tables from result records, as markdown, CSV and JSON.

A *result record* is one measured cell: an object, a method label (pre-trained weights and/or
downstream method), a downstream name and the metrics dict of :func:`spotdiff.metrics.evaluate`
(values are fractions in [0, 1]). Tables show them as **percentages with one decimal**, as the
VisA / SPD paper does (``0.8765`` -> ``87.7``); a missing value is shown as ``-``. The cells are
laid out as markdown, CSV and HTML by :mod:`spotdiff.tabular`, the one table renderer.

Two layouts:

* :func:`paper_tables` -- one table per metric (AU-PR first), methods as rows, objects then
  ``Mean`` as columns; a record with ``<metric>_std`` (fine-tuning: std over seeds) shows
  ``mean ± std``. The mean of a row is the mean over *all* objects of the table and is only
  given when the row has a value for every object (a partial mean would not be comparable).
* :func:`object_backbone_table` -- the demo's table: one row per (object, backbone), the five
  headline metrics as columns, then one ``Mean`` row per backbone (mean over objects).

Every table carries ``notes`` that anchor its numbers (:func:`anchor_notes`): the test set of each
object (normal / anomalous images, pixels) with the chance level of each AU-PR (the fraction of
anomalous images or pixels: what a random score reaches), and whether the differences between rows
exceed their spread over seeds (or that there is only one seed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from spotdiff.errors import ConfigError
from spotdiff.tabular import csv_text, format_fraction, format_percent, markdown_table

#: Headline metrics in the paper's order (AU-PR before AU-ROC), with their display names.
METRIC_LABELS: dict[str, str] = {
    "image_aupr": "Image AU-PR",
    "image_auroc": "Image AU-ROC",
    "pixel_aupr": "Pixel AU-PR",
    "pixel_auroc": "Pixel AU-ROC",
    "pixel_aupro": "Pixel AU-PRO",
}
HEADLINE_METRICS: tuple[str, ...] = tuple(METRIC_LABELS)
MEAN_LABEL = "Mean"
STD_SUFFIX = "_std"  # a record's ``<metric>_std``: standard deviation over seeds


@dataclass(frozen=True)
class ResultRecord:
    """One measured benchmark cell.

    ``method`` is the row label of the paper tables (e.g. ``"SimSiam+SPD"`` or
    ``"simsiam_spd / padim"``); ``downstream`` names the downstream method/protocol;
    ``metrics`` maps metric names to fractions in [0, 1] (``None``/NaN when not measured).
    """

    object: str
    method: str
    downstream: str
    metrics: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "object": self.object,
            "method": self.method,
            "downstream": self.downstream,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultRecord:
        try:
            return cls(str(data["object"]), str(data["method"]), str(data.get("downstream", "")), dict(data["metrics"]))
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"result record lacks object/method/metrics: {data!r}") from exc

    def value(self, metric: str) -> float | None:
        """The metric as a float, or None when absent or NaN."""
        return _as_float(self.metrics.get(metric))


@dataclass(frozen=True)
class Row:
    """One table row: label cells (e.g. ``("SimSiam+SPD",)``), values as fractions and optionally
    their standard deviations over seeds (shown as ``87.7 ± 1.2``); ``note`` is shown in parentheses
    after the labels in markdown and HTML (``random_r18 (random init)``), not in CSV."""

    labels: tuple[str, ...]
    values: tuple[float | None, ...]
    is_mean: bool = False
    stds: tuple[float | None, ...] | None = None
    note: str = ""  # shown after the last label, e.g. "random init"


@dataclass
class Table:
    """A table of fractions; ``label_columns`` head the label cells, ``columns`` the values."""

    title: str
    label_columns: tuple[str, ...]
    columns: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    metric: str | None = None  # set when the whole table shows one metric
    notes: list[str] = field(default_factory=list)  # shown under the table (see anchor_notes)

    @property
    def header(self) -> list[str]:
        return [*self.label_columns, *self.columns]

    def formatted_rows(self) -> list[list[str]]:
        """Every row as display strings (percentages, one decimal)."""
        out = []
        for row in self.rows:
            stds = row.stds or (None,) * len(row.values)
            labels = [*row.labels[:-1], f"{row.labels[-1]} ({row.note})"] if row.note else list(row.labels)
            out.append([*labels, *(format_percent(v, sd) for v, sd in zip(row.values, stds, strict=True))])
        return out

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table preceded by its title; mean rows in bold."""
        align = [":---"] * len(self.label_columns) + ["---:"] * len(self.columns)
        return markdown_table(
            self.header, self.formatted_rows(), align, [r.is_mean for r in self.rows], self.title, self.notes
        )

    def to_csv(self) -> str:
        """CSV with the header row; values are fractions with 6 decimals (empty when missing)."""
        return csv_text(self.header, [[*row.labels, *map(format_fraction, row.values)] for row in self.rows])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; values are fractions (null when missing)."""
        return {
            "title": self.title,
            "metric": self.metric,
            "label_columns": list(self.label_columns),
            "columns": list(self.columns),
            "rows": [
                {
                    "labels": list(r.labels),
                    "values": list(r.values),
                    "is_mean": r.is_mean,
                    **({"stds": list(r.stds)} if r.stds else {}),
                    **({"note": r.note} if r.note else {}),
                }
                for r in self.rows
            ],
            "notes": list(self.notes),
        }


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """Arithmetic mean, or None when any value is missing or there are none."""
    items = list(values)
    present = [v for v in items if v is not None]
    if not items or len(present) != len(items):
        return None
    return sum(present) / len(present)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _index(records: Sequence[ResultRecord]) -> dict[tuple[str, str], ResultRecord]:
    """Records by (method, object); a duplicate is an error (two results for one cell)."""
    out: dict[tuple[str, str], ResultRecord] = {}
    for rec in records:
        if (rec.method, rec.object) in out:
            raise ConfigError(f"two results for method {rec.method!r} on object {rec.object!r}")
        out[(rec.method, rec.object)] = rec
    return out


def metric_table(
    records: Sequence[ResultRecord],
    metric: str,
    objects: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    title: str | None = None,
    notes: Mapping[str, str] | None = None,
) -> Table:
    """Methods as rows, ``objects`` then ``Mean`` as columns, for one metric.

    ``objects`` / ``methods`` fix the order (default: first-seen order in ``records``); ``notes``
    maps a method to its row's note (e.g. ``"random init"``).
    """
    index = _index(records)
    objects = list(objects) if objects is not None else _unique(r.object for r in records)
    methods = list(methods) if methods is not None else _unique(r.method for r in records)
    table = Table(title or METRIC_LABELS.get(metric, metric), ("Method",), (*objects, MEAN_LABEL), metric=metric)
    for method in methods:
        cells = [index.get((method, obj)) for obj in objects]
        values = [rec.value(metric) if rec else None for rec in cells]
        stds = [rec.value(f"{metric}{STD_SUFFIX}") if rec else None for rec in cells]
        has_std = any(sd is not None for sd in stds)
        table.rows.append(
            Row(
                (method,),
                (*values, mean_or_none(values)),
                stds=(*stds, None) if has_std else None,
                note=(notes or {}).get(method, ""),
            )
        )
    table.notes = anchor_notes(records, objects, table)
    return table


def paper_tables(
    records: Sequence[ResultRecord],
    metrics: Sequence[str] = HEADLINE_METRICS,
    objects: Sequence[str] | None = None,
    methods: Sequence[str] | None = None,
    title_prefix: str = "",
    notes: Mapping[str, str] | None = None,
) -> list[Table]:
    """One :func:`metric_table` per metric (AU-PR first), skipping metrics no record measured."""
    tables = []
    for metric in metrics:
        if not any(r.value(metric) is not None for r in records):
            continue
        title = f"{title_prefix}{METRIC_LABELS.get(metric, metric)} (%)"
        tables.append(metric_table(records, metric, objects, methods, title, notes))
    return tables


def object_backbone_table(
    records: Sequence[ResultRecord],
    metrics: Sequence[str] = HEADLINE_METRICS,
    backbones: Sequence[str] | None = None,
    title: str = "Per object and backbone (%)",
) -> Table:
    """The demo's table: rows (object, backbone), metrics as columns, then a mean row per backbone.

    The backbone is the record's ``method``. The mean row of a backbone averages each metric over
    every object of the table (missing if that backbone lacks a value for some object).
    """
    index = _index(records)
    objects = _unique(r.object for r in records)
    backbones = list(backbones) if backbones is not None else _unique(r.method for r in records)
    table = Table(title, ("Object", "Backbone"), tuple(METRIC_LABELS.get(m, m) for m in metrics))
    for obj in objects:
        for bb in backbones:
            rec = index.get((bb, obj))
            table.rows.append(Row((obj, bb), tuple(rec.value(m) if rec else None for m in metrics)))
    for bb in backbones:
        means = tuple(
            mean_or_none(index[(bb, o)].value(m) if (bb, o) in index else None for o in objects) for m in metrics
        )
        table.rows.append(Row((MEAN_LABEL, bb), means, is_mean=True))
    table.notes = anchor_notes(records, objects, table)
    return table


def describe_test_set(obj: str, test_set: Mapping[str, Any]) -> str:
    """One line: the test set of ``obj`` (``metrics["test_set"]`` of ``evaluate_detector``) and the
    chance level of each AU-PR (anomalous fraction of images and of pixels)."""
    normal, anomalous = int(test_set["normal"]), int(test_set["anomalous"])
    text = f"{obj}: {normal} normal + {anomalous} anomalous test images"
    chance = [f"image AU-PR {format_percent(anomalous / max(1, normal + anomalous))}"]
    pixels, bad = int(test_set.get("pixels") or 0), int(test_set.get("anomalous_pixels") or 0)
    if pixels:
        text += f", {pixels:,} pixels ({format_percent(bad / pixels)} % anomalous)"
        chance.append(f"pixel AU-PR {format_percent(bad / pixels)}")
    return f"{text}; chance level: {', '.join(chance)}."


def seed_spread_note(table: Table) -> str | None:
    """Whether the top two rows of each value column differ by more than their seed spread (the sum
    of their std over seeds), or that there is no seed spread; None for fewer than two rows."""
    rows = [r for r in table.rows if not r.is_mean]
    if len({r.labels[-1] for r in rows}) < 2:
        return None
    if not any(r.stds for r in rows):
        return (
            "One seed per cell: there is no seed spread to judge the differences between rows by; "
            "differences of a few points may be noise."
        )
    parts = []
    for j, column in enumerate(table.columns):
        scored: list[tuple[float, float, Row]] = []  # (value, std over seeds, row) of rows with both
        for r in rows:
            value, std = r.values[j], (r.stds[j] if r.stds else None)
            if value is not None and std is not None:
                scored.append((value, std, r))
        ranked = sorted(scored, key=lambda t: -t[0])
        if len(ranked) < 2:
            continue
        (value_a, std_a, a), (value_b, std_b, b) = ranked[:2]
        gap, spread = value_a - value_b, std_a + std_b
        verdict = "beyond" if gap > spread else "within"
        parts.append(
            f"{column}: {' / '.join(a.labels)} leads {' / '.join(b.labels)} by {100 * gap:.1f}, "
            f"{verdict} their seed spread ({100 * spread:.1f})"
        )
    return ("Top two rows, gap against the sum of their std over seeds: " + "; ".join(parts) + ".") if parts else None


def anchor_notes(records: Sequence[ResultRecord], objects: Sequence[str], table: Table) -> list[str]:
    """The notes of a table: one :func:`describe_test_set` per object whose records carry a test set,
    then the :func:`seed_spread_note`."""
    notes = []
    for obj in objects:
        test_set = next(
            (
                r.metrics["test_set"]
                for r in records
                if r.object == obj and isinstance(r.metrics.get("test_set"), Mapping)
            ),
            None,
        )
        if test_set is not None:
            notes.append(describe_test_set(obj, test_set))
    spread = seed_spread_note(table)
    return notes + ([spread] if spread else [])


def split_shared_notes(tables: Sequence[Table]) -> tuple[list[Table], list[str]]:
    """The notes every one of two or more ``tables`` carries (e.g. the test-set line), and copies
    of the tables without them, so a group of tables shows each shared note once, not under each."""
    if len(tables) < 2:
        return list(tables), []
    shared = [n for n in tables[0].notes if all(n in t.notes for t in tables[1:])]
    return [replace(t, notes=[n for n in t.notes if n not in shared]) for t in tables], shared


def tables_markdown(tables: Sequence[Table]) -> str:
    """All tables as one markdown document, separated by blank lines; notes shared by every table
    are listed once, at the end (:func:`split_shared_notes`)."""
    own, shared = split_shared_notes(tables)
    text = "\n".join(t.to_markdown() for t in own)
    if shared:
        text += "\n\nNotes for every table above:\n\n" + "\n".join(f"- {n}" for n in shared) + "\n"
    return text


def records_csv(
    records: Sequence[ResultRecord],
    metrics: Sequence[str] = HEADLINE_METRICS,
    extra: Mapping[str, Sequence[Any]] | None = None,
) -> str:
    """The flat results table: one line per record, metric values as fractions; ``extra`` adds
    columns (name -> one value per record, None for empty)."""
    extra = dict(extra or {})
    return csv_text(
        ["object", "method", "downstream", *metrics, *extra],
        [
            [
                rec.object,
                rec.method,
                rec.downstream,
                *(format_fraction(rec.value(m)) for m in metrics),
                *(col[i] for col in extra.values()),
            ]
            for i, rec in enumerate(records)
        ],
    )
