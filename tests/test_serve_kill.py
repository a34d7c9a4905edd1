"""`kill -9` under load: the audit log holds whole lines only, and a line for every `200` answered.

A real `spotdiff serve` process on loopback is loaded by 8 concurrent clients, killed with SIGKILL
mid-run, restarted on the same audit log, and asked again; then the log is checked against every
response received.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from detect_fakes import square_images
from test_serve import fit_model_dir, png

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two server starts in subprocesses (about 15 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, audit: Path, port: int, cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SPOTDIFF_THREADS": "1"}
    env.pop("SPOTDIFF_API_KEYS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "spotdiff",
            "--quiet",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--audit-log",
            str(audit),
            "--max-wait-ms",
            "2",
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail("server not ready within 90 s")


async def load(
    port: int, images: list[bytes], kill: subprocess.Popen[bytes] | None, kill_after: int, limit: int
) -> tuple[list[dict], int]:
    """8 clients post images until ``limit`` answers; SIGKILL ``kill`` once ``kill_after`` 200s arrived.
    Returns the JSON of every 200 received and the number of requests cut by the kill."""
    answers: list[dict] = []
    sent = cut = 0

    async def client(session: httpx.AsyncClient) -> None:
        nonlocal sent, cut
        while sent < limit:
            data = images[sent % len(images)]
            sent += 1
            try:
                r = await session.post(
                    f"http://127.0.0.1:{port}/v1/models/padim/predict",
                    content=data,
                    headers={"Content-Type": "image/png"},
                )
            except httpx.TransportError:
                cut += 1
                return  # the server is gone
            if r.status_code == 200:
                answers.append(r.json())
                if kill is not None and len(answers) == kill_after:
                    os.kill(kill.pid, signal.SIGKILL)

    async with httpx.AsyncClient(timeout=30) as session:
        await asyncio.gather(*(client(session) for _ in range(8)))
    return answers, cut


def test_sigkill_under_load_loses_no_answered_decision(tmp_path):
    model_dir = fit_model_dir(tmp_path / "padim")
    images = [png(x) for x in square_images(24, 48, defect=False, seed=11)]
    audit = tmp_path / "audit.jsonl"
    port = free_port()
    first = start_server(model_dir, audit, port, tmp_path)
    try:
        before, cut = asyncio.run(load(port, images, first, kill_after=30, limit=400))
        assert first.wait(10) == -signal.SIGKILL
    finally:
        first.kill()
    assert len(before) >= 30 and cut >= 1  # killed mid-run: requests were in flight
    lines_at_kill = audit.read_bytes().count(b"\n")

    second = start_server(model_dir, audit, port, tmp_path)
    try:
        after, _ = asyncio.run(load(port, images, None, kill_after=0, limit=16))
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    assert len(after) == 16

    raw = audit.read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.decode().splitlines()]  # every line whole
    by_id = {line["request_id"]: line for line in lines}
    for answer in [*before, *after]:
        line = by_id[answer["request_id"]]  # every 200 is in the log ...
        assert line["image_sha256"] == answer["image_sha256"] and line["score"] == answer["score"]
        assert line["decision"] == answer["decision"] and line["model_fingerprint"] == answer["model_fingerprint"]
    # ... the lines written before the kill were kept, and the restart appended after them
    assert len(lines) == lines_at_kill + 16
    assert {a["request_id"] for a in after} == {line["request_id"] for line in lines[lines_at_kill:]}
