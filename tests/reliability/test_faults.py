"""Faults during ``spotdiff prepare`` (kill -9, disk full, read-only output, things in the way) and
read-only output for ``predict`` and ``test``.

Promise: a file at a final output path always holds its complete, correct bytes; an interrupted
run leaves at most hidden ``.<name>.tmp-*`` files, which readers ignore and the next run deletes;
a rerun gives output identical to a clean run; earlier results survive a failed run.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    OBJECT,
    assert_clean_error,
    cli_command,
    cli_env,
    is_temp_name,
    noise_jpeg,
    run_cli,
    run_cli_many,
    simple_tree,
    tree_files,
)

from spotdiff.cli import main
from spotdiff.data import open_dataset
from spotdiff.data.prepare import prepare_visa
from spotdiff.progress import set_quiet


@pytest.fixture(autouse=True)
def _quiet():
    set_quiet(True)
    yield
    set_quiet(False)


def _count_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _assert_no_partial_files(out: Path, expected: dict[str, bytes]) -> None:
    """Every non-temporary file under ``out`` is an expected output with its exact final bytes."""
    for rel, data in tree_files(out).items():
        if is_temp_name(rel):
            continue
        assert rel in expected, f"unexpected file {rel}"
        assert data == expected[rel], f"{rel} is at its final path with wrong (partial?) content"


def test_kill_9_during_prepare_then_rerun_equals_a_clean_run(tmp_path):
    root = simple_tree(tmp_path / "visa", n_train=1200, n_good=150, n_bad=150, size=32)
    clean = tmp_path / "clean"
    prepare_visa(root, "1cls", clean)
    expected = tree_files(clean / "1cls")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli_command("prepare", "--visa-root", root, "--split", "1cls", "--out", out, "--io-threads", "2"),
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while _count_files(out) < 60 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"prepare ended before the kill: {proc.stderr.read()[-2000:]!r}"
    written = tree_files(out / "1cls")
    done = [rel for rel in written if not is_temp_name(rel)]
    assert 0 < len(done) < len(expected), f"kill landed outside the write phase ({len(done)} files)"
    _assert_no_partial_files(out / "1cls", expected)

    # Readers never see the leftovers: the prepared folder opens with only complete images.
    report = prepare_visa(root, "1cls", out)
    assert report.skipped >= len(done) and report.written + report.skipped == len(expected)
    assert tree_files(out / "1cls") == expected  # byte for byte, and no temp file left


def test_rerun_deletes_stale_temp_files_and_readers_ignore_them(tmp_path):
    root = simple_tree(tmp_path / "visa", n_train=3, n_good=1, n_bad=1)
    out = tmp_path / "out"
    prepare_visa(root, "1cls", out)
    expected = tree_files(out / "1cls")
    good = out / "1cls" / OBJECT / "train" / "good"
    stale = good / ".00000.JPG.tmp-k1ll3d"
    stale.write_bytes(b"half a JPE")
    mask_stale = out / "1cls" / OBJECT / "ground_truth" / "bad" / ".00000.png.tmp-x"
    mask_stale.write_bytes(b"\x89PN")
    users = [good / ".keep", good / "notes.tmp-1", good / ".other.JPG.tmp-1"]  # not temp files of our outputs
    for p in users:
        p.write_bytes(b"user file")
    assert len(open_dataset(out, OBJECT, subset="train", image_size=8)) == 3  # temp files are not images
    report = prepare_visa(root, "1cls", out)
    assert report.written == 0
    assert not stale.exists() and not mask_stale.exists()
    assert all(p.read_bytes() == b"user file" for p in users)
    for p in users:
        p.unlink()
    assert tree_files(out / "1cls") == expected


def _limit_file_size(max_bytes: int):
    def preexec() -> None:
        # With SIGXFSZ ignored, a write past the limit fails with EFBIG ("File too large"),
        # the same OSError path as ENOSPC on a full disk.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return preexec


def _grow_sources(root: Path, names: list[str]) -> dict[str, bytes]:
    """Replace some train images by larger ones; returns their new bytes by output-relative path."""
    new = {}
    for i, name in enumerate(names):
        data = noise_jpeg(500 + i, size=160)
        (root / OBJECT / "Data" / "Images" / "Normal" / name).write_bytes(data)
        new[f"{OBJECT}/train/good/{name}"] = data
    return new


def test_disk_full_gives_a_clear_error_and_keeps_earlier_results(tmp_path):
    root = simple_tree(tmp_path / "visa", n_train=6, n_good=2, n_bad=2, size=32)
    out = tmp_path / "out"
    prepare_visa(root, "1cls", out)
    before = tree_files(out / "1cls")
    assert max(len(b) for b in before.values()) < 8_000
    new = _grow_sources(root, ["00001.JPG", "00003.JPG"])
    assert min(len(b) for b in new.values()) > 16_000
    proc = run_cli("prepare", "--visa-root", root, "--split", "1cls", "--out", out, preexec_fn=_limit_file_size(16_000))
    assert_clean_error(proc, "File too large", "1cls.csv row")
    assert any(str(out / "1cls" / rel) in proc.stderr for rel in new)
    after = tree_files(out / "1cls")
    assert not [rel for rel in after if is_temp_name(rel)], "a failed write left its temp file"
    assert after == before, "a failed run changed earlier results"
    # Space again: the rerun completes.
    report = prepare_visa(root, "1cls", out)
    assert report.images_written == 2 and tree_files(out / "1cls") == {**before, **new}


def _read_only_prefix(folder: Path) -> list[str]:
    """Run a command in a private mount namespace where ``folder`` is a read-only bind mount."""
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, str(folder)]


def test_read_only_output_gives_a_clear_error_and_changes_nothing(tmp_path):
    # chmod cannot stop root (the test user here), so the output is a read-only bind mount.
    probe = tmp_path / "probe"
    probe.mkdir()
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            [*_read_only_prefix(probe), "sh", "-c", '! touch "$0/x"', str(probe)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot make a read-only bind mount here (unshare/mount not permitted)")
    root = simple_tree(tmp_path / "visa", n_train=4, n_good=1, n_bad=1)
    out = tmp_path / "out"
    prepare_visa(root, "1cls", out)
    before = tree_files(out)
    _grow_sources(root, ["00002.JPG"])
    proc = run_cli("prepare", "--visa-root", root, "--split", "1cls", "--out", out, prefix=_read_only_prefix(out))
    assert_clean_error(proc, "Read-only file system", str(out / "1cls"))
    assert tree_files(out) == before


@pytest.mark.parametrize("obstacle", ["out_is_a_file", "folder_is_a_file", "output_is_a_folder"])
def test_something_in_the_way_is_a_clear_error(obstacle, tmp_path, capsys):
    root = simple_tree(tmp_path / "visa", n_train=2, n_good=1, n_bad=1)
    out = tmp_path / "out"
    blocker = {
        "out_is_a_file": out,
        "folder_is_a_file": out / "1cls" / OBJECT / "train",
        "output_is_a_folder": out / "1cls" / OBJECT / "train" / "good" / "00001.JPG",
    }[obstacle]
    blocker.parent.mkdir(parents=True, exist_ok=True)
    if obstacle == "output_is_a_folder":
        (blocker / "inner").mkdir(parents=True)
    else:
        blocker.write_bytes(b"in the way")
    assert main(["--quiet", "prepare", "--visa-root", str(root), "--split", "1cls", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err, err


def test_read_only_output_stops_predict_and_test_with_a_clear_error(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    if (
        shutil.which("unshare") is None
        or subprocess.run(
            [*_read_only_prefix(probe), "sh", "-c", '! touch "$0/x"', str(probe)], capture_output=True
        ).returncode
    ):
        pytest.skip("cannot make a read-only bind mount here (unshare/mount not permitted)")
    root = simple_tree(tmp_path / "visa", n_train=4, n_good=1, n_bad=1)
    model = tmp_path / "model"
    assert (
        main(
            [
                "--quiet",
                "fit",
                "--model",
                "padim",
                "--data",
                str(root),
                "--object",
                OBJECT,
                "--arch",
                "resnet18",
                "--image-size",
                "32",
                "--d",
                "16",
                "--out",
                str(model),
            ]
        )
        == 0
    )
    results = tmp_path / "results"
    results.mkdir()
    # predict into a fresh folder and test into the read-only folder itself.
    codes, stderr = run_cli_many(
        [
            ["predict", model, root / OBJECT, "--out", results / "pred"],
            ["test", model, "--data", root, "--object", OBJECT, "--out", results],
        ],
        prefix=_read_only_prefix(results),
    )
    assert codes == [2, 2] and "Read-only file system" in stderr, stderr
    assert str(results / "pred") in stderr and f"{results}" in stderr
    assert list(results.iterdir()) == []


def test_atomic_writers_turn_os_errors_into_output_errors_naming_the_file(tmp_path):
    from spotdiff.errors import OutputError, SpotdiffError
    from spotdiff.files import save_safetensors_atomic, torch_save_atomic, write_text_atomic

    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    for write in (
        lambda d: write_text_atomic(d, "x"),
        lambda d: torch_save_atomic(d, {"a": 1}),
        lambda d: save_safetensors_atomic(d, {}),
    ):
        dest = blocker / "out.bin"  # its folder is a file: ENOTDIR / EEXIST
        with pytest.raises(OutputError, match=rf"{dest}: cannot write") as info:
            write(dest)
        assert isinstance(info.value, SpotdiffError) and isinstance(info.value, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]
