"""Benchmark grid: config validation, one atomic JSON per cell, resume/skip, outputs, CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from _fake_bench import fake_metrics

from spotdiff.bench.cells import DOWNSTREAM
from spotdiff.bench.config import load_config, parse_config
from spotdiff.bench.grid import grid, run_benchmark
from spotdiff.bench.schema import CellOutput
from spotdiff.cli import main
from spotdiff.errors import ConfigError
from spotdiff.progress import set_quiet

ROOT = Path(__file__).resolve().parents[1]


class FakeRunner:
    """A fast downstream runner; raises on call number ``fail_on`` (1-based) to simulate a kill."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, cell, config, work_dir) -> CellOutput:
        assert work_dir.name == cell.key
        self.calls.append(cell.key)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt(f"simulated kill in {cell.key}")
        rng = np.random.default_rng(len(cell.key))
        labels = [0] * 6 + [1] * 6
        scores = (np.array(labels) + rng.normal(0, 0.8, 12)).tolist()
        types = ["good"] * 6 + ["scratch", "hole"] * 3
        return CellOutput(fake_metrics(cell.key), scores, labels, types)


CONFIG = {
    "data": {"root": "data"},
    "objects": ["pcb_synth", "cashew_synth"],
    "image_size": 32,
    "weights": [
        {"name": "random_r18", "arch": "resnet18", "file": "random"},
        {"name": "simsiam_spd", "arch": "resnet18", "file": "w.safetensors"},
    ],
    "downstream": [
        {"name": "fake-a", "method": "fake"},
        {"name": "fake-b", "method": "fake", "params": {"k": 5}, "weights": ["simsiam_spd"]},
    ],
    "report": {"figures": False},  # figures are checked in test_outputs_tables_csv_and_report only
}
N_CELLS = 2 * 2 + 1 * 2  # fake-a on both weights, fake-b on one, two objects


@pytest.fixture
def fake(monkeypatch) -> FakeRunner:
    runner = FakeRunner()
    monkeypatch.setitem(DOWNSTREAM, "fake", runner)
    return runner


@pytest.fixture(scope="session")
def r18_weights(tmp_path_factory) -> Path:
    """A random resnet18 state_dict as safetensors (the benchmark checks weights files before running)."""
    from safetensors.torch import save_file

    from spotdiff.models import build_backbone

    path = tmp_path_factory.mktemp("weights") / "r18.safetensors"
    save_file(build_backbone("resnet18").state_dict(), str(path))
    return path


@pytest.fixture
def config_file(tmp_path, fake, r18_weights) -> Path:
    os.link(r18_weights, tmp_path / "w.safetensors")
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(CONFIG), encoding="utf-8")
    return path


def _results(out: Path) -> list[dict]:
    cells = json.loads((out / "results.json").read_text())["cells"]
    return [{k: c[k] for k in ("weights", "downstream", "object", "metrics")} for c in cells]


def test_grid_order_and_weights_restriction(config_file):
    config = load_config(config_file)
    cells = grid(config, {"random_r18": None, "simsiam_spd": config_file.parent / "w.safetensors"})
    assert [c.key for c in cells] == [
        "random_r18__fake-a__pcb_synth",
        "random_r18__fake-a__cashew_synth",
        "simsiam_spd__fake-a__pcb_synth",
        "simsiam_spd__fake-a__cashew_synth",
        "simsiam_spd__fake-b__pcb_synth",
        "simsiam_spd__fake-b__cashew_synth",
    ]
    assert config.data_root == config_file.parent / "data"  # relative to the config file


def test_second_run_skips_every_done_cell(config_file, fake, tmp_path):
    out = tmp_path / "out"
    first = run_benchmark(load_config(config_file), out)
    assert len(first.ran) == N_CELLS and first.skipped == []
    assert len(fake.calls) == N_CELLS
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(f"{k}.json" for k in first.ran)
    second = run_benchmark(load_config(config_file), out)
    assert second.ran == [] and len(second.skipped) == N_CELLS
    assert len(fake.calls) == N_CELLS  # nothing re-run
    assert _results(out) == [
        {"weights": c["weights"], "downstream": c["downstream"], "object": c["object"], "metrics": c["metrics"]}
        for c in first.cells
    ]


