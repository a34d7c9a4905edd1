"""Hostile files: pickle payloads never run, archives are never unpacked, CSV paths never escape
the dataset root, decompression bombs are refused with bounded memory."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_helpers import (
    OBJECT,
    Payload,
    anomaly_row,
    noise_jpeg,
    normal_row,
    png_bytes,
    run_python,
    simple_tree,
    write_csv,
    write_tree,
)

from spotdiff.cli import main
from spotdiff.data import open_dataset, read_split_csv
from spotdiff.data.io import load_image, load_mask
from spotdiff.data.prepare import prepare_visa
from spotdiff.errors import DataError, WeightsError
from spotdiff.models import build_backbone, read_weights_file

# torch warns that our payload pickles use protocol 4; the refusal is what is tested.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def _tiny_state() -> dict[str, torch.Tensor]:
    return {"conv1.weight": torch.zeros(2, 3, 1, 1)}


def _payload_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    """Weights files that would run ``Payload`` if unpickled, in every container we read."""
    files = {}
    files["legacy_pickle.pth"] = tmp_path / "legacy_pickle.pth"
    files["legacy_pickle.pth"].write_bytes(pickle.dumps({"conv1.weight": Payload(marker)}))
    files["zip_state_dict.pth"] = tmp_path / "zip_state_dict.pth"
    torch.save({"state_dict": {**_tiny_state(), "evil": Payload(marker)}}, files["zip_state_dict.pth"])
    files["zip_top_level.pt"] = tmp_path / "zip_top_level.pt"
    torch.save(Payload(marker), files["zip_top_level.pt"])
    files["pickle_named.safetensors"] = tmp_path / "pickle_named.safetensors"
    files["pickle_named.safetensors"].write_bytes(pickle.dumps(Payload(marker)))
    return files


def test_weights_files_with_pickle_payloads_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    for name, path in _payload_files(tmp_path, marker).items():
        assert not marker.exists(), "torch.save itself must not run the payload"
        with pytest.raises(WeightsError, match=path.name):
            read_weights_file(path)
        with pytest.raises(WeightsError, match=path.name):
            build_backbone("resnet18", weights=path)
        assert not marker.exists(), f"{name}: loading ran the pickle payload"


def test_corrupt_and_lying_safetensors_are_refused(tmp_path):
    # A header that claims 2**40 bytes, a truncated file, and a header pointing past the end.
    huge = tmp_path / "huge_header.safetensors"
    huge.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}})
    past_end = tmp_path / "past_end.safetensors"
    past_end.write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 16)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (huge, past_end, empty):
        with pytest.raises(WeightsError, match=path.name):
            read_weights_file(path)


def test_weights_with_non_tensor_values_are_refused(tmp_path):
    # Plain containers pass weights_only unpickling but are not a state_dict.
    path = tmp_path / "not_tensors.pth"
    torch.save({"conv1.weight": [1, 2, 3]}, path)
    with pytest.raises(WeightsError, match="not a state_dict of tensors"):
        read_weights_file(path)


def _evil_tar(tmp_path: Path) -> Path:
    """A tar holding a VisA-looking tree plus members that escape upwards and to an absolute path."""
    src = simple_tree(tmp_path / "visa_src", n_train=2, n_good=1, n_bad=1)
    tar = tmp_path / "visa.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(src, arcname="visa")
        for name in ("../escaped.txt", "/tmp/spotdiff_reliability_absolute_escape.txt"):
            data = b"escaped"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return tar


def test_prepare_refuses_an_archive_and_unpacks_nothing(tmp_path, capsys):
    tar = _evil_tar(tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["--quiet", "prepare", "--visa-root", str(tar), "--split", "1cls", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(tar) in err and "never unpacks archives" in err
    with pytest.raises(DataError, match="archives are never unpacked"):
        open_dataset(tar, OBJECT)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no escaped.txt
    assert not (tmp_path.parent / "escaped.txt").exists()
    assert not Path("/tmp/spotdiff_reliability_absolute_escape.txt").exists()


def test_prepare_refuses_a_zip_too(tmp_path, capsys):
    zpath = tmp_path / "visa.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("../escaped.txt", "escaped")
    assert main(["--quiet", "prepare", "--visa-root", str(zpath), "--split", "1cls", "--out", str(tmp_path / "o")]) == 2
    assert "never unpacks archives" in capsys.readouterr().err
    assert not (tmp_path.parent / "escaped.txt").exists() and not (tmp_path / "o").exists()


@pytest.fixture
def traversal_root(tmp_path: Path) -> tuple[Path, Path]:
    """A VisA root beside an ``outside`` folder holding a secret image and mask."""
    root = simple_tree(tmp_path / "root", n_train=2, n_good=1, n_bad=1)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.JPG").write_bytes(noise_jpeg(99))
    (outside / "secret.png").write_bytes(png_bytes(np.ones((32, 32), np.uint8)))
    return root, outside


def _escape_rows(root: Path, outside: Path) -> dict[str, tuple[str, str, str, str]]:
    """CSV rows (split, label, image, mask) whose image or mask leaves the root, by kind."""
    (root / OBJECT / "Data" / "Images" / "Normal" / "link.JPG").symlink_to(outside / "secret.JPG")
    (root / OBJECT / "linked_dir").symlink_to(outside, target_is_directory=True)
    (root / OBJECT / "Data" / "Masks" / "Anomaly" / "link.png").symlink_to(outside / "secret.png")
    anomaly = f"{OBJECT}/Data/Images/Anomaly/00000.JPG"
    return {
        "dotdot": ("train", "normal", f"{OBJECT}/../../outside/secret.JPG", ""),
        "absolute": ("train", "normal", str(outside / "secret.JPG"), ""),
        "backslash_dotdot": ("train", "normal", f"{OBJECT}\\..\\..\\outside\\secret.JPG", ""),
        "file_symlink": ("train", "normal", f"{OBJECT}/Data/Images/Normal/link.JPG", ""),
        "dir_symlink": ("train", "normal", f"{OBJECT}/linked_dir/secret.JPG", ""),
        "mask_symlink": ("test", "anomaly", anomaly, f"{OBJECT}/Data/Masks/Anomaly/link.png"),
    }


def test_csv_paths_that_escape_the_root_are_refused_everywhere(traversal_root, tmp_path, capsys):
    root, outside = traversal_root
    for kind, (split, label, image, mask) in _escape_rows(root, outside).items():
        csv_path = write_csv(tmp_path / f"{kind}.csv", [(OBJECT, split, label, image, mask)])
        subset = split
        with pytest.raises(DataError, match=rf"{kind}\.csv row 2"):
            read_split_csv(csv_path, root=root)
        with pytest.raises(DataError, match=rf"{kind}\.csv row 2"):
            open_dataset(root, OBJECT, subset=subset, split_csv=csv_path)
        out = tmp_path / f"out_{kind}"
        with pytest.raises(DataError, match=rf"{kind}\.csv row 2"):
            prepare_visa(root, "1cls", out, split_csv=csv_path)
        assert not out.exists(), f"{kind}: prepare wrote output"
        code = main(
            [
                "--quiet",
                "prepare",
                "--visa-root",
                str(root),
                "--split",
                "1cls",
                "--split-csv",
                str(csv_path),
                "--out",
                str(out),
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and f"{kind}.csv row 2" in err, (kind, err)


def test_symlinks_that_stay_inside_the_root_are_allowed(tmp_path):
    root = simple_tree(tmp_path / "root", n_train=2, n_good=1, n_bad=1)
    normal = root / OBJECT / "Data" / "Images" / "Normal"
    (normal / "alias.JPG").symlink_to(normal / "00000.JPG")
    csv_path = write_csv(
        tmp_path / "ok.csv", [(OBJECT, "train", "normal", f"{OBJECT}/Data/Images/Normal/alias.JPG", "")]
    )
    ds = open_dataset(root, OBJECT, subset="train", split_csv=csv_path, image_size=16)
    assert ds[0]["image"].shape == (3, 16, 16)
    prepare_visa(root, "1cls", tmp_path / "out", split_csv=csv_path)
    assert (tmp_path / "out/1cls/obj/train/good/alias.JPG").read_bytes() == (normal / "00000.JPG").read_bytes()


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` RGB but holds only a few compressed rows."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + 3 * width) * 4, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


BOMB_SCRIPT = r"""
import json, resource
from spotdiff.cli import main
from spotdiff.data.io import load_image, load_mask
from spotdiff.errors import DataError
paths, prepare_args = ARGS
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss_mb()
errors = {}
for p in paths:
    for loader in (load_image, load_mask):
        try:
            loader(p)
            errors[p + ":" + loader.__name__] = None
        except DataError as exc:
            errors[p + ":" + loader.__name__] = str(exc)
