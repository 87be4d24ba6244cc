"""I/O-bound work: the threads worker overlaps many of these at once."""

from __future__ import annotations

import hashlib
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit


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
        body = response.read()
        return Fetched(url, response.status, len(body), hashlib.sha256(body).hexdigest())


def wait(seconds: float) -> float:
    """Block for ``seconds`` without using the CPU, as a slow remote call would."""
    if seconds < 0:
        raise ValueError(f"seconds must not be negative, got {seconds}")
    time.sleep(seconds)
    return seconds
