"""The local stack's configs (taskstack/services/local.py): redis-server's, and Prometheus's
as derived from the compose stack's (taskstack/services/prometheus.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from taskstack.services import prometheus
from taskstack.services.local import metrics_ports, redis_config
from taskstack.settings import Settings

COMPOSE_CONFIG = prometheus.CONFIG_DIR / "prometheus.yml"


def test_redis_config_requires_the_password(tmp_path: Path) -> None:
    config = redis_config("s3cret", 6390, tmp_path, 2**30)
    assert 'requirepass "s3cret"' in config
    assert "appendonly yes" in config
    assert "maxmemory 1073741824" in config
    assert "maxmemory-policy noeviction" in config


def _local_config(user: str = "admin") -> dict[str, Any]:
    text = prometheus.config(
        COMPOSE_CONFIG.read_text(),
        flower="127.0.0.1:5555",
        flower_user=user,
        password_file=Path("/state/flower_password"),
        workers={"worker-cpu": "127.0.0.1:9808", "worker-io": "127.0.0.1:9809"},
    )
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def test_local_prometheus_differs_from_the_compose_one_only_in_its_targets() -> None:
    compose, local = yaml.safe_load(COMPOSE_CONFIG.read_text()), _local_config()
    assert local["global"] == compose["global"]  # the 5 s scrape and evaluation intervals
    assert local["global"]["scrape_interval"] == local["global"]["evaluation_interval"] == "5s"
    # The very rule files the image copies, where they lie in the checkout: no copies.
    assert local["rule_files"] == [
        str(prometheus.CONFIG_DIR / Path(path).name) for path in compose["rule_files"]
    ]
    assert all(Path(path).is_file() for path in local["rule_files"])
    flower, workers = local["scrape_configs"]
    assert flower["basic_auth"] == {"username": "admin", "password_file": "/state/flower_password"}
    assert flower["static_configs"] == [{"targets": ["127.0.0.1:5555"]}]
    assert [c["targets"] for c in workers["static_configs"]] == [
        ["127.0.0.1:9808"],
        ["127.0.0.1:9809"],
    ]
    # Labelled as DNS discovery labels each replica, for the compose job's own relabelling.
    dns_names = [c["labels"]["__meta_dns_name"] for c in workers["static_configs"]]
    assert dns_names == compose["scrape_configs"][1]["dns_sd_configs"][0]["names"]
    replaced = {"basic_auth", "static_configs", "dns_sd_configs"}
    for ours, theirs in zip(local["scrape_configs"], compose["scrape_configs"], strict=True):
        assert {k: v for k, v in ours.items() if k not in replaced} == {
            k: v for k, v in theirs.items() if k not in replaced
        }


def test_the_flower_user_is_written_as_data_whatever_it_holds() -> None:
    user = 'o"dd: user # {x}'
    assert _local_config(user)["scrape_configs"][0]["basic_auth"]["username"] == user


def test_a_config_without_the_expected_block_is_refused() -> None:
    with pytest.raises(ValueError, match="dns_sd_configs"):
        prometheus.config(
            COMPOSE_CONFIG.read_text().replace("dns_sd_configs:", "file_sd_configs:"),
            flower="127.0.0.1:5555",
            flower_user="admin",
            password_file=Path("/state/flower_password"),
            workers={},
        )


def test_each_local_worker_serves_metrics_on_a_port_of_its_own() -> None:
    assert metrics_ports(Settings(metrics_port=9808)) == {"cpu": 9808, "io": 9809}
    assert metrics_ports(Settings(metrics_port=0)) == {"cpu": 0, "io": 0}
