"""Shared fixtures. Data from ``../shared`` (beside the project root) is read in place, never copied."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# `spotdiff.cli.main` sets torch's thread count; tests (and their subprocesses) keep one thread each
os.environ.setdefault("SPOTDIFF_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_VISA = SHARED / "visa"
SPLIT_CSV_DIR = SHARED_VISA / "split_csv"
ID2CLASS_JSON = SHARED_VISA / "id2class.json"
MAGNETIC_TILE = SHARED / "realdata" / "magnetic_tile"


def _session_quiet() -> bool:
    from spotdiff.progress import is_quiet

    return is_quiet()


_QUIET_AT_START = _session_quiet()  # $SPOTDIFF_QUIET as the test session found it


def _install_cli_log_handler() -> None:
    """Library messages reach stderr as under the CLI (tests call library functions directly and
    read their lines with capsys; pytest's own root handlers would otherwise keep them off stderr)."""
    from spotdiff.progress import install_stderr_handler

    install_stderr_handler()


_install_cli_log_handler()


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Seed torch, keep one intra-op thread per xdist worker (2-core CI machine), and start every
    test with the global ``--quiet`` flag as the session began, whatever an in-process
    ``main(["--quiet", ...])`` or a module-scoped fixture left set."""
    from spotdiff.progress import set_quiet

    set_quiet(_QUIET_AT_START)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    set_quiet(_QUIET_AT_START)


@pytest.fixture(scope="session")
def visa_split_dir() -> Path:
    """The official VisA split CSVs from ../shared/visa/split_csv, or skip with a message."""
    if not (SPLIT_CSV_DIR / "1cls.csv").is_file():
        pytest.skip(f"official VisA split CSVs not found at {SPLIT_CSV_DIR}")
    return SPLIT_CSV_DIR


@pytest.fixture(scope="session")
def visa_id2class() -> Path:
    """The official id2class.json from ../shared/visa, or skip with a message."""
    if not ID2CLASS_JSON.is_file():
        pytest.skip(f"official VisA id2class.json not found at {ID2CLASS_JSON}")
    return ID2CLASS_JSON
