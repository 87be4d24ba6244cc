"""A worker's shutdown (taskstack/worker/shutdown.py): it never hangs."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

import pytest

from taskstack import names
from taskstack.worker.shutdown import EXIT_WEDGED, SHUTDOWN_DEADLINE_SECONDS, SOFT_SHUTDOWN_SECONDS
from tests.support import Worker, child_pids

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_wedged_shutdown_still_ends_the_process(start_worker: Callable[..., Worker]) -> None:
    """Pool children that never exit would hold the worker's teardown forever."""
    worker = start_worker(names.CPU_QUEUE)
    stuck = child_pids(worker.service.process.pid)
    assert stuck, "the prefork worker has no children"
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    try:
        worker.service.process.send_signal(signal.SIGTERM)
        deadline = SOFT_SHUTDOWN_SECONDS + SHUTDOWN_DEADLINE_SECONDS
        status = worker.service.process.wait(timeout=deadline + 15)
    finally:
        for pid in stuck:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert status == EXIT_WEDGED
    assert f"shutdown still running after {deadline:.0f} s" in worker.service.log_text()