def test_killed_run_resumes_and_matches_a_clean_run(config_file, monkeypatch, tmp_path):
    clean = tmp_path / "clean"
    run_benchmark(load_config(config_file), clean)

    killer = FakeRunner(fail_on=3)
    monkeypatch.setitem(DOWNSTREAM, "fake", killer)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(load_config(config_file), out)
    cell_files = sorted(p.name for p in (out / "cells").iterdir())
    assert cell_files == sorted(f"{k}.json" for k in killer.calls[:2])  # no partial file for the 3rd
    assert not (out / "results.json").exists()

    rerun = FakeRunner()
    monkeypatch.setitem(DOWNSTREAM, "fake", rerun)
    result = run_benchmark(load_config(config_file), out)
    assert result.skipped == killer.calls[:2]
    assert rerun.calls == result.ran and len(result.ran) == N_CELLS - 2
    assert _results(out) == _results(clean)
    assert (out / "tables.md").read_text() == (clean / "tables.md").read_text()


def test_outputs_tables_csv_and_report(config_file, tmp_path):
    config_file.write_text(yaml.safe_dump(dict(CONFIG, report={"figures": True})))
    out = tmp_path / "out"
    result = run_benchmark(load_config(config_file), out)
    md = (out / "tables.md").read_text()
    # one table per downstream and metric, AU-PR first; methods as rows, objects + mean as columns
    assert [t.title for t in result.tables][:2] == ["fake-a: Image AU-PR (%)", "fake-a: Image AU-ROC (%)"]
    assert len(result.tables) == 2 * 5
    assert "| Method | pcb_synth | cashew_synth | Mean |" in md
    m = fake_metrics("random_r18__fake-a__pcb_synth")["image_aupr"]
    m2 = fake_metrics("random_r18__fake-a__cashew_synth")["image_aupr"]
    assert f"| random_r18 (random init) | {100 * m:.1f} | {100 * m2:.1f} | {50 * (m + m2):.1f} |" in md
    assert "| simsiam_spd | " in md  # only random-init rows are marked
    fake_b = [t for t in result.tables if t.title.startswith("fake-b")][0]
    assert [r.labels[0] for r in fake_b.rows] == ["simsiam_spd"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("object,method,downstream,image_aupr") and csv_lines[0].endswith(",seconds")
    assert len(csv_lines) == 1 + N_CELLS
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * (2 + 2)  # curves + breakdown per (downstream, object)
    stored = json.loads((out / "cells" / "random_r18__fake-a__pcb_synth.json").read_text())
    assert stored["metrics"] == fake_metrics("random_r18__fake-a__pcb_synth") and len(stored["scores"]) == 12
    assert stored["init_weights"] == {"name": "random", "file": None, "sha256": "random"}
    trained = json.loads((out / "cells" / "simsiam_spd__fake-a__pcb_synth.json").read_text())["init_weights"]
    w = config_file.parent / "w.safetensors"
    assert trained == {"name": "file", "file": str(w), "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
    assert "random_r18 (resnet18): random init" in page and f"simsiam_spd (resnet18): {w} (sha256 " in page
    assert "<td>random_r18 (random init)</td>" in page


def test_changed_config_is_not_silently_reused(config_file, tmp_path):
    out = tmp_path / "out"
    run_benchmark(load_config(config_file), out)
    changed = dict(CONFIG, image_size=64)
    config_file.write_text(yaml.safe_dump(changed))
    with pytest.raises(ConfigError, match="another configuration"):
        run_benchmark(load_config(config_file), out)


def test_corrupt_cell_file_is_named(config_file, tmp_path):
    out = tmp_path / "out"
    run_benchmark(load_config(config_file), out)
    bad = out / "cells" / "random_r18__fake-a__pcb_synth.json"
    bad.write_text("{trunc")
    with pytest.raises(ConfigError, match="random_r18__fake-a__pcb_synth.json"):
        run_benchmark(load_config(config_file), out)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "unknown key"),
        ({"objects": []}, "objects"),
        ({"data": {}}, "data.root"),
        ({"weights": [{"name": "a__b"}]}, "no '__'"),
        ({"weights": [{"name": "x/y"}]}, "weights name"),
        ({"downstream": [{"name": "d", "method": "nope"}]}, "unknown method 'nope'"),
        ({"downstream": [{"method": "fake", "weights": ["ghost"]}]}, "weights must list names"),
        ({"weights": [{"name": "a"}, {"name": "a"}]}, "duplicate weights"),
        ({"weights": [{"name": "a", "file": "f", "pretrain": {"method": "simsiam"}}]}, "either file or pretrain"),
        ({"image_size": "big"}, "image_size"),
        ({"weights": [{"name": "a", "arch": "resnet5"}]}, "unknown arch 'resnet5'"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_config_errors(fake, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**CONFIG, **change}, tmp_path)


def test_missing_config_and_weights_file_are_named(config_file, tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (config_file.parent / "w.safetensors").unlink()
    with pytest.raises(ConfigError, match="w.safetensors"):
        run_benchmark(load_config(config_file), tmp_path / "out")


@pytest.fixture
def restore_quiet():
    yield
    set_quiet(False)


def test_cli_benchmark_quiet(config_file, tmp_path, capsys, restore_quiet):
    out = tmp_path / "cli"
    assert main(["--quiet", "benchmark", "--config", str(config_file), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "| Method | pcb_synth | cashew_synth | Mean |" in captured.out
    assert "ran 6 cell(s), skipped 0" in captured.out
    assert (out / "report.html").is_file()
    # --quiet also after the command; the second run skips every cell
    assert main(["benchmark", "--config", str(config_file), "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "ran 0 cell(s), skipped 6" in captured.out
    set_quiet(False)
    assert main(["benchmark", "--config", str(config_file), "--out", str(out)]) == 0
    assert "skipped 6 cell(s)" in capsys.readouterr().err  # progress/log lines when not quiet
    assert main(["benchmark", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_visa_example_config_is_valid():
    config = load_config(ROOT / "docs" / "benchmark_visa.yaml")
    assert len(config.objects) == 12 and "pipe_fryum" in config.objects
    methods = {d.method for d in config.downstream}
    assert methods == {"padim", "patchcore", "cls", "seg"}
    protocols = {d.params.get("protocol") for d in config.downstream if d.method in ("cls", "seg")}
    assert protocols == {"highshot", "5shot", "10shot"}


@pytest.mark.slow
def test_real_runners_on_synthetic_data(tmp_path):
    """The library runners (PaDiM and 2-class classifier fine-tuning) through the grid, tiny scale."""
    from spotdiff.data.synth import generate

    data = generate(tmp_path / "data", seed=0, scale=0.2, image_size=64, objects=["cashew_synth"])
    config = parse_config(
        {
            "data": {"root": str(data)},
            "objects": ["cashew_synth"],
            "image_size": 64,
            "batch_size": 16,
            "weights": [{"name": "random_r18", "arch": "resnet18"}],
            "downstream": [
                {"name": "padim", "method": "padim", "params": {"layers": ["layer1", "layer2"]}},
                {
                    "name": "cls-highshot",
                    "method": "cls",
                    "params": {"protocol": "highshot", "seeds": 2, "steps": 2, "batch_size": 4},
                },
            ],
            "report": {"figures": False},
        },
        tmp_path,
    )
    result = run_benchmark(config, tmp_path / "out")
    assert result.ran == ["random_r18__padim__cashew_synth", "random_r18__cls-highshot__cashew_synth"]
    padim, cls = result.cells
    for metric in ("image_aupr", "image_auroc", "pixel_aupr", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= padim["metrics"][metric] <= 1.0
    assert len(padim["scores"]) == len(padim["labels"]) > 0 and set(padim["labels"]) == {0, 1}
    assert 0.0 <= cls["metrics"]["image_aupr"] <= 1.0 and cls["metrics"]["image_aupr_std"] >= 0.0
    assert "pixel_aupr" not in cls["metrics"]  # the classifier gives image scores only
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "cls-highshot: Image AU-PR (%)" in md and "padim: Pixel AU-PRO (%)" in md


def test_pretrain_blocks_run_once_and_changed_blocks_are_refused(fake, monkeypatch, tmp_path):
    from spotdiff.bench import grid as benchmark

    trained = []

    def fake_pretrain(spec, config, run_dir, dest):
        trained.append((spec.name, dict(spec.pretrain)))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"weights")

    monkeypatch.setattr(benchmark, "pretrain_and_export", fake_pretrain)
    block = {"method": "simsiam", "spd": True, "steps": 3, "data": "images"}
    data = dict(
        CONFIG,
        weights=[{"name": "tiny", "arch": "resnet18", "pretrain": block}],
        downstream=[{"name": "fake-a", "method": "fake"}],
    )
    out = tmp_path / "out"
    result = run_benchmark(parse_config(data, tmp_path), out)
    assert trained == [("tiny", {**block, "data": str(tmp_path / "images")})]  # data relative to the config
    assert len(result.ran) == 2 and (out / "weights" / "tiny.safetensors").is_file()
    assert result.cells[0]["fingerprint"]["weights_file"] == str(out / "weights" / "tiny.safetensors")
    run_benchmark(parse_config(data, tmp_path), out)
    assert len(trained) == 1  # reused
    changed = dict(data, weights=[{"name": "tiny", "arch": "resnet18", "pretrain": {**block, "steps": 4}}])
    with pytest.raises(ConfigError, match=r"another configuration .*differ in \['weights'\]"):
        run_benchmark(parse_config(changed, tmp_path), out)
    (out / "benchmark.json").unlink()  # the config record gone, the stored block still refuses
    with pytest.raises(ConfigError, match="another pretrain block"):
        run_benchmark(parse_config(changed, tmp_path), out)
    assert len(trained) == 1
