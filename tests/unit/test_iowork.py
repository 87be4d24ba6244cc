"""The I/O-bound work behind the stack's tasks (tasks/iowork.py)."""

from __future__ import annotations

import pytest

from tasks import iowork


def test_io_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="url must be http"):
        iowork.fetch_url("file:///etc/passwd")
    with pytest.raises(ValueError, match="seconds must not be negative"):
        iowork.wait(-1)
    assert iowork.wait(0) == 0
