"""Several processes sharing one benchmark ``--out``: the config record, ``--shard I/N`` and the claims.

``<out>/benchmark.json`` holds the config hash every process must agree on (:func:`bind_out`), and
every cell (and pre-training block) runs under an exclusive, heartbeat-kept claim in ``<out>/claims``
(:class:`Claims`), so each runs once and a killed process's cell is taken over
(:func:`work_through`). See docs/report.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spotdiff import __version__
from spotdiff.bench.schema import BenchmarkConfig, config_dict
from spotdiff.errors import ConfigError
from spotdiff.files import create_text_exclusive

log = logging.getLogger(__name__)

CLAIM_DIR = "claims"
RECORD_NAME = "benchmark.json"  # the config hash every process sharing the folder must match
SHARDS_NAME = "shards.json"  # the shard count of ``--shard I/N`` processes
LEASE_SECONDS = 300.0
"""A claim held by a process on another machine is taken over when its heartbeat (the claim file's
mtime, touched every ``lease / 10`` s, at most 30 s) has not moved for this long, as seen by the
process that waits. Claims of this machine are taken over as soon as their process is gone."""
POLL_SECONDS = 5.0  # how often (at most) a process waiting for other processes' cells looks again


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N``; None stays None."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ConfigError(f"--shard {text!r}: expected I/N, e.g. 1/4 (this process runs shard I of N)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise ConfigError(f"--shard {text}: I must be in 1..N with N >= 1, got I={index}, N={count}")
    return index, count


def config_hash(config: BenchmarkConfig) -> str:
    """SHA-256 of the config as plain data, without ``device`` (each process may use its own GPU)."""
    data = config_dict(config)
    data.pop("device")
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); delete it when no process is using its folder") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object; delete it when no process is using its folder")
    return data


def bind_out(config: BenchmarkConfig, out: Path) -> None:
    """Record the config hash in ``out/benchmark.json`` (first process), or refuse another config's ``out``."""
    digest = config_hash(config)
    data = config_dict(config)
    data.pop("device")
    path = out / RECORD_NAME
    create_text_exclusive(
        path,
        json.dumps({"config_hash": digest, "config": data, "spotdiff_version": __version__}, indent=2, sort_keys=True)
        + "\n",
    )
    stored = read_json_object(path)
    if stored.get("config_hash") != digest:
        stored_config = stored.get("config")
        old = stored_config if isinstance(stored_config, dict) else {}
        keys = sorted(k for k in set(old) | set(data) if old.get(k) != data.get(k))
        raise ConfigError(
            f"{out}: holds a benchmark of another configuration (config hash "
            f"{str(stored.get('config_hash'))[:12]} in {path}, this one {digest[:12]}; they differ in "
            f"{keys}); use another --out, or delete {path} when no process is using {out} "
            "(finished cells are kept where their fingerprint still matches)"
        )


def bind_shards(out: Path, shard: tuple[int, int]) -> None:
    """Record the shard count in ``out/shards.json`` (first ``--shard`` process), or refuse another count."""
    index, count = shard
    path = out / SHARDS_NAME
    create_text_exclusive(path, json.dumps({"count": count}) + "\n")
    stored = read_json_object(path).get("count")
    if stored != count:
        raise ConfigError(
            f"--shard {index}/{count}: {out} is split into {stored} shards ({path}); use --shard "
            f"I/{stored}, or delete {path} when no process is using {out}"
        )


