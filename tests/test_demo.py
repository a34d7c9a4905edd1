"""``spotdiff demo``: the --quick run end to end, and how it treats its work folder."""

from __future__ import annotations

import json
import math
import re

import pytest

from spotdiff.bench.demo import BACKBONES, MARKER, DemoSettings, _prepare_out
from spotdiff.cli import main
from spotdiff.errors import DataError
from spotdiff.models import build_backbone
from spotdiff.report.tables import HEADLINE_METRICS, format_percent


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "results.json").read_text())
    records = results["records"]
    objects = list(dict.fromkeys(r["object"] for r in records))
    assert len(objects) == 3
    assert [(r["object"], r["method"]) for r in records] == [(o, b) for o in objects for b in BACKBONES]
    for rec in records:
        for metric in HEADLINE_METRICS:
            value = rec["metrics"][metric]
            assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, (rec, metric)
        # the printed table shows what was measured
        cells = [format_percent(rec["metrics"][m]) for m in HEADLINE_METRICS]
        assert f"| {rec['object']} | {rec['method']} | " + " | ".join(cells) + " |" in printed
    assert sum(1 for line in printed.splitlines() if line.startswith("| **Mean**")) == len(BACKBONES)
    assert set(results["stage_seconds"]) == {
        "data",
        "pretrain SimSiam",
        "pretrain SimSiam+SPD",
        "PaDiM fit + test",
        "report",
    }
    assert sum(results["stage_seconds"].values()) <= results["seconds"] + 0.5

    # the exported backbones load into torchvision's resnet18 and differ from each other
    a = build_backbone("resnet18", weights=out / "weights" / "simsiam.safetensors").state_dict()
    b = build_backbone("resnet18", weights=out / "weights" / "simsiam_spd.safetensors").state_dict()
    assert any(not a[k].equal(b[k]) for k in a if k.endswith("weight"))

    page = (out / "report.html").read_text()
    assert "PaDiM on the synthetic dataset" in page and "200 ImageNet epochs" in page  # the caveat
    images = re.findall(r'<img [^>]*src="data:image/png;base64,', page)
    assert len(images) == 3 + 3 + 9  # curves and breakdown per object, gallery per object and backbone
    assert (out / "tables.md").is_file() and (out / "results.csv").read_text().count("\n") == 1 + 9
    # --quick says its numbers are a smoke test: on the terminal, in the report and in tables.md
    normal = min(r["metrics"]["test_set"]["normal"] for r in records)
    for text in (printed, page, (out / "tables.md").read_text()):
        assert "SMOKE TEST (demo --quick)" in text and f"as few as {normal} normal" in text


def test_demo_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not a spotdiff demo folder"):
        _prepare_out(tmp_path, DemoSettings.preset(quick=True))
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a spotdiff demo folder" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "user data"
    with pytest.raises(DataError, match="not a folder"):
        _prepare_out(tmp_path / "mine.txt", DemoSettings.preset(quick=True))


def test_demo_restarts_its_own_work_when_settings_change(tmp_path):
    quick = DemoSettings.preset(quick=True)
    _prepare_out(tmp_path, quick)
    for name in ("data", "weights", "pretrain"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x").write_text("old")
    (tmp_path / "notes.txt").write_text("kept")
    _prepare_out(tmp_path, quick)  # same settings: work kept
    assert (tmp_path / "weights" / "x").is_file()
    _prepare_out(tmp_path, DemoSettings.preset(quick=True, seed=1))  # other settings: restart
    assert not (tmp_path / "weights").exists() and not (tmp_path / "data").exists()
    assert (tmp_path / "notes.txt").read_text() == "kept"
    assert json.loads((tmp_path / MARKER).read_text())["seed"] == 1


def test_presets():
    quick, full = DemoSettings.preset(quick=True), DemoSettings.preset()
    assert quick.image_size == 64 and quick.pretrain_steps < full.pretrain_steps
    assert full.arch == quick.arch == "resnet18"


def test_only_the_quick_demo_carries_the_smoke_note():
    from spotdiff.bench.demo import smoke_note
    from spotdiff.report.tables import ResultRecord

    records = [ResultRecord("o", "m", "padim", {"test_set": {"normal": 3, "anomalous": 10}})]
    assert "as few as 3 normal and 10 anomalous" in smoke_note(DemoSettings.preset(quick=True), records)
    assert smoke_note(DemoSettings.preset(), records) == ""
