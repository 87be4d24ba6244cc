"""Fixtures shared by every tier: real redis-server, workers and Flower processes."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import redis
from celery import Celery

from taskstack import names
from taskstack.app import create_app
from taskstack.services.local import (
    flower_command,
    redis_command,
    worker_command,
    write_redis_config,
)
from taskstack.settings import ENV_VARS, Settings

IN_CI = os.environ.get("CI", "").lower() == "true"
UNSET = {name for name, _ in ENV_VARS.values()} | {"REDIS_PASSWORD", "REDIS_PORT"}
"""Variables of the caller's own stack that must not leak into the test session's."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        metavar="DIR",
        type=Path,
        help="merge the fault scenarios' rows into DIR/reliability.{md,json} "
        "(scripts/reliability.py passes docs/reliability); they are always printed",
    )


def require(available: bool, what: str) -> None:
    """Skip when infrastructure is missing on a laptop; fail when it is missing in CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required when CI=true", pytrace=False)
    pytest.skip(f"{what} is not available")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception as exc:  # the thing waited for may refuse until it is up
            last_error = exc
        else:
            if value:
                return value
        time.sleep(0.05)
    raise TimeoutError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})"
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    return {**env, **settings.to_env()}


@dataclass
class Service:
    """A child process of the test session, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Service:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    out: IO[bytes] = log.open("wb")
    process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return Service(name, process, log)


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
        visibility_timeout=120,
    )


@pytest.fixture(scope="session")
def redis_server(
    base_settings: Settings, tmp_path_factory: pytest.TempPathFactory, logs_dir: Path
) -> Iterator[Settings]:
    """A real redis-server on a free loopback port, password required."""
    require(shutil.which("redis-server") is not None, "redis-server")
    config = write_redis_config(base_settings, tmp_path_factory.mktemp("redis"))
    service = start("redis", redis_command(config), dict(os.environ), logs_dir)
    client = redis.Redis.from_url(base_settings.redis_url)
    wait_for(client.ping, 20, "redis-server to answer PING")
    yield base_settings
    client.close()
    service.stop()


@dataclass
class Worker:
    node: str
    service: Service


@pytest.fixture(scope="session")
def start_worker(redis_server: Settings, logs_dir: Path) -> Iterator[Callable[..., Worker]]:
    """Factory for real worker processes; every one it starts is stopped at the end."""
    started: list[Worker] = []
    probe = create_app(redis_server)

    def factory(queue: str, settings: Settings | None = None) -> Worker:
        hostname = f"test-{secrets.token_hex(3)}"
        node = f"{queue}@{hostname}"
        env = settings_env(settings or redis_server)
        service = start(node, worker_command(queue, hostname), env, logs_dir)
        worker = Worker(node, service)
        started.append(worker)
        wait_for(
            lambda: (
                service.process.poll() is None
                and probe.control.ping(destination=[node], timeout=0.5)
            ),
            60,
            f"worker {node} to answer ping (log: {service.log})",
        )
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


@dataclass
class Flower:
    url: str
    auth: tuple[str, str]
    service: Service


@pytest.fixture(scope="session")
def flower(redis_server: Settings, logs_dir: Path) -> Iterator[Flower]:
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = start("flower", flower_command(port), settings_env(redis_server), logs_dir)
    wait_for(
        lambda: urllib.request.urlopen(f"{url}/healthcheck", timeout=1).status == 200,
        60,
        f"Flower /healthcheck (log: {service.log})",
    )
    yield Flower(url, (redis_server.flower_user, redis_server.flower_password), service)
    service.stop()


@pytest.fixture
def app(redis_server: Settings) -> Iterator[Celery]:
    """A client app on the session's Redis; the queues start empty."""
    client = create_app(redis_server)
    with client.connection_for_write() as conn:
        for queue in names.QUEUES:
            client.amqp.queues[queue].bind(conn.default_channel).purge()
    yield client
    client.close()
