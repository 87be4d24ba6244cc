"""Redis runs with a maxmemory and noeviction: full, it refuses new work and evicts nothing
queued; the workers' metrics say how full it is, and an alert fires before it is."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from kombu.exceptions import OperationalError

from taskstack import names
from taskstack.app import create_app
from taskstack.settings import Settings
from tests.support import ROOT, Worker, free_port, require, start_redis, worker_metric

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SMALL = 3 * 1024 * 1024
"""A maxmemory a few dozen 50 KB tasks fill: an empty Redis uses about 1 MB."""


def test_the_stacks_redis_has_a_maxmemory_and_never_evicts(redis_client: redis.Redis) -> None:
    config = redis_client.config_get("maxmemory*")
    assert config["maxmemory"] == str(Settings().redis_maxmemory)  # 4 GiB
    assert config["maxmemory-policy"] == "noeviction"


@pytest.fixture
def small(base_settings: Settings, tmp_path: Path, logs_dir: Path) -> Iterator[Settings]:
    """Settings of a redis-server of its own, with a maxmemory of ``SMALL``."""
    settings = replace(
        base_settings,
        redis_url=base_settings.redis_url.rsplit(":", 1)[0] + f":{free_port()}/0",
        redis_maxmemory=SMALL,
    )
    service = start_redis(settings, tmp_path, logs_dir, name="redis-small")
    yield settings
    service.stop()


def test_a_full_redis_refuses_a_new_task_and_keeps_every_queued_one(small: Settings) -> None:
    app = create_app(small)
    sent: list[str] = []
    try:
        with pytest.raises(OperationalError, match="used memory > 'maxmemory'") as refused:
            for _ in range(1_000):  # 50 MB: far more than fits
                sent.append(app.send_task(names.NOOP, ("x" * 50_000,)).id)
    finally:
        app.close()
    assert isinstance(refused.value.__cause__, redis.OutOfMemoryError)
    assert 10 < len(sent) < 1_000
    client = redis.Redis.from_url(small.redis_url)
    try:
        queued = [json.loads(entry)["headers"]["id"] for entry in client.lrange("cpu", 0, -1)]
        assert sorted(queued) == sorted(sent)  # every task sent before the refusal is there
        assert client.info("stats")["evicted_keys"] == 0
        assert client.info("memory")["used_memory"] > 0.9 * SMALL  # it was full
    finally:
        client.close()


def test_workers_report_how_full_redis_is(cpu_worker: Worker, redis_client: redis.Redis) -> None:
    limit = worker_metric(cpu_worker, "taskstack_redis_memory_max_bytes")
    assert str(int(limit)) == redis_client.config_get("maxmemory")["maxmemory"] != "0"
    used = worker_metric(cpu_worker, "taskstack_redis_memory_used_bytes")
    assert 0 < used < limit


ALERT_TEST = """
rule_files: [{alerts}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      # 50 % full for five minutes, then 90 %.
      - series: taskstack_redis_memory_used_bytes{{instance="worker-cpu-1"}}
        values: 500x20 900x20
      - series: taskstack_redis_memory_used_bytes{{instance="worker-cpu-2"}}
        values: 500x20 900x20
      - series: taskstack_redis_memory_max_bytes{{instance="worker-cpu-1"}}
        values: 1000x40
      - series: taskstack_redis_memory_max_bytes{{instance="worker-cpu-2"}}
        values: 1000x40
    alert_rule_test:
      - eval_time: 5m
        alertname: TaskstackRedisMemoryHigh
        exp_alerts: []
      - eval_time: 6m
        alertname: TaskstackRedisMemoryHigh
        exp_alerts: []
      - eval_time: 7m
        alertname: TaskstackRedisMemoryHigh
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: Redis holds 90% of its REDIS_MAXMEMORY
"""


def test_an_alert_fires_once_redis_stays_over_80_percent_full(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool")
    assert promtool is not None
    alerts = ROOT / "services" / "prometheus" / "alerts.yml"
    test = tmp_path / "alerts_test.yml"
    test.write_text(ALERT_TEST.format(alerts=alerts))
    run = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
