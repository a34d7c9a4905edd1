"""A fake downstream method for benchmark tests, and a driver that runs the CLI with it.

``python tests/_fake_bench.py ARGS...`` is ``spotdiff ARGS...`` with the downstream method ``fake``
registered: each cell appends ``start KEY PID`` and ``end KEY PID`` lines to ``$FAKE_LOG`` and
sleeps ``$FAKE_SECONDS`` in between, so a test can kill a process mid-cell and count the runs.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import numpy as np

from spotdiff.bench.cells import DOWNSTREAM
from spotdiff.bench.schema import CellOutput

METRICS = ("image_aupr", "image_auroc", "pixel_aupr", "pixel_auroc", "pixel_aupro")


def fake_metrics(key: str) -> dict[str, float]:
    """Deterministic per-cell numbers so a resumed or shared run can be compared with a clean one."""
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    return {m: float(rng.uniform(0.4, 1.0)) for m in METRICS}


def slow_runner(cell, config, work_dir) -> CellOutput:
    """Logs start and end of the cell around a sleep; the metrics depend on the cell key only."""
    log = os.environ["FAKE_LOG"]
    with open(log, "a") as fh:
        fh.write(f"start {cell.key} {os.getpid()}\n")
    time.sleep(float(os.environ.get("FAKE_SECONDS", "0.2")))
    with open(log, "a") as fh:
        fh.write(f"end {cell.key} {os.getpid()}\n")
    return CellOutput(fake_metrics(cell.key))


if __name__ == "__main__":
    from spotdiff.cli import main

    DOWNSTREAM["fake"] = slow_runner
    sys.exit(main(sys.argv[1:]))