def _process_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of a live process on Linux; None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this machine (and pid namespace) still runs; ``start`` guards pid reuse."""
    if Path("/proc/self/stat").exists():
        now = _process_start(pid)
        return now is not None and (start is None or now == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """Exclusive claims on units of work (cells, pre-training blocks, shards) in ``out/claims``.

    A claim is the file ``<key>.<generation>.claim``, created with an exclusive hard link (see
    :func:`spotdiff.files.create_text_exclusive`) and holding the owner's host, pid namespace, pid,
    process start time and a random token. While held, a heartbeat thread touches it every
    ``heartbeat`` seconds. A claim is *stale* when its process is gone (same machine and pid
    namespace) or, for other machines, when its mtime has not moved for ``lease`` seconds of the
    observer's clock (so clocks need not agree). A stale claim of generation ``g`` is taken over by
    creating generation ``g + 1``: only one process can, so a dead process's cell is re-run once.
    Before writing a result the owner checks that its claim is still the latest (:meth:`owns`); an
    owner that was presumed dead (no heartbeat for ``lease`` seconds) discards its result.
    """

    def __init__(self, folder: Path, lease: float = LEASE_SECONDS) -> None:
        if not lease > 0:
            raise ConfigError(f"--lease must be > 0 seconds, got {lease}")
        self.folder = folder
        self.lease = float(lease)
        self.heartbeat = min(30.0, self.lease / 10)
        self.me = {
            "host": socket.gethostname(),
            "pidns": _pid_namespace(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
        }
        self.held: dict[str, tuple[Path, str]] = {}
        self._seen: dict[Path, tuple[int, str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading
    def _generations(self, key: str) -> list[tuple[int, Path]]:
        found = []
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    stem, dot, gen = entry.name.removesuffix(".claim").rpartition(".")
                    if entry.name.endswith(".claim") and dot and stem == key and gen.isdigit():
                        found.append((int(gen), Path(entry.path)))
        except FileNotFoundError:
            pass
        return sorted(found)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _local(self, holder: Mapping[str, Any]) -> bool:
        return holder.get("host") == self.me["host"] and holder.get("pidns") == self.me["pidns"]

    def _stale(self, path: Path, holder: Mapping[str, Any]) -> bool:
        if self._local(holder) and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"], holder.get("start"))
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return False  # released meanwhile: look again later
        token, now = str(holder.get("token")), time.monotonic()
        seen = self._seen.get(path)
        if seen is None or seen[:2] != (mtime, token):
            self._seen[path] = (mtime, token, now)
            return False
        return now - seen[2] >= self.lease

    @staticmethod
    def describe(holder: Mapping[str, Any]) -> str:
        return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"

    # -- claiming
    def claim(self, key: str) -> str | None:
        """Claim ``key``: None when this process now holds it, else a description of the holder."""
        gens = self._generations(key)
        gen = 1
        if gens:
            last, path = gens[-1]
            holder = self._read(path)
            if not self._stale(path, holder):
                return self.describe(holder)
            gen = last + 1
        token = uuid.uuid4().hex
        path = self.folder / f"{key}.{gen}.claim"
        record = {**self.me, "token": token, "key": key, "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        if not create_text_exclusive(path, json.dumps(record, sort_keys=True) + "\n"):
            return self.describe(self._read(path))
        for _, old in gens:  # the stale predecessors (their owners see that they lost)
            old.unlink(missing_ok=True)
        if gens:
            log.info(f"{key}: took over the stale claim of {self.describe(self._read(gens[-1][1]) or holder)}")
        with self._lock:
            self.held[key] = (path, token)
        self._start_heartbeat()
        return None

    def owns(self, key: str) -> bool:
        """True while this process's claim on ``key`` is the latest one and still carries its token."""
        path, token = self.held[key]
        gens = self._generations(key)
        return bool(gens) and gens[-1][1] == path and self._read(path).get("token") == token

    def release(self, key: str) -> None:
        """Give up ``key`` (its claim file is removed if it is still this process's)."""
        with self._lock:
            path, token = self.held.pop(key)
        if self._read(path).get("token") == token:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        """Release every claim and stop the heartbeat."""
        for key in list(self.held):
            self.release(key)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _start_heartbeat(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="spotdiff-claims", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with self._lock:
                paths = [path for path, _ in self.held.values()]
            for path in paths:
                try:
                    os.utime(path)
                except OSError:
                    pass  # released meanwhile, or taken over


def work_through(
    claims: Claims, units: Sequence[tuple[str, Callable[[], bool], Callable[[], bool]]], what: str, poll: float
) -> list[str]:
    """Run every ``(key, is_done, run)`` unit not yet done, each under its claim; wait for units that
    other processes hold (taking over stale claims). ``run`` returns False when its result was
    discarded (the claim was taken over meanwhile). Returns the keys run (and kept) here."""
    todo = [u for u in units if not u[1]()]
    ran: list[str] = []
    waited = False
    while todo:
        blocked = []
        for key, is_done, run in todo:
            if is_done():
                continue
            holder = claims.claim(key)
            if holder is not None:
                blocked.append((key, is_done, run, holder))
                continue
            try:
                if not is_done() and run():  # is_done: finished by another process before the claim
                    ran.append(key)
            finally:
                claims.release(key)
        todo = [(key, is_done, run) for key, is_done, run, _ in blocked if not is_done()]
        if todo:
            if not waited:
                first = next(b for b in blocked if b[0] == todo[0][0])
                log.info(f"waiting for {len(todo)} {what} run by other processes (e.g. {first[0]}: {first[3]})")
            waited = True
            time.sleep(poll)
    return ran
