"""Fixtures shared by every tier: real redis-server, workers and Flower processes.

The helpers behind them live in tests/support/; ``require`` and ``wait_for``
are re-exported here for the modules that still import them from this file.
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from celery import Celery

from taskstack import names
from taskstack.app import create_app
from taskstack.services.local import worker_command
from taskstack.settings import Settings
from tests.support import (
    Flower,
    Tripwire,
    Worker,
    free_port,
    settings_env,
    start,
    start_flower,
    start_redis,
    tracebacks,
)
from tests.support import require as require
from tests.support import wait_for as wait_for

pytest_plugins = ["tests.compose.faults.report"]
"""The reliability report: its option, its ``scenario`` marker and ``report_row`` fixture."""


@pytest.fixture(autouse=True)
def no_stray_worker_traceback(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test during which a worker logged a traceback it did not declare."""
    logged = tracebacks.mark()
    yield
    tracebacks.check(request.node, logged)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings of the session's stack: a fresh password and secret per run."""
    return Settings(
        redis_url=f"redis://:{secrets.token_urlsafe(16)}@127.0.0.1:{free_port()}/0",
        cpu_concurrency=2,
        io_concurrency=4,
        secret=secrets.token_urlsafe(32),
        flower_password=secrets.token_urlsafe(12),
        soft_time_limit=60,
        time_limit=90,
    )


@pytest.fixture(scope="session")
def redis_server(
    base_settings: Settings, tmp_path_factory: pytest.TempPathFactory, logs_dir: Path
) -> Iterator[Settings]:
    """A real redis-server on a free loopback port, password required."""
    require(shutil.which("redis-server") is not None, "redis-server")
    service = start_redis(base_settings, tmp_path_factory.mktemp("redis"), logs_dir)
    yield base_settings
    service.stop()


@pytest.fixture
def redis_client(redis_server: Settings) -> Iterator[redis.Redis]:
    """A client of the session's Redis, closed after the test.

    Nothing is flushed: the session's workers keep their capacity entries there.
    """
    client = redis.Redis.from_url(redis_server.redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def start_worker(redis_server: Settings, logs_dir: Path) -> Iterator[Callable[..., Worker]]:
    """Factory for real worker processes; every one it starts is stopped at the end."""
    started: list[Worker] = []
    probe = create_app(redis_server)

    def factory(queue: str, settings: Settings | None = None, metrics_port: int = 0) -> Worker:
        hostname = f"test-{secrets.token_hex(3)}"
        node = names.node_name(queue, hostname)
        # Each worker serves its item metrics on a port of its own, as in a container.
        metrics_port = metrics_port or free_port()
        env = settings_env(replace(settings or redis_server, metrics_port=metrics_port))
        service = start(node, worker_command(queue, hostname), env, logs_dir)
        tracebacks.WATCHED.append(service.log)
        worker = Worker(node, service, metrics_port)
        started.append(worker)
        # A worker on another Redis database answers there.
        asker = probe if settings is None else create_app(settings)
        try:
            wait_for(
                lambda: (
                    service.process.poll() is None
                    and asker.control.ping(destination=[node], timeout=0.5)
                ),
                60,
                f"worker {node} to answer ping (log: {service.log})",
            )
        finally:
            if asker is not probe:
                asker.close()
        return worker

    yield factory
    for worker in started:
        worker.service.process.terminate()
    for worker in started:
        worker.service.stop()
    probe.close()


@pytest.fixture(scope="session")
def cpu_worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker(names.CPU_QUEUE)


@pytest.fixture(scope="session")
def io_worker(start_worker: Callable[..., Worker]) -> Worker:
    return start_worker(names.IO_QUEUE)


@pytest.fixture(scope="session")
def flower(redis_server: Settings, logs_dir: Path) -> Iterator[Flower]:
    flower = start_flower(redis_server, logs_dir)
    yield flower
    flower.service.stop()


@pytest.fixture
def app(redis_server: Settings) -> Iterator[Celery]:
    """A client app on the session's Redis; the queues start empty."""
    client = create_app(redis_server)
    with client.connection_for_write() as conn:
        for queue in names.QUEUES:
            client.amqp.queues[queue].bind(conn.default_channel).purge()
    yield client
    client.close()


@pytest.fixture
def tripwire(tmp_path: Path) -> Tripwire:
    """An object whose unpickling leaves a file in the test's own directory."""
    return Tripwire(tmp_path / "unpickled")
