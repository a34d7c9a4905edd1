"""The audit log: one JSON line per answered image, on disk before the answer leaves.

Lines of a batch are appended with one ``write`` on a file opened with ``O_APPEND`` and made durable
with ``fsync`` before any response of that batch is sent, so a ``kill -9`` (or a crash) leaves only
whole lines, and every request that got a ``200`` has its line. The file is never truncated or
rewritten; a line cut by a power loss before a restart is closed with a newline first, so lines
written afterwards stay whole (the cut line is reported once and left as it is).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spotdiff.errors import ConfigError

log = logging.getLogger(__name__)


def utc_now() -> str:
    """ISO 8601 UTC time with microseconds, e.g. ``2026-12-03T09:00:00.123456Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Append-only JSON-lines file (see module docstring); thread-safe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"--audit-log {self.path}: is a directory, not a file")
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise ConfigError(f"--audit-log {self.path}: cannot open for appending ({exc.strerror})") from exc
        self._lock = threading.Lock()
        if self._ends_mid_line():
            # a damaged audit trail is said even under --quiet (like the images skipped by --skip-bad)
            log.warning(f"warning: {self.path} ends in a cut line (a power loss?); new lines start after it")
            self._write(b"\n")
        self.lines_written = 0

    def _ends_mid_line(self) -> bool:
        with open(self.path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` as JSON lines in one write and fsync them (raises ``OSError`` on failure)."""
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":"), allow_nan=False) + "\n" for r in records).encode()
        with self._lock:
            self._write(data)
            self.lines_written += len(records)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
