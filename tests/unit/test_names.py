"""The deployment files follow taskstack/names.py: queue names come from there, node names
(``<queue>@<hostname>``) are never spelled out."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskstack import names
from tests.support import ROOT
from tests.support.deployment import DEPLOYMENT_FILES, flow_list, yaml_services, yaml_text

WORKER = "taskstack-worker"


@pytest.mark.parametrize("path", DEPLOYMENT_FILES, ids=lambda path: path.name)
def test_every_worker_service_consumes_a_queue_of_names(path: Path) -> None:
    consumed: set[str] = set()
    for name, service in yaml_services(path).items():
        if "command" not in service or flow_list(service["command"])[0] != WORKER:
            continue
        command = flow_list(service["command"])
        assert command[1] in names.QUEUES, f"{path.name}: {name} consumes {command[1]!r}"
        healthcheck = service.get("healthcheck")
        assert isinstance(healthcheck, dict), f"{path.name}: {name} has no healthcheck"
        test = flow_list(healthcheck["test"])
        # The healthcheck pings the node of the queue that the service consumes.
        assert test[test.index(WORKER) + 1] == command[1], f"{path.name}: {name} checks {test}"
        assert "--ping" in test
        consumed.add(command[1])
    assert consumed == set(names.QUEUES), f"{path.name}: no worker consumes some queue"


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.yaml")), ids=lambda path: path.name)
def test_no_node_name_is_spelled_out(path: Path) -> None:
    # Comments aside: they may describe a node name; Docker never reads them.
    text = yaml_text(path)
    for queue in names.QUEUES:
        assert names.node_name(queue, "") not in text, f"{path.name} spells out {queue}@"
