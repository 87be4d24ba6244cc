"""I/O-bound work: the threads worker overlaps many of these at once."""

from __future__ import annotations

import hashlib
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_RESPONSE_BYTES = 64 * 1024 * 1024
"""Largest body :func:`fetch_url` reads: it is hashed as it arrives, a piece at a time,
so this bounds the time and traffic of one call rather than its memory."""
CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Fetched:
    url: str
    status: int
    size: int
    sha256: str


def fetch_url(url: str, timeout: float = 10.0) -> Fetched:
    """GET ``url`` and describe the body: status, size and SHA-256."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"url must be http:// or https://, got {url!r}")
    with urllib.request.urlopen(url, timeout=timeout) as response:
        announced = int(response.headers.get("Content-Length") or 0)
        _within(announced, url)
        digest, size = hashlib.sha256(), 0
        while chunk := response.read(CHUNK_BYTES):
            size += len(chunk)
            _within(size, url)
            digest.update(chunk)
        return Fetched(url, response.status, size, digest.hexdigest())


def wait(seconds: float) -> float:
    """Block for ``seconds`` without using the CPU, as a slow remote call would."""
    if seconds < 0:
        raise ValueError(f"seconds must not be negative, got {seconds}")
    time.sleep(seconds)
    return seconds


def _within(size: int, url: str) -> None:
    if size > MAX_RESPONSE_BYTES:
        raise ValueError(
            f"the response of {url} must be at most {MAX_RESPONSE_BYTES:,} bytes, "
            f"got {size:,} or more"
        )
