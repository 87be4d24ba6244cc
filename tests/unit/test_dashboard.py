"""The dashboard (taskstack/services/dashboard.py) as the README links it, and the
Prometheus service as compose.yaml and stack.yaml declare it."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from taskstack.services import dashboard
from tests.support import ROOT
from tests.support.deployment import DEPLOYMENT_FILES, yaml_services


def test_the_readme_links_the_dashboard_as_the_module_builds_it() -> None:
    assert f"<{dashboard.url()}>" in (ROOT / "README.md").read_text()


def test_the_url_carries_one_graph_per_panel() -> None:
    query = parse_qs(urlsplit(dashboard.url("http://prometheus:9090/")).query)
    assert [query[f"g{i}.expr"][0] for i in range(len(dashboard.PANELS))] == dashboard.queries()
    assert all(query[f"g{i}.tab"] == ["0"] for i in range(len(dashboard.PANELS)))


def test_the_grafana_dashboard_reads_prometheus_through_a_variable() -> None:
    board = json.loads((ROOT / "services" / "grafana" / "taskstack-dashboard.json").read_text())
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])


def test_worker_metrics_are_never_published_and_prometheus_only_on_bind_address() -> None:
    compose, stack = (yaml_services(path) for path in DEPLOYMENT_FILES)
    for services in (compose, stack):
        for name in ("worker-cpu", "worker-io"):
            assert "ports" not in services[name]
            assert "--metrics-address=0.0.0.0" in services[name]["command"]
    assert compose["prometheus"]["ports"] == [
        "${BIND_ADDRESS:-127.0.0.1}:${PROMETHEUS_PORT:-9090}:9090"
    ]
    assert "ports" not in stack["prometheus"]
    pinned = compose["prometheus"]["build"]["args"]["PROMETHEUS_IMAGE"]
    assert pinned.startswith("${PROMETHEUS_IMAGE:-prom/prometheus:v") and "latest" not in pinned
    assert stack["prometheus"]["environment"]["FLOWER_PASSWORD_FILE"].startswith("/run/secrets/")
