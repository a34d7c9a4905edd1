"""predict as a pipeline: fail-closed scoring, the scores file, output location, normalised score,
overlays and masks at the image's size, threads (issues 23, 25, 26)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from spotdiff.cli import main
from spotdiff.detect.calibration import Calibration
from spotdiff.detect.predict import predict_images
from spotdiff.detect.predict_output import PARTIAL, PREDICT_COLUMNS, PREVIOUS
from spotdiff.detect.scoring import ImageScorer, ScoredImage, binary_mask, display_size
from spotdiff.errors import ConfigError, OutputError

SIZE = 16


class MeanRunner:
    """A fitted-model stand-in with the ``predict`` interface: map = 10 x channel-mean of each pixel,
    score = map maximum; an image whose top-left pixel is pure red gets a NaN score (a model gone bad)."""

    forward_batch = 2

    def __init__(self, threshold: float = 6.0) -> None:
        self.image_size_ = (SIZE, SIZE)
        self.calibration_ = Calibration(
            normal_scores=[4.0, 4.5, 5.0, 5.5],
            image_threshold=threshold,
            pixel_threshold=5.0,
            image_mode="manual",
            pixel_mode="manual",
        ).to_dict()
        self.calls = 0

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        maps = images.mean(1) * 10.0
        scores = maps.flatten(1).max(1).values.clone()
        red = (images[:, 0, 0, 0] == 1.0) & (images[:, 1, 0, 0] == 0.0)
        scores[red] = float("nan")
        return scores, maps


def write_image(path, value: float, size=(SIZE, SIZE), red=False, square=False):
    arr = np.full((*size, 3), round(value * 255), np.uint8)
    if square:  # a bright defect in the middle
        arr[size[0] // 3 : 2 * size[0] // 3, size[1] // 3 : 2 * size[1] // 3] = 250
    if red:
        arr[0, 0] = (255, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def rows_of(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "in"
    for i in range(7):
        write_image(folder / f"img{i}.png", 0.3 + 0.02 * i, square=i >= 5)
    write_image(folder / "nan.png", 0.4, red=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return folder


# ----------------------------------------------------------------------------- fail closed


def test_non_finite_score_is_an_error_row_never_normal(images, tmp_path):
    rows = predict_images(MeanRunner(), [images], tmp_path / "out", masks=True)
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in rows}
    assert list(rows[0]) == list(PREDICT_COLUMNS) and len(rows) == 9
    for name in ("nan.png", "broken.png"):
        row = by_name[name]
        assert row["decision"] == "error" and row["score"] == "" and row["anomalous"] == "" and row["error"]
        assert row["overlay"] == "" and row["mask"] == ""
    assert "non-finite score" in by_name["nan.png"]["error"]
    scored = [r for n, r in by_name.items() if n.startswith("img")]
    assert all(r["decision"] in ("normal", "anomalous") and r["overlay"] and r["mask"] for r in scored)
    assert {by_name["img5.png"]["decision"], by_name["img6.png"]["decision"]} == {"anomalous"}
    assert rows_of(tmp_path / "out" / "scores.csv") == [{k: str(v) for k, v in r.items()} for r in rows]


def test_scorer_refuses_non_finite_thresholds_and_maps_nan_to_error():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="--threshold must be a finite number"):
            ImageScorer(MeanRunner(), threshold=bad)
        with pytest.raises(ConfigError, match="--pixel-threshold must be a finite number"):
            ImageScorer(MeanRunner(), pixel_threshold=bad)
    from spotdiff.detect.calibration import decide

    assert decide([float("nan"), float("inf"), 7.0, 5.0], 6.0) == ["error", "error", "anomalous", "normal"]
    assert decide([float("nan"), 1.0], None) == ["error", "no threshold"]
    scorer = ImageScorer(MeanRunner())
    item = scorer.decode_image(Image.new("RGB", (SIZE, SIZE), (100, 100, 100)), "x.png")
    bad_map = scorer._decide(item, 1.0, np.full((SIZE, SIZE), np.nan, np.float32))
    assert bad_map.decision == "error" and "non-finite anomaly map" in bad_map.error


def test_cli_exit_status_1_when_some_images_error_and_2_when_none_scored(tmp_path, capsys, monkeypatch):
    from spotdiff import detect

    folder = tmp_path / "in"
    write_image(folder / "a.png", 0.3)
    write_image(folder / "nan.png", 0.3, red=True)

    monkeypatch.setattr(detect, "load_detector", lambda *a, **k: MeanRunner())
    assert main(["--quiet", "predict", "m", str(folder), "--out", str(tmp_path / "o")]) == 1
    assert "error row:" in capsys.readouterr().err
    assert main(["--quiet", "predict", "m", str(folder / "nan.png"), "--out", str(tmp_path / "o2")]) == 2


# ----------------------------------------------------------------------------- normalised score


def test_normalized_score_ranks_is_half_at_threshold_and_never_saturates():
    cal = Calibration(
        normal_scores=[9.0, 9.5, 10.0, 10.5, 11.0],
        image_threshold=11.0,
        pixel_threshold=1.0,
        image_mode="normal-fpr",
        pixel_mode="normal-fpr",
    )
    defects = np.array([12.0, 15.0, 30.0, 100.0, 1e4, 1e6])
    values = cal.normalized(defects)
    assert cal.normalized([11.0])[0] == 0.5 and cal.normalized([12.0], threshold=12.0)[0] == 0.5
    assert np.all(np.diff(values) > 0) and np.all(values < 1.0) and np.all(values > 0.5)
    assert len({round(v, 3) for v in values[:4]}) == 4  # different defects read differently at 3 decimals
    normals = cal.normalized(cal.normal_scores)
    assert np.all(np.diff(normals) > 0) and normals[-1] == 0.5 and normals[0] > 0.0
    assert cal.percentile(defects).tolist() == [1.0] * 6  # the percentile saturates; it is its own column
    assert math.isnan(cal.normalized([float("nan")])[0]) and math.isnan(cal.percentile([float("nan")])[0])
    damaged = Calibration(
        normal_scores=[float("nan")] * 3,
        image_threshold=1.0,
        pixel_threshold=1.0,
        image_mode="normal-fpr",
        pixel_mode="normal-fpr",
    )
    assert np.isnan(damaged.normalized([0.0, 5.0])).all() and np.isnan(damaged.percentile([0.0, 5.0])).all()
    single = Calibration(
        normal_scores=[3.0], image_threshold=3.0, pixel_threshold=1.0, image_mode="normal-fpr", pixel_mode="normal-fpr"
    )
    assert single.spread() > 0 and 0.5 < single.normalized([3.5])[0] < single.normalized([4.0])[0] < 1.0


def test_existing_model_calibration_loads_and_normalises(tmp_path):
    """A calibration dict as written before this change (no new keys) gives the normalised score."""
    old = {
        "normal_scores": [1.0, 2.0, 3.0],
        "image_threshold": 3.0,
        "pixel_threshold": 0.5,
        "image_mode": "normal-fpr",
        "pixel_mode": "normal-fpr",
        "target_fpr": 0.01,
        "pixel_quantiles": [],
        "figures": {},
        "source": {},
    }
    cal = Calibration.from_dict(json.loads(json.dumps(old)))
    assert cal.normalized([3.0])[0] == 0.5 and cal.normalized([4.0])[0] > 0.5


# ----------------------------------------------------------------------------- where output may go


def test_out_inside_model_dir_or_input_folder_is_refused_nothing_written(images, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "manifest.json").write_text("{}")
    for out in (model, model / "preds"):
        with pytest.raises(ConfigError, match="inside the model directory"):
            predict_images(MeanRunner(), [images], out)
    for out in (images, images / "preds"):
        with pytest.raises(ConfigError, match="inside the input folder"):
            predict_images(MeanRunner(), [images], out)
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "manifest.json"]
    assert not (images / "preds").exists() and not (images / "scores.csv").exists()
    assert main(["export", str(model), "--out", str(model / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside the model directory" in err


# ----------------------------------------------------------------------------- the scores file


def test_earlier_scores_moved_aside_foreign_file_refused_temp_files_cleaned(images, tmp_path):
    out = tmp_path / "out"
    predict_images(MeanRunner(), [images], out, overlays=False)
    first = (out / "scores.csv").read_text()
    (out / "overlays").mkdir()
    stale_tmp = out / "overlays" / ".img0.png.tmp-abc123"
    stale_tmp.write_bytes(b"half")
    other_run_tmp = out / "overlays" / ".gone.png.tmp-x1"  # an image that this run does not score
    other_run_tmp.write_bytes(b"half")
    lookalike = out / "overlays" / ".notes.txt.tmp-x1"  # not a PNG of ours: kept
    lookalike.write_bytes(b"user")
    user_file = out / "overlays" / "notes.txt"
    user_file.write_text("mine")
    predict_images(MeanRunner(), [images], out)
    assert (out / PREVIOUS).read_text() == first and not stale_tmp.exists() and user_file.read_text() == "mine"
    assert not other_run_tmp.exists() and lookalike.exists()
    assert not (out / PARTIAL).exists() and len(rows_of(out / "scores.csv")) == 9
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "scores.csv").write_text("part,weight\nA,3\n")
    with pytest.raises(OutputError, match="was not written by spotdiff predict"):
        predict_images(MeanRunner(), [images], foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["scores.csv"]


def test_writer_failure_ends_run_keeping_rows_scored_before(images, tmp_path, monkeypatch, capsys):
    from spotdiff import detect
    from spotdiff.detect import predict

    real = predict.overlay_picture
    calls = {"n": 0}

    def dies_on_fifth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise MemoryError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict, "overlay_picture", dies_on_fifth)
    monkeypatch.setattr(detect, "load_detector", lambda *a, **k: MeanRunner())
    out = tmp_path / "out"
    assert (
        main(["--quiet", "predict", "m", str(images), "--out", str(out), "--batch-size", "2", "--io-threads", "0"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "writing its overlay/mask failed" in err and "MemoryError" in err
    kept = rows_of(out / PARTIAL)
    names = [r["path"].rsplit("/", 1)[1] for r in kept]  # every row whose files were written, not img4's
    assert names == ["broken.png", "img0.png", "img1.png", "img2.png", "img3.png", "img5.png", "img6.png", "nan.png"]
    assert all((out / "overlays" / n).is_file() for n in names if n.startswith("img"))
    assert not (out / "scores.csv").exists()
    monkeypatch.setattr(predict, "overlay_picture", real)
    assert main(["--quiet", "predict", "m", str(images), "--out", str(out), "--resume"]) == 1  # error rows
    final = rows_of(out / "scores.csv")
    assert len(final) == 9 and not (out / PARTIAL).exists()
    assert [r["score"] for r in final if r["path"] in {k["path"] for k in kept}] == [k["score"] for k in kept]


def test_decoding_worker_that_dies_ends_the_run_with_exit_2_keeping_rows(images, tmp_path, monkeypatch, capsys):
    from spotdiff import detect
    from spotdiff.data import io

    real = io.load_image

    def dies_on_img4(path):
        if str(path).endswith("img4.png"):
            raise MemoryError("decoder killed")
        return real(path)

    monkeypatch.setattr(io, "load_image", dies_on_img4)
    monkeypatch.setattr(detect, "load_detector", lambda *a, **k: MeanRunner())
    out = tmp_path / "out"
    assert (
        main(["--quiet", "predict", "m", str(images), "--out", str(out), "--batch-size", "2", "--io-threads", "2"]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "img4.png: decoding failed (MemoryError" in err
    names = [r["path"].rsplit("/", 1)[1] for r in rows_of(out / PARTIAL)]
    assert names[:4] == ["broken.png", "img0.png", "img1.png", "img2.png"] and "img4.png" not in names


def test_resume_refuses_other_thresholds(images, tmp_path):
    out = tmp_path / "out"
    predict_images(MeanRunner(), [images], out, overlays=False)
    with pytest.raises(ConfigError, match="written with threshold 6"):
        predict_images(MeanRunner(threshold=7.0), [images], out, overlays=False, resume=True)
    runner = MeanRunner()
    rows = predict_images(runner, [images], out, overlays=False, resume=True)  # all kept but the error rows
    assert len(rows) == 9 and runner.calls == 1  # only nan.png (and broken.png, not decodable) re-run


# ----------------------------------------------------------------------------- pipeline, overlays, masks


def test_threads_do_not_change_rows_or_files(images, tmp_path):
    outs = [tmp_path / f"w{w}" for w in (0, 3)]
    rows = [
        predict_images(MeanRunner(), [images], o, masks=True, num_workers=w, batch_size=3)
        for o, w in zip(outs, (0, 3), strict=True)
    ]
    strip = [[{k: v for k, v in r.items() if k not in ("overlay", "mask")} for r in rs] for rs in rows]
    assert strip[0] == strip[1]
    for name in ("overlays/img6.png", "masks/img6.png", "overlays/img0.png"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_a_strip_too_thin_for_an_overlay_is_an_error_row_not_a_huge_picture(tmp_path):
    """A 1 x 400000 px strip would be shown at 16 x 6400000 px (both sides at least the model's): with
    overlays it is an error row naming the limit; without overlays it is scored."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.full((1, 400_000, 3), 90, np.uint8)).save(folder / "strip.png")
    write_image(folder / "ok.png", 0.3, size=(30, 60))
    rows = {r["path"].rsplit("/", 1)[1]: r for r in predict_images(MeanRunner(), [folder], tmp_path / "o")}
    assert rows["strip.png"]["decision"] == "error" and "extreme aspect ratio" in rows["strip.png"]["error"]
    assert "--no-overlays" in rows["strip.png"]["error"] and rows["ok.png"]["decision"] != "error"
    assert not list((tmp_path / "o" / "overlays").glob("strip*"))
    rows = predict_images(MeanRunner(), [folder], tmp_path / "p", overlays=False)
    assert all(r["decision"] != "error" for r in rows)


def test_masks_at_original_size_overlay_shows_original_at_model_size_or_more(tmp_path):
    folder = tmp_path / "in"
    write_image(folder / "wide.png", 0.3, size=(30, 60), square=True)
    write_image(folder / "calm.png", 0.3, size=(30, 60))
    rows = {r["path"].rsplit("/", 1)[1]: r for r in predict_images(MeanRunner(), [folder], tmp_path / "o", masks=True)}
    assert rows["wide.png"]["decision"] == "anomalous" and rows["calm.png"]["decision"] == "normal"
    with Image.open(rows["wide.png"]["mask"]) as m:
        mask = np.asarray(m)
    assert mask.shape == (30, 60) and mask[15, 30] == 255 and mask[0, 0] == 0
    with Image.open(rows["calm.png"]["mask"]) as m:
        assert not np.asarray(m).any()  # a normal image has no defect pixels
    assert display_size((30, 60), (SIZE, SIZE)) == (16, 32) and display_size((8, 8), (SIZE, SIZE)) == (16, 16)
    from spotdiff.detect.colour import overlay_layout

    with Image.open(rows["wide.png"]["overlay"]) as ov:
        overlay = np.asarray(ov.convert("RGB"))
    top, left, h, w = overlay_layout(16, 32)["heat"]
    heat = overlay[top : top + h, left : left + w]
    assert (heat == 255).all(axis=-1).any()  # the outline on the anomalous image
    with Image.open(rows["calm.png"]["overlay"]) as ov:
        calm = np.asarray(ov.convert("RGB"))[top : top + h, left : left + w]
    assert not (calm == 255).all(axis=-1).any()  # none on the normal one


def test_binary_mask_rule():
    amap = np.array([[0.0, 9.0], [9.0, 0.0]], np.float32)
    anomalous = ScoredImage(path=None, score=9.0, decision="anomalous", anomaly_map=amap, original_size=(2, 2))
    normal = ScoredImage(path=None, score=9.0, decision="normal", anomaly_map=amap, original_size=(2, 2))
    undecided = ScoredImage(path=None, score=9.0, decision="no threshold", anomaly_map=amap, original_size=(4, 4))
    assert binary_mask(anomalous, 5.0).tolist() == [[False, True], [True, False]]
    assert not binary_mask(normal, 5.0).any() and binary_mask(anomalous, None) is None
    assert binary_mask(undecided, 5.0).shape == (4, 4)


def test_onnxruntime_gets_the_thread_count(tmp_path, monkeypatch):
    """--threads reaches the onnxruntime session; torch's own count is left alone (that run needs no torch)."""
    from spotdiff.detect import onnx_runtime

    seen = {}

    class Captured(Exception):
        pass

    def fake(model_dir, onnx, threads=None):
        seen["threads"] = threads
        raise Captured

    monkeypatch.setattr(onnx_runtime, "OnnxDetector", fake)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Captured):
            main(
                [
                    "--threads",
                    "1",
                    "predict",
                    "m",
                    str(tmp_path),
                    "--out",
                    str(tmp_path / "o"),
                    "--backend",
                    "onnxruntime",
                    "--onnx",
                    "x.onnx",
                ]
            )
        assert seen["threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_explicit_dangling_link_is_an_error_row(tmp_path):
    good = write_image(tmp_path / "in" / "a.png", 0.3)
    link = tmp_path / "in" / "gone.png"
    link.symlink_to(tmp_path / "nowhere.png")
    rows = predict_images(MeanRunner(), [good, link], tmp_path / "out", overlays=False)
    assert [r["decision"] for r in rows] == ["normal", "error"] and "gone.png" in rows[1]["error"]
