"""The 2-class protocols (high-shot, k-shot), their data, and mean ± std over seeds.

Protocols (Zou et al. 2022, VisA):
    * ``highshot``: train on the whole ``train`` subset of split ``2cls_highshot`` (60 % of each
      class), test on its ``test`` subset;
    * ``5shot`` / ``10shot``: train on k images of each class drawn with
      :func:`spotdiff.data.sample_kshot` (seed = run seed) from the ``train`` pool of split
      ``2cls_fewshot`` (20 % of each class), test on its ``test`` subset.
Every protocol runs several seeds (0 .. n-1); for high-shot the seed changes only the
initialisation of the new layers, the batch order and the augmentations.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from spotdiff.data import AnomalyDataset, open_dataset, sample_kshot
from spotdiff.errors import ConfigError, DataError
from spotdiff.tabular import csv_text, format_percent, markdown_table


@dataclass(frozen=True)
class Protocol:
    """A 2-class protocol: the split CSV it reads and ``k`` (None = the whole train subset)."""

    name: str
    split: str
    k: int | None


PROTOCOLS: dict[str, Protocol] = {
    "highshot": Protocol("highshot", "2cls_highshot", None),
    "10shot": Protocol("10shot", "2cls_fewshot", 10),
    "5shot": Protocol("5shot", "2cls_fewshot", 5),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; ConfigError for an unknown name."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ConfigError(f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}") from None


def list_objects(root: str | os.PathLike[str], protocol: Protocol) -> list[str]:
    """Objects under ``root``: those listed in ``<root>/split_csv/<split>.csv`` when it exists,
    otherwise the sub-folders of ``root`` (MVTec-style layouts). Sorted by name."""
    root = Path(root)
    split_csv = root / "split_csv" / f"{protocol.split}.csv"
    if split_csv.is_file():
        with open(split_csv, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None or "object" not in reader.fieldnames:
                raise DataError(f"{split_csv}: no 'object' column")
            objects = sorted({row["object"] for row in reader if row.get("object")})
    elif root.is_dir():
        objects = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "split_csv")))
    else:
        raise DataError(f"{root}: dataset root not found")
    if not objects:
        raise DataError(f"{root}: no objects found (looked for {split_csv} and sub-folders)")
    return objects


@dataclass
class ProtocolData:
    """The train pool and the test set of one object under one protocol (lazy datasets)."""

    object: str
    protocol: Protocol
    train_pool: AnomalyDataset
    test: AnomalyDataset

    def train_indices(self, seed: int) -> list[int]:
        """Indices into ``train_pool`` used for training with ``seed``: all of them for
        high-shot, :func:`sample_kshot` (k per class, reproducible) for k-shot."""
        labels = list(self.train_pool.labels)
        if self.protocol.k is None:
            return list(range(len(labels)))
        return sample_kshot(labels, self.protocol.k, seed)


def _where(root: Path, obj: str, protocol: Protocol, subset: str) -> str:
    csv_path = root / "split_csv" / f"{protocol.split}.csv"
    source = csv_path if csv_path.is_file() else root
    return f"object {obj!r}, split {protocol.split} ({source}), subset {subset!r}"


def open_protocol(root: str | os.PathLike[str], obj: str, protocol: Protocol, image_size: int = 256) -> ProtocolData:
    """Open and check the train pool and test set of ``obj`` under ``protocol``.

    Raises:
        DataError: a subset lacks normal or anomalous images, or holds fewer than k of a
            class (k-shot); the message names the object, split CSV and subset.
    """
    root = Path(root)
    data = {
        subset: open_dataset(root, obj, split=protocol.split, subset=subset, image_size=image_size)
        for subset in ("train", "test")
    }
    for subset, ds in data.items():
        n_anomalous = sum(int(v) for v in ds.labels)
        n_normal = len(ds.labels) - n_anomalous
        for count, name in ((n_anomalous, "anomalous"), (n_normal, "normal")):
            if count == 0:
                raise DataError(
                    f"protocol {protocol.name}: {_where(root, obj, protocol, subset)} has no {name} images "
                    f"({n_normal} normal, {n_anomalous} anomalous); 2-class fine-tuning needs both classes"
                )
            if subset == "train" and protocol.k is not None and count < protocol.k:
                raise DataError(
                    f"protocol {protocol.name}: k={protocol.k} is larger than the pool of {count} {name} "
                    f"images in {_where(root, obj, protocol, subset)}"
                )
    return ProtocolData(obj, protocol, data["train"], data["test"])


# ----------------------------------------------------------------------------- mean ± std over seeds


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """``{"mean", "std", "n"}`` of the finite ``values``.

    ``std`` is the *sample* standard deviation (divisor n - 1), the estimate of the spread
    between random draws; it is None for fewer than two values, and both are None for none.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(finite) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def aggregate(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and sample std over seeds of every metric in ``per_seed`` (one metrics dict per seed).

    The result has the structure of the inputs with each number replaced by
    :func:`mean_std` of its values over seeds (non-finite values are skipped; see ``n``).
    Nested dicts (e.g. ``per_defect_type``) are aggregated key by key over the seeds that have
    them; non-numeric leaves are dropped.
    """
    keys: list[str] = []
    for result in per_seed:
        keys.extend(k for k in result if k not in keys)
    out: dict[str, Any] = {}
    for key in keys:
        values = [r[key] for r in per_seed if key in r and r[key] is not None]
        if values and all(isinstance(v, Mapping) for v in values):
            out[key] = aggregate(values)
        elif values and all(_is_number(v) for v in values):
            out[key] = mean_std(values)
    return out


def flatten_aggregate(agg: Mapping[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    """Rows ``{"metric", "mean", "std", "n"}`` of an :func:`aggregate` result; nested keys joined by '/'."""
    rows: list[dict[str, Any]] = []
    for key, value in agg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and set(value) == {"mean", "std", "n"}:
            rows.append({"metric": name, **value})
        elif isinstance(value, Mapping):
            rows.extend(flatten_aggregate(value, prefix=f"{name}/"))
    return rows


def aggregate_csv(agg: Mapping[str, Any]) -> str:
    """CSV text with columns ``metric,mean,std,n`` (empty std for a single seed)."""
    rows = flatten_aggregate(agg)
    return csv_text(["metric", "mean", "std", "n"], [[r["metric"], r["mean"], r["std"], r["n"]] for r in rows])


# ----------------------------------------------------------------------------- paper-style table

TABLE_METRICS = {
    "cls": ("image_aupr", "image_auroc"),
    "seg": ("image_aupr", "image_auroc", "pixel_aupr", "pixel_auroc", "pixel_aupro"),
}
METRIC_TITLES = {
    "image_aupr": "image AU-PR",
    "image_auroc": "image AU-ROC",
    "pixel_aupr": "pixel AU-PR",
    "pixel_auroc": "pixel AU-ROC",
    "pixel_aupro": "pixel AU-PRO",
}


def table_rows(per_object: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[str]) -> dict[str, dict]:
    """``{row name: aggregate}`` with one row per object and, for several objects, a ``mean`` row.

    The mean row is the mean ± std over seeds of the per-seed average over objects (so its
    mean equals the average of the object means). Every object must have the same seed count.
    """
    rows = {obj: aggregate(seeds) for obj, seeds in per_object.items()}
    if len(per_object) > 1:
        counts = {len(s) for s in per_object.values()}
        if len(counts) != 1:
            raise ConfigError(f"objects have different numbers of seeds: {sorted(counts)}")
        n_seeds = counts.pop()
        per_seed_mean = []
        for i in range(n_seeds):
            seed_row: dict[str, float] = {}
            for m in metrics:
                vals = [seeds[i].get(m) for seeds in per_object.values()]
                numbers = [v for v in vals if _is_number(v)]
                if len(numbers) == len(vals):
                    seed_row[m] = math.fsum(numbers) / len(numbers)
            per_seed_mean.append(seed_row)
        rows["mean"] = aggregate(per_seed_mean)
    return rows


def table_csv(rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """CSV: ``object`` then ``<metric>_mean,<metric>_std`` per metric, values as fractions in [0, 1]."""
    header = ["object"] + [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    body = []
    for name, agg in rows.items():
        body.append([name] + [agg.get(m, {}).get(s) for m in metrics for s in ("mean", "std")])
    return csv_text(header, body)


def _percent(stat: Mapping[str, Any] | None) -> str:
    if not stat:
        return "–"
    return format_percent(stat.get("mean"), stat.get("std"), missing="–")


def table_markdown(rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str], title: str = "") -> str:
    """Markdown table in percent (one decimal), ``mean ± std`` over seeds, mean row in bold."""
    header = ["object", *(METRIC_TITLES.get(m, m) for m in metrics)]
    cells = [[name, *(_percent(agg.get(m)) for m in metrics)] for name, agg in rows.items()]
    bold = [name == "mean" and len(rows) > 1 for name in rows]
    return markdown_table(header, cells, ["---"] + ["---:"] * len(metrics), bold, title)
