"""No worker traceback goes unnoticed: each one a test did not declare fails that test.

Tests that expect a worker to log a traceback (bad input, a killed process)
declare it with ``@pytest.mark.worker_traceback("PayloadTooLarge", ...)``: each
string must then appear in a traceback logged during the test, and every
traceback must contain one of them. ``required=False`` allows them without
requiring them, for what Celery logs only sometimes (a lost broker connection). The integration tier reads the log files of
the workers it started (:data:`WATCHED`); the compose tier reads
``docker compose logs`` of its running stacks. A traceback logged just after a
test ends is blamed on the next one: the run fails either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from tests.support import wait_for

MARKER = "worker_traceback"
START = "Traceback (most recent call last)"
CHAINED = re.compile(r"(another exception occurred|direct cause of the following exception):\s*$")
EXPECTED_WAIT_SECONDS = 20
LOST_BROKER = pytest.mark.worker_traceback(
    "connection_errors",
    "ConnectionError",
    "Connection refused",
    "Connection closed",
    required=False,
)
"""Losing Redis, Celery and kombu log tracebacks of it or not, as timing has it (and
Celery's Gossip, restarted, fails on a connection already gone: ``conn.connection_errors``):
allowed, not required."""
"""How long a test's declared traceback may take to reach the log after the test."""
WATCHED: list[Path] = []
"""Log files of the worker processes the integration tier started."""

Reader = Callable[[], str]
"""What a log source gained since the reader was made."""


def expected(item: pytest.Item) -> tuple[tuple[str, ...], bool]:
    """The strings ``item`` declares, and whether each must appear."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return (), False
    return tuple(marker.args), bool(marker.kwargs.get("required", True))


def blocks(text: str) -> list[str]:
    """Each traceback in ``text`` (a chain of them counts as one), up to the next one."""
    found: list[str] = []
    for part in text.split(START)[1:]:
        if found and CHAINED.search(found[-1]):
            found[-1] += START + part
        else:
            found.append(START + part)
    return found


def unexpected(text: str, patterns: Iterable[str]) -> list[str]:
    """The tracebacks in ``text`` that contain none of ``patterns``."""
    patterns = tuple(patterns)
    return [block for block in blocks(text) if not any(p in block for p in patterns)]


def check(item: pytest.Item, new_text: Callable[[], str]) -> None:
    """Fail ``item`` if the logs it produced (``new_text``) hold a traceback it did not
    declare, or lack one it declared (waited for, so a late line still counts)."""
    patterns, required = expected(item)

    def declared_all_logged() -> str | None:
        text = new_text()
        logged = "".join(blocks(text))
        return text if all(p in logged for p in patterns) else None

    what = f"the worker tracebacks {item.nodeid} declares ({', '.join(patterns)})"
    text = wait_for(declared_all_logged, EXPECTED_WAIT_SECONDS, what) if required else new_text()
    stray = unexpected(text, patterns)
    if stray:
        shown = "\n".join(block[:3000] for block in stray[:3])
        pytest.fail(
            f"a worker logged {len(stray)} traceback(s) no test declared "
            f"(@pytest.mark.{MARKER}):\n{shown}",
            pytrace=False,
        )


class LogTail:
    """What the watched log files gained since this object was made."""

    def __init__(self) -> None:
        self.offsets = {path: _size(path) for path in WATCHED}

    def __call__(self) -> str:
        parts = []
        for path in list(WATCHED):
            with path.open("rb") as log:
                log.seek(self.offsets.get(path, 0))
                parts.append(log.read().decode(errors="replace"))
        return "\n".join(parts)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


SOURCES: list[Callable[[], Reader]] = [LogTail]
"""Where worker logs are read: the watched files, and each running compose stack."""


def mark() -> Reader:
    """A reader of everything every source logs from now on."""
    readers = [source() for source in list(SOURCES)]
    return lambda: "\n".join(read() for read in readers)
