"""The faults stack, started once for every scenario module of this package."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import pytest

from tests.compose.conftest import CPU_WORKERS, Stack, docker, new_stack, running
from tests.compose.faults import work
from tests.compose.faults.report import report_setup
from tests.compose.faults.stack import FAULTS
from tests.compose.secure import with_tls

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run this package's scenarios in their numbered order (the report's), not by module name.

    Scenario titles start with their number ("1 ...", "3a ..."), so they sort as
    numbered while there are fewer than ten.
    """
    slots = [i for i, item in enumerate(items) if item.path.is_relative_to(HERE)]

    def title(item: pytest.Item) -> str:
        scenario = item.get_closest_marker("scenario")
        return str(scenario.args[0]) if scenario else item.nodeid

    ordered = sorted((items[i] for i in slots), key=title)
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item


@pytest.fixture(scope="package")
def faults(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The stack with short timeouts, Redis over TLS with a user per role (compose.tls.yaml);
    worker-side test functions travel by value."""
    stack = with_tls(new_stack("taskstack-faults", **FAULTS), tmp_path_factory.mktemp("secrets"))
    cloudpickle.register_pickle_by_value(work)
    with running(request, stack):
        engine = docker("version", "--format", "{{.Server.Version}}").strip()
        report_setup(
            request.config,
            stack=f"compose.yaml and compose.tls.yaml (Redis over TLS, a Redis user per role) "
            f"with --scale worker-cpu={CPU_WORKERS}, one prefork process per available CPU in each",
            settings=" ".join(f"{name}={value}" for name, value in FAULTS.items()),
            machine=f"{os.cpu_count()} CPUs, Docker {engine}",
        )
        yield stack
