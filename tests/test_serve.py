"""`spotdiff serve` in process: parity with `predict`, the API, bad input, keys, limits, failing models."""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from detect_fakes import as_dataset, square_images
from fastapi.testclient import TestClient

from spotdiff.cli import main
from spotdiff.detect import PaDiM
from spotdiff.detect.calibration import calibrate
from spotdiff.detect.predict import predict_images
from spotdiff.errors import ConfigError
from spotdiff.serve import AuditLog, ServeConfig, create_app, load_models, read_api_keys
from spotdiff.serve.config import check_bind, key_matches

SIZE = 48
KEY = "k" * 20 + "-correct-horse"


def fit_model_dir(out: Path) -> Path:
    """A random-init ResNet-18 PaDiM on tiny grey images, calibrated on held-out ones, saved to ``out``."""
    model = PaDiM(arch="resnet18", d=20).fit(as_dataset(square_images(8, SIZE, seed=1)))
    calibrate(
        model, as_dataset(square_images(6, SIZE, seed=2)), as_dataset(square_images(3, SIZE, True, seed=3)), mode="f1"
    )
    model.save(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return fit_model_dir(tmp_path_factory.mktemp("serve") / "padim")


def png(image: torch.Tensor) -> bytes:
    """A ``(3, H, W)`` image in [0, 1] as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def sample_pngs() -> list[bytes]:
    return [png(x) for x in torch.cat([square_images(2, SIZE, seed=7), square_images(2, SIZE, True, seed=8)])]


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def client_for(model_dir: Path, tmp_path: Path, models=None, **config) -> TestClient:
    loaded = models if models is not None else load_models([str(model_dir)])
    return TestClient(create_app(loaded, AuditLog(tmp_path / "audit.jsonl"), ServeConfig(**config)))


def post(client: TestClient, data: bytes, name: str = "padim", query: str = "", **headers: str):
    return client.post(
        f"/v1/models/{name}/predict{query}", content=data, headers={"Content-Type": "image/png", **headers}
    )


def odd_images() -> dict[str, bytes]:
    """Files that exercise every decoding step: a non-square RGB PNG (overlay at the native aspect),
    a 16-bit grey PNG (scaled by its bit depth), a JPEG whose EXIF says "rotate 90°"."""
    g = np.random.default_rng(5)
    wide = (np.clip(0.45 + 0.04 * g.standard_normal((40, 72, 3)), 0, 1) * 255).round().astype(np.uint8)
    wide[10:22, 30:42] = (242, 26, 26)  # a red square: a defect
    deep = (np.clip(0.45 + 0.04 * g.standard_normal((SIZE, SIZE)), 0, 1) * 65535).round().astype(np.uint16)
    out = {}
    for name, image, fmt, extra in [
        ("wide.png", Image.fromarray(wide), "PNG", {}),
        ("deep.png", Image.fromarray(deep), "PNG", {}),
        ("turned.jpg", Image.fromarray(wide), "JPEG", {"quality": 95}),
    ]:
        buf = io.BytesIO()
        if fmt == "JPEG":
            exif = Image.Exif()
            exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
            extra["exif"] = exif
        image.save(buf, format=fmt, **extra)
        out[name] = buf.getvalue()
    return out


def pixels(png_data: bytes | Path) -> np.ndarray:
    source = io.BytesIO(base64.b64decode(png_data)) if isinstance(png_data, (bytes, str)) else png_data
    return np.asarray(Image.open(source))


def test_answers_overlays_and_masks_equal_predicts(model_dir, tmp_path):
    """The service's answer for an image is what `spotdiff predict` writes for the same file: every
    number of its scores.csv row, the decision, and the overlay and mask PNGs pixel for pixel."""
    folder = tmp_path / "in"
    folder.mkdir()
    files = {f"img{i}.png": data for i, data in enumerate(sample_pngs())} | odd_images()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    out = tmp_path / "out"
    assert (
        main(["--quiet", "predict", str(model_dir), str(folder), "--out", str(out), "--batch-size", "1", "--masks"])
        == 0
    )
    with open(out / "scores.csv", newline="") as fh:
        expected = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert sorted(expected) == sorted(files)
    with client_for(model_dir, tmp_path) as client:
        for name, row in sorted(expected.items()):
            data = files[name]
            raw = post(client, data, query="?overlay=true&mask=true")
            multipart = client.post(
                "/v1/models/padim/predict?overlay=true&mask=true", files={"image": (name, data, "image/png")}
            )
            for r in (raw, multipart):
                assert r.status_code == 200, r.text
                body = r.json()
                assert row["decision"] in ("normal", "anomalous"), row
                assert body["score"] == float(row["score"])  # same decode, same model call: identical
                assert body["normalized_score"] == float(row["normalized_score"])
                assert body["normal_percentile"] == float(row["normal_percentile"])
                assert body["decision"] == row["decision"]
                assert body["anomalous"] == (row["anomalous"] == "1")
                assert body["thresholds"] == {"image": float(row["threshold"]), "pixel": float(row["pixel_threshold"])}
                assert np.array_equal(pixels(body["overlay_png"]), pixels(Path(row["overlay"])))
                assert np.array_equal(pixels(body["mask_png"]), pixels(Path(row["mask"])))
    decisions = [r["decision"] for r in expected.values()]
    assert "anomalous" in decisions and "normal" in decisions  # both outcomes were compared
    assert pixels(out / "masks" / "wide.png").shape == (40, 72)  # the original's size, as predict's
    assert pixels(out / "masks" / "turned.png").shape == (72, 40)  # EXIF orientation applied


def test_answer_overlay_mask_models_metrics_and_schema(model_dir, tmp_path):
    data = sample_pngs()[3]
    with client_for(model_dir, tmp_path) as client:
        r = post(client, data, query="?overlay=true&mask=1")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["image_sha256"] == __import__("hashlib").sha256(data).hexdigest()
        assert len(body["model_fingerprint"]) == 64 and body["provenance"]["model"] == "padim"
        assert body["provenance"]["weights"]["name"] == "random"
        assert r.headers["x-request-id"] == body["request_id"]
        overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask_png"]))))
        assert overlay.size[0] > SIZE and mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
        assert "overlay_png" not in post(client, data).json()

        models = client.get("/v1/models").json()["models"]
        assert [m["name"] for m in models] == ["padim"]
        assert models[0]["model_fingerprint"] == body["model_fingerprint"]
        assert models[0]["thresholds"] == body["thresholds"]
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["status"] == "ready"
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'spotdiff_requests_total{route="/v1/models/{name}/predict",status="200"} 2' in text
        assert f'spotdiff_decisions_total{{model="padim",outcome="{body["decision"]}"}}' in text
        assert 'spotdiff_request_duration_seconds_bucket{route="/v1/models/{name}/predict",le="+Inf"} 2' in text
        assert 'spotdiff_queue_depth{model="padim"} 0' in text and "spotdiff_batch_size_bucket" in text
        schema = client.get("/openapi.json").json()
        assert {"/v1/models/{name}/predict", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
        content = schema["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
        assert {"image/*", "application/octet-stream", "multipart/form-data"} <= set(content)
    assert len(audit_lines(tmp_path / "audit.jsonl")) == 2


def bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (600, 600)).save(buf, format="PNG")  # 360 000 pixels in a few hundred bytes
    return buf.getvalue()


def thin_png() -> bytes:
    """2000 x 1 pixels: few, but its overlay's original (both sides >= the model's) would be 96000 x 48."""
    buf = io.BytesIO()
    Image.new("L", (2000, 1), 128).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_input_is_a_4xx_naming_the_problem_and_never_a_decision(model_dir, tmp_path):
    good = sample_pngs()[0]
    cases = [
        (
            {"content": b"hello, not an image", "headers": {"Content-Type": "image/png"}},
            400,
            "bad_image",
            "not an image",
        ),
        (
            {"content": good[: len(good) // 2], "headers": {"Content-Type": "image/png"}},
            400,
            "bad_image",
            "cannot read",
        ),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "bad_image", "request body: empty"),
        ({"content": good, "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_content_type", "text/plain"),
        ({"content": good}, 415, "unsupported_content_type", "(none)"),
        ({"content": b"x" * 9000, "headers": {"Content-Type": "image/png"}}, 413, "body_too_large", "8000 bytes"),
        ({"content": bomb_png(), "headers": {"Content-Type": "image/png"}}, 413, "image_too_large", "600x600"),
        ({"content": thin_png(), "headers": {"Content-Type": "image/png"}}, 413, "image_too_large", "aspect ratio"),
        ({"files": {"picture": ("a.png", good, "image/png")}}, 400, "missing_image_field", "'image'"),
    ]
    with client_for(model_dir, tmp_path, max_body_bytes=8000, max_pixels=100_000) as client:
        for kwargs, status, code, words in cases:
            r = client.post("/v1/models/padim/predict", **kwargs)
            assert r.status_code == status, (code, r.text)
            assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"], r.text
        for url, status, code, words in [
            ("/v1/models/nope/predict", 404, "unknown_model", "'nope'"),
            ("/v1/models/..%2F..%2Fetc%2Fpasswd/predict", 404, "not_found", "passwd"),
            ("/v1/models/padim/predict?overlay=maybe", 422, "malformed_request", "overlay"),
            ("/v1/models/padim/predict?path=/etc/passwd", 400, "unknown_query_parameter", "'path'"),
            ("/v1/nothing", 404, "not_found", "POST /v1/nothing"),
        ]:
            r = client.post(url, content=good, headers={"Content-Type": "image/png"})
            assert r.status_code == status, (url, r.text)
            assert r.json()["error"]["code"] == code and words in r.json()["error"]["message"], (url, r.text)
        assert client.get("/v1/models/padim/predict").status_code == 405
        chunked = client.post(
            "/v1/models/padim/predict", content=iter([b"x" * 5000, b"x" * 5000]), headers={"Content-Type": "image/png"}
        )  # no Content-Length: counted while streaming
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "body_too_large"
        assert audit_lines(tmp_path / "audit.jsonl") == []  # nothing decided
        r = post(client, good)  # and the service keeps serving
        assert r.status_code == 200
        assert [line["request_id"] for line in audit_lines(tmp_path / "audit.jsonl")] == [r.json()["request_id"]]


def test_api_keys_are_required_compared_and_never_echoed(model_dir, tmp_path, monkeypatch):
    good = sample_pngs()[0]
    with client_for(model_dir, tmp_path, api_keys=(KEY,)) as client:
        for headers, code in [
            ({}, "missing_api_key"),
            ({"Authorization": "Bearer " + KEY[:-1] + "X"}, "wrong_api_key"),
            ({"Authorization": "Basic " + KEY}, "missing_api_key"),
        ]:
            r = post(client, good, **headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == code
            assert r.headers["www-authenticate"] == "Bearer"
            assert client.get("/v1/models", headers=headers).status_code == 401
            assert client.get("/metrics", headers=headers).status_code == 401
        assert client.get("/healthz").status_code == 200 and client.get("/").status_code == 200  # no data there
        ok = post(client, good, Authorization="Bearer " + KEY)
        assert ok.status_code == 200 and KEY not in ok.text
    assert KEY not in (tmp_path / "audit.jsonl").read_text() and len(audit_lines(tmp_path / "audit.jsonl")) == 1
    assert key_matches(KEY, ("a" * 16, KEY)) and not key_matches(KEY + "x", (KEY,))
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    with client_for(model_dir, tmp_path) as client:  # CORS off by default
        assert (
            "access-control-allow-origin" not in client.options("/v1/models/padim/predict", headers=preflight).headers
        )
        assert (
            "access-control-allow-origin"
            not in client.get("/v1/models", headers={"Origin": "https://x.example"}).headers
        )
    with client_for(model_dir, tmp_path, cors_origins=("https://line.example",)) as client:
        allowed = client.get("/v1/models", headers={"Origin": "https://line.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://line.example"
        assert (
            "access-control-allow-origin"
            not in client.get("/v1/models", headers={"Origin": "https://x.example"}).headers
        )

    with pytest.raises(ConfigError, match="without an API key"):
        check_bind("0.0.0.0", ())
    check_bind("127.0.0.1", ()), check_bind("::1", ()), check_bind("localhost", ()), check_bind("0.0.0.0", (KEY,))
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# station keys\n{KEY}\n\n{'z' * 24}\n")
    monkeypatch.setenv("SPOTDIFF_API_KEYS", "y" * 30 + ", " + "w" * 16)
    assert read_api_keys(keys) == (KEY, "z" * 24, "y" * 30, "w" * 16)
    keys.write_text("short-key\n")
    with pytest.raises(ConfigError, match="key 1 is shorter") as err:
        read_api_keys(keys)
    assert "short-key" not in str(err.value)


class FlakyScorer:
    """Wraps a detector: ``mode`` ``raise`` / ``nan`` / ``block`` (until ``release``) / normal; records batch sizes."""

    def __init__(self, inner) -> None:
        self.inner, self.mode, self.batches = inner, "", []
        self.release, self.entered = threading.Event(), threading.Event()
        self.image_size_, self.forward_batch = inner.image_size_, inner.forward_batch

    def __getattr__(self, name):  # calibration_, normal_maps_, ...: the wrapped detector's
        return getattr(self.inner, name)

    def predict(self, images):
        self.batches.append(images.shape[0])
        if self.mode == "raise" or (images.amax(dim=(1, 2, 3)) == 0).any():  # an all-black image: poison
            raise RuntimeError("simulated out-of-memory")
        if self.mode == "block":
            self.entered.set()
            self.release.wait(10)
        scores, maps = self.inner.predict(images)
        if self.mode == "nan":
            scores = scores.clone()
            scores[0] = float("nan")
        return scores, maps


@pytest.fixture()
def flaky(model_dir):
    models = load_models([str(model_dir)])
    models[0].scorer.model = FlakyScorer(models[0].scorer.model)
    return models


def test_a_failing_model_gives_a_5xx_never_a_decision_and_the_service_goes_on(model_dir, tmp_path, flaky):
    good, scorer = sample_pngs()[0], flaky[0].scorer.model
    with client_for(model_dir, tmp_path, models=flaky) as client:
        for mode, words in [("raise", "simulated out-of-memory"), ("nan", "non-finite score")]:
            scorer.mode = mode
            r = post(client, good)
            assert r.status_code == 500 and r.json()["error"]["code"] == "model_failed", r.text
            assert words in r.json()["error"]["message"] and "decision" not in r.json()
        scorer.mode = ""
        assert post(client, good).status_code == 200
        scorer.mode = "nan"  # what predict writes for the same image and model: an error row, never a decision
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "part.png").write_bytes(good)
        row = predict_images(scorer, [tmp_path / "in"], tmp_path / "out", batch_size=1, overlays=False)[0]
        r = post(client, good)
        assert row["decision"] == "error" and r.status_code == 500
        assert r.json()["error"]["message"].split(": ", 1)[1] == row["error"].split(": ", 1)[1]  # but the name
        scorer.mode = ""
    lines = audit_lines(tmp_path / "audit.jsonl")
    assert [line["decision"] for line in lines] == ["error", "error", lines[2]["decision"], "error"]
    assert lines[2]["decision"] in ("normal", "anomalous")
    assert lines[0]["score"] is None and "simulated" in lines[0]["error"]


def test_full_queue_503_timeout_504_and_micro_batches(model_dir, tmp_path, flaky):
    good, scorer = sample_pngs()[0], flaky[0].scorer.model
    with (
        client_for(
            model_dir, tmp_path, models=flaky, max_queue=4, max_batch=8, max_wait_ms=50, request_timeout_s=20
        ) as client,
        ThreadPoolExecutor(8) as pool,
    ):
        scorer.mode = "block"
        first = pool.submit(post, client, good)
        assert scorer.entered.wait(10)  # one image is being scored, the worker is busy
        poison = png(torch.zeros(3, SIZE, SIZE))
        queued = [pool.submit(post, client, data) for data in (good, poison, good)]
        depth = client.app.state.service.batchers["padim"]
        deadline = time.monotonic() + 10
        while depth.depth < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = post(client, good)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        scorer.release.set()
        assert [f.result().status_code for f in [first, *queued]] == [200, 200, 500, 200]  # only the poison failed
        # the three queued while the first was scored went as one batch; it raised, so each went alone
        assert scorer.batches == [1, 3, 1, 1, 1]
        assert queued[1].result().json()["error"]["code"] == "model_failed"
        scorer.mode = ""
        alone = post(client, good).json()["score"]
        assert queued[0].result().json()["score"] == queued[2].result().json()["score"] == alone
        post_batch = [pool.submit(post, client, good) for _ in range(4)]  # batched: equal up to the last bits
        assert all(f.result().json()["score"] == pytest.approx(alone, rel=1e-5) for f in post_batch)
    with client_for(model_dir, tmp_path, models=flaky, request_timeout_s=0.3) as client:
        scorer.mode = "block"
        scorer.release.clear()
        r = post(client, good)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        scorer.release.set()
        scorer.mode = ""
        assert post(client, good).status_code == 200


def test_cli_refuses_what_it_cannot_serve_in_one_line(model_dir, tmp_path, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("served despite a bad start"))
    monkeypatch.delenv("SPOTDIFF_API_KEYS", raising=False)
    uncalibrated = tmp_path / "raw"
    PaDiM(arch="resnet18", d=8).fit(as_dataset(square_images(4, 32, seed=1))).save(uncalibrated)
    short = tmp_path / "short.txt"
    short.write_text("abc\n")
    capsys.readouterr()
    for argv, words in [
        ([str(tmp_path / "missing")], "model directory not found"),
        ([str(uncalibrated)], "no calibrated thresholds"),
        ([str(model_dir), "--host", "0.0.0.0"], "without an API key"),
        ([str(model_dir), "--api-key-file", str(short)], "shorter than 16"),
        ([str(model_dir), str(model_dir)], "two models are named 'padim'"),
        ([str(model_dir), "--backend", "onnxruntime"], "needs an ONNX file"),
        ([str(model_dir), "--backend", "onnxruntime", "--onnx", "a.onnx", "--onnx", "b.onnx"], "one file per model"),
        ([str(model_dir), "--backend", "onnxruntime", "--onnx", str(tmp_path / "none.onnx")], "ONNX file not found"),
        ([str(model_dir), "--max-batch", "0"], "max-batch must be >= 1"),
        ([str(model_dir), "--audit-log", str(tmp_path)], "is a directory"),
    ]:
        assert main(["--quiet", "serve", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (argv, err)


def test_audit_log_appends_whole_lines_after_a_cut_one(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b'{"request_id":"a"}\n{"request_id":"b","sco')  # a power loss cut the last line
    log = AuditLog(path)
    log.append([{"request_id": "c", "score": 1.5}, {"request_id": "d", "score": 2.5}])
    log.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"request_id":"a"}' and lines[1] == '{"request_id":"b","sco'  # kept as they were
    assert [json.loads(line)["request_id"] for line in lines[2:]] == ["c", "d"]
    assert "ends in a cut line" in capsys.readouterr().err
    again = AuditLog(path)
    with pytest.raises(ValueError):  # a non-finite number is never written as a score
        again.append([{"score": float("nan")}])
    again.close()
    assert path.read_text().count("\n") == 4