code = main(prepare_args)
print(json.dumps({"errors": errors, "prepare_exit": code, "rss_growth_mb": rss_mb() - base}))
"""


def test_decompression_bombs_are_refused_with_bounded_memory(tmp_path):
    # 20000x20000 (PIL's hard limit) and 10000x10000 (between 1x and 2x, where PIL only warns):
    # decoded, each would need 1.2 GB / 300 MB; on disk they are a few hundred bytes.
    bombs = {}
    for w, h in ((20_000, 20_000), (10_000, 10_000)):
        bombs[(w, h)] = tmp_path / f"bomb_{w}x{h}.png"
        bombs[(w, h)].write_bytes(_png_with_declared_size(w, h))
        assert bombs[(w, h)].stat().st_size < 10_000
    root = tmp_path / "visa"
    rows = [
        normal_row("00000", noise_jpeg(0)),
        normal_row("bomb", bombs[(20_000, 20_000)].read_bytes(), suffix=".png"),
        anomaly_row("00001", noise_jpeg(1), mask=bombs[(10_000, 10_000)].read_bytes()),
    ]
    write_tree(root, rows)
    out = tmp_path / "out"
    args = (
        [str(p) for p in bombs.values()],
        ["--quiet", "prepare", "--visa-root", str(root), "--split", "1cls", "--out", str(out)],
    )
    proc = run_python(BOMB_SCRIPT.replace("ARGS", repr(args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, message in result["errors"].items():
        assert message is not None, f"{key} was decoded"
        assert key.split(":")[0] in message and "decompression bomb" in message, message
    assert result["prepare_exit"] == 2
    assert "bomb.png" in proc.stderr and "00001.png" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    assert result["rss_growth_mb"] < 200, f"memory grew by {result['rss_growth_mb']:.0f} MB"


def test_bomb_check_does_not_refuse_large_normal_images(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((16, 4000, 3), np.uint8)).save(path)
    assert load_image(path).size == (4000, 16)
    assert load_mask(path).shape == (16, 4000)
