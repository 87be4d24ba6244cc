"""Flower as the stack runs it (taskstack/services/flower.py): it sees the workers and their
tasks, and answers nobody without the password but its healthcheck."""

from __future__ import annotations

import json
import re

import pytest
from celery import Celery
from celery.states import READY_STATES

from taskstack import ClusterExecutor, names
from taskstack.settings import Settings
from tests.integration.work import square
from tests.support import Flower, Worker, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def get_json(flower: Flower, path: str) -> object:
    status, body = flower.get(path)
    assert status == 200, (path, status)
    return json.loads(body)


def test_flower_lists_both_workers(flower: Flower, cpu_worker: Worker, io_worker: Worker) -> None:
    expected = {cpu_worker.node, io_worker.node}

    def listed() -> set[str] | None:
        workers = get_json(flower, "/api/workers?refresh=1")
        assert isinstance(workers, dict)
        return set(workers) if expected <= set(workers) else None

    workers = wait_for(listed, 30, "Flower to list both workers")
    assert expected <= workers


def test_flower_counts_the_tasks_that_were_sent(
    app: Celery, flower: Flower, cpu_worker: Worker
) -> None:
    sent = {app.send_task(names.MONTE_CARLO_PI, (1000, seed)).id for seed in range(7)}
    failed = app.send_task(names.MONTE_CARLO_PI, (-1,)).id

    def seen() -> dict[str, str]:
        tasks = get_json(flower, f"/api/tasks?taskname={names.MONTE_CARLO_PI}")
        assert isinstance(tasks, dict)
        return {tid: t["state"] for tid, t in tasks.items() if tid in sent | {failed}}

    def finished() -> dict[str, str] | None:
        states = seen()  # a task Flower knows only as sent is still PENDING there
        done = len(states) == 8 and set(states.values()) <= READY_STATES
        return states if done else None

    states = wait_for(finished, 30, "Flower to see all eight tasks finish")
    assert sum(state == "SUCCESS" for state in states.values()) == 7
    assert states[failed] == "FAILURE"


@pytest.mark.parametrize("path", ["/api/workers", "/api/tasks", "/", "/metrics"])
def test_flower_refuses_unauthenticated_requests(flower: Flower, path: str) -> None:
    assert flower.get(path, auth=False)[0] == 401


def test_flower_healthcheck_needs_no_auth(flower: Flower) -> None:
    assert flower.get("/healthcheck", auth=False) == (200, "OK")


def test_flower_serves_metrics_with_auth(flower: Flower, cpu_worker: Worker) -> None:
    status, metrics = flower.get("/metrics")
    assert status == 200
    assert "flower_events_total" in metrics


def test_flower_names_the_work_of_an_executor_batch(
    flower: Flower, executor: ClusterExecutor, redis_server: Settings
) -> None:
    assert list(executor.map(square, range(30))) == [x * x for x in range(30)]

    def batches() -> list[dict[str, object]] | None:
        tasks = get_json(flower, f"/api/tasks?taskname={names.RUN_BATCH}")
        assert isinstance(tasks, dict)
        ours = [t for t in tasks.values() if "tests.integration.work.square" in str(t["kwargs"])]
        return ours if sum(_items(t) for t in ours) == 30 else None

    shown = wait_for(batches, 30, "Flower to list the map's batches with their items")
    for task in shown:
        kwargs = str(task["kwargs"])
        assert "map=" in kwargs and "client=" in kwargs
        assert "payload" not in kwargs and redis_server.secret not in kwargs


def _items(task: dict[str, object]) -> int:
    found = re.search(r"items=(\d+)", str(task["kwargs"]))
    return int(found[1]) if found else 0
