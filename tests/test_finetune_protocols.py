"""2-class protocols on the synthetic VisA-format dataset: k-shot draws, bad input, the CLI end to end."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from spotdiff.cli import main
from spotdiff.data import sample_kshot
from spotdiff.data.synth import generate
from spotdiff.errors import DataError
from spotdiff.finetune import aggregate, get_protocol, open_protocol
from spotdiff.finetune.protocols import list_objects
from spotdiff.models import build_backbone

OBJECTS = ["pcb_synth", "cashew_synth"]
SIZE = 32


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """Two synthetic objects at 32 px, read at that native size (no small defect mask vanishes
    in a resize). Scale 0.25 gives a few-shot pool of 8 normal + 5 anomalous images per object:
    enough for 5-shot, too few for 10-shot."""
    return generate(tmp_path_factory.mktemp("synth") / "visa", seed=0, scale=0.25, image_size=SIZE, objects=OBJECTS)


def run_cli(*args: str) -> int:
    return main(["--quiet", "finetune", *args])


def test_objects_are_listed_from_the_split_csv(synth_root):
    assert list_objects(synth_root, get_protocol("5shot")) == sorted(OBJECTS)


def test_kshot_draw_is_reproducible_per_seed(synth_root):
    data = open_protocol(synth_root, "pcb_synth", get_protocol("5shot"), image_size=SIZE)
    draws = [data.train_indices(seed) for seed in range(5)]
    assert draws == [
        open_protocol(synth_root, "pcb_synth", get_protocol("5shot"), SIZE).train_indices(s) for s in range(5)
    ]
    assert draws[0] == sample_kshot(data.train_pool.labels, 5, 0)
    labels = data.train_pool.labels
    for draw in draws:
        assert sorted(labels[i] for i in draw) == [0] * 5 + [1] * 5
    assert len({tuple(d) for d in draws}) > 1  # seeds draw different images


def test_highshot_trains_on_the_whole_train_subset(synth_root):
    data = open_protocol(synth_root, "pcb_synth", get_protocol("highshot"), image_size=SIZE)
    assert data.train_indices(0) == data.train_indices(3) == list(range(len(data.train_pool)))
    assert {0, 1} <= set(data.test.labels)


def test_k_larger_than_the_pool_is_refused(synth_root, tmp_path, capsys):
    with pytest.raises(DataError, match=r"k=10 is larger than the pool of \d+ .*2cls_fewshot\.csv"):
        open_protocol(synth_root, "pcb_synth", get_protocol("10shot"), image_size=SIZE)
    out = tmp_path / "out"
    assert (
        run_cli(
            "--task",
            "cls",
            "--protocol",
            "10shot",
            "--data",
            str(synth_root),
            "--object",
            "all",
            "--arch",
            "resnet18",
            "--out",
            str(out),
        )
        == 2
    )
    assert "k=10 is larger than the pool" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_split_without_anomalies_is_refused(synth_root, tmp_path, capsys):
    root = tmp_path / "visa"
    shutil.copytree(synth_root, root)
    csv_path = root / "split_csv" / "2cls_highshot.csv"
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if not (r["split"] == "train" and r["label"] == "anomaly")]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    with pytest.raises(DataError, match=r"pcb_synth.*2cls_highshot\.csv.*'train' has no anomalous images"):
        open_protocol(root, "pcb_synth", get_protocol("highshot"), image_size=SIZE)
    out = tmp_path / "out"
    assert (
        run_cli(
            "--task",
            "seg",
            "--protocol",
            "highshot",
            "--data",
            str(root),
            "--object",
            "pcb_synth",
            "--arch",
            "resnet18",
            "--out",
            str(out),
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "spotdiff finetune: error:" in err and "no anomalous images" in err
    assert not out.exists()


def test_weights_of_another_architecture_are_named_through_the_cli(synth_root, tmp_path, capsys):
    from safetensors.torch import save_file

    weights = tmp_path / "r18.safetensors"
    save_file(build_backbone("resnet18").state_dict(), str(weights))
    out = tmp_path / "out"
    assert (
        run_cli(
            "--task",
            "cls",
            "--protocol",
            "5shot",
            "--data",
            str(synth_root),
            "--object",
            "pcb_synth",
            "--arch",
            "resnet50",
            "--weights",
            str(weights),
            "--out",
            str(out),
        )
        == 2
    )
    err = capsys.readouterr().err
    assert str(weights) in err and "are resnet18 weights, they do not fit resnet50" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_cli_end_to_end_segmentation_all_objects(synth_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        run_cli(
            "--task",
            "seg",
            "--protocol",
            "5shot",
            "--data",
            str(synth_root),
            "--object",
            "all",
            "--arch",
            "resnet18",
            "--seeds",
            "2",
            "--steps",
            "4",
            "--image-size",
            str(SIZE),
            "--workers",
            "0",
            "--out",
            str(out),
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| **mean** |" in printed
    for obj in OBJECTS:
        seeds = [json.loads((out / obj / f"seed{s}.json").read_text()) for s in range(2)]
        for s, record in enumerate(seeds):
            assert record["seed"] == s and record["n_train"] == 10 and record["steps"] == 4
            metrics = record["metrics"]
            for key in ("image_auroc", "image_aupr", "pixel_auroc", "pixel_aupr", "pixel_aupro"):
                assert 0.0 <= metrics[key] <= 1.0
            assert metrics["per_defect_type"]
        assert seeds[0]["train_images"] != seeds[1]["train_images"]  # a new k-shot draw per seed
        agg = json.loads((out / obj / "aggregate.json").read_text())["metrics"]
        assert agg == json.loads(json.dumps(aggregate([r["metrics"] for r in seeds])))
        assert (out / obj / "aggregate.csv").read_text().startswith("metric,mean,std,n\n")
    with open(out / "table.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["object"] for r in table] == sorted(OBJECTS) + ["mean"]
    assert list(table[0])[:5] == ["object", "image_aupr_mean", "image_aupr_std", "image_auroc_mean", "image_auroc_std"]
    mean_of_means = sum(float(r["pixel_auroc_mean"]) for r in table[:2]) / 2
    assert float(table[2]["pixel_auroc_mean"]) == pytest.approx(mean_of_means)
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and set(results["aggregate"]) == set(OBJECTS)
    assert (out / "table.md").read_text().count("\n") == len(OBJECTS) + 5  # title, blank, header, rule, rows


def test_highshot_classifier_runs_every_seed_on_the_same_images(synth_root, tmp_path):
    from spotdiff.finetune import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        task="cls",
        protocol="highshot",
        data=synth_root,
        out=tmp_path / "out",
        object="cashew_synth",
        arch="resnet18",
        seeds=2,
        epochs=1,
        batch_size=8,
        image_size=SIZE,
    )
    results = run_finetune(config)
    records = results["per_seed"]["cashew_synth"]
    pool = open_protocol(synth_root, "cashew_synth", get_protocol("highshot"), SIZE).train_pool
    for record in records:
        assert record["train_images"] == list(pool.paths)  # the whole train subset, every seed
        assert record["n_train_anomalous"] == sum(pool.labels)
        assert record["steps"] == -(-len(pool) // 8)  # one epoch = ceil(n_train / batch) steps
        assert "pixel_auroc" not in record["metrics"] and "image_aupr" in record["metrics"]
    assert records[0]["final_loss"] != records[1]["final_loss"]  # the seed changes init and order
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| cashew_synth |" in table and "mean**" not in table  # one object: no mean row
    assert list(results["table"]) == ["cashew_synth"]
