"""The service's settings, its API keys, and the rule that keeps a non-loopback bind closed."""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spotdiff.errors import ConfigError

API_KEY_ENV = "SPOTDIFF_API_KEYS"
"""Environment variable holding API keys, separated by commas."""
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching of the service (defaults are ours; docs/serve.md says why).

    Attributes:
        max_batch: most images per model batch.
        max_wait_ms: longest wait for a batch to fill after its first image arrived (milliseconds).
        max_queue: most predict requests in progress per model (body being read, decoding, queued or
            being scored); beyond it ``503`` + ``Retry-After``. Also bounds the bodies held in memory.
        max_body_bytes: largest request body (``413`` beyond).
        max_pixels: largest image, width x height, read from the header before decoding (``413`` beyond).
        request_timeout_s: longest wait for a score after the body was read (``504`` beyond).
        read_timeout_s: longest time to receive a body (``408`` beyond).
        retry_after_s: the ``Retry-After`` of a ``503``.
        decode_threads: threads decoding images (off the event loop).
        recent: decisions kept for the operator's page.
        api_keys: accepted bearer keys (empty: no key asked; only allowed on loopback).
        cors_origins: origins allowed by CORS (empty: CORS off).
    """

    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    request_timeout_s: float = 30.0
    read_timeout_s: float = 10.0
    retry_after_s: int = 1
    decode_threads: int = 2
    recent: int = 48
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in (
            "max_batch",
            "max_queue",
            "max_body_bytes",
            "max_pixels",
            "decode_threads",
            "recent",
            "retry_after_s",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"max-wait-ms must be in [0, 10000], got {self.max_wait_ms}")


def read_api_keys(
    key_file: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None
) -> tuple[str, ...]:
    """Keys from ``key_file`` (one per line; blank lines and ``#`` comments skipped) and from
    ``$SPOTDIFF_API_KEYS`` (comma-separated). Each must be at least ``MIN_KEY_LENGTH`` characters.

    Raises:
        ConfigError: the file cannot be read, or a key is too short (never quoting the key).
    """
    env = os.environ if environ is None else environ
    keys: list[str] = []
    sources: list[tuple[str, list[str]]] = []
    if key_file is not None:
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--api-key-file {path}: cannot read it ({exc.__class__.__name__})") from None
        lines = [ln.strip() for ln in text.splitlines()]
        sources.append((f"--api-key-file {path}", [ln for ln in lines if ln and not ln.startswith("#")]))
    if env.get(API_KEY_ENV):
        sources.append((f"${API_KEY_ENV}", [k.strip() for k in env[API_KEY_ENV].split(",") if k.strip()]))
    for where, found in sources:
        for i, key in enumerate(found, 1):
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
                raise ConfigError(
                    f"{where}: key {i} is shorter than {MIN_KEY_LENGTH} characters or holds "
                    'white space; use e.g. `python -c "import secrets; print(secrets.token_urlsafe(32))"`'
                )
        keys += found
    if key_file is not None and not keys:
        raise ConfigError(f"--api-key-file {key_file}: holds no key")
    return tuple(keys)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); anything else is exposed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: Sequence[str]) -> None:
    """Refuse a bind beyond loopback without an API key (ConfigError)."""
    if not is_loopback(host) and not api_keys:
        raise ConfigError(
            f"refusing to serve on {host} without an API key: give --api-key-file FILE or set "
            f"${API_KEY_ENV} (only loopback binds may run without one)"
        )


def key_matches(given: str, keys: Sequence[str]) -> bool:
    """Whether ``given`` is one of ``keys``, in time independent of where they differ (every key is compared)."""
    given_bytes = given.encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(given_bytes, key.encode("utf-8")) for key in keys]
    return any(matches)
