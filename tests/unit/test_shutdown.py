"""Stopping a worker (taskstack/worker/shutdown.py) against what Docker allows it.

compose.yaml and stack.yaml give the workers a ``stop_grace_period``: Docker
SIGKILLs a worker still running after it. It must leave room for the whole
shutdown, soft shutdown and teardown deadline, so that no worker is killed while
it hands tasks back.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from taskstack.worker.shutdown import (
    SHUTDOWN_DEADLINE_SECONDS,
    SOFT_SHUTDOWN_SECONDS,
    STOP_GRACE_PERIOD_SECONDS,
)
from tests.support.deployment import DEPLOYMENT_FILES, flow_list, yaml_services


def seconds(duration: object) -> int:
    """A Compose duration in whole seconds, as these files write it (``40s``)."""
    assert isinstance(duration, str), duration
    match = re.fullmatch(r"(\d+)s", duration.strip())
    assert match, f"not a duration in seconds: {duration!r}"
    return int(match[1])


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda path: path.name)
def test_workers_stop_grace_period_is_the_shutdown_modules(path: Path) -> None:
    workers = {
        name: service
        for name, service in yaml_services(path).items()
        if "command" in service and flow_list(service["command"])[0] == "taskstack-worker"
    }
    assert workers, f"{path.name} runs no taskstack-worker"
    for name, service in workers.items():
        assert "stop_grace_period" in service, f"{path.name}: {name} has no stop_grace_period"
        assert seconds(service["stop_grace_period"]) == STOP_GRACE_PERIOD_SECONDS, name


def test_the_grace_period_outlasts_the_whole_shutdown() -> None:
    assert STOP_GRACE_PERIOD_SECONDS > SOFT_SHUTDOWN_SECONDS + SHUTDOWN_DEADLINE_SECONDS
