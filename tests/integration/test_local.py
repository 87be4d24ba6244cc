"""The local stack (taskstack/services/local.py) for real: its redis-server, its Ctrl-C, its
Prometheus (the compose stack's rules, scraping the local workers and Flower) and, without a
``prometheus`` binary, the rest without it and a demo that links no dashboard."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import redis

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.services import dashboard
from taskstack.settings import Settings
from tests.integration.work import square
from tests.support import ROOT, UNSET, child_pids, free_port, http_get, require, run, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@dataclass
class Local:
    """A running ``taskstack-local``: its process, its settings and environment, its output."""

    process: subprocess.Popen[bytes]
    settings: Settings
    env: dict[str, str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_workers(self) -> None:
        app = create_app(self.settings)
        try:
            wait_for(
                lambda: len(app.control.ping(timeout=0.5)) == len(names.QUEUES),
                60,
                "both local workers to answer ping",
            )
        finally:
            app.close()


@contextlib.contextmanager
def local_stack(tmp_path: Path, **env: str) -> Iterator[Local]:
    """``taskstack-local`` on free ports, its state in ``tmp_path``, with ``env`` on top;
    stopped afterwards as Ctrl-C stops it, or killed if that hangs."""
    base = {k: v for k, v in os.environ.items() if k not in UNSET}
    base |= {
        "REDIS_PORT": str(free_port()),
        "REDIS_PASSWORD": secrets.token_hex(8),
        "FLOWER_PASSWORD": secrets.token_hex(8),
        "FLOWER_PORT": str(free_port()),
        "WORKER_METRICS_PORT": str(_two_free_ports()),
        "PROMETHEUS_PORT": str(free_port()),
    }
    base |= env
    log = tmp_path / "taskstack-local.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "taskstack.services.local",
             f"--flower-port={base['FLOWER_PORT']}", f"--state-dir={tmp_path}"],
            env=base, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield Local(process, Settings.from_env(base), base, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(60)
        if process.poll() is None:  # Ctrl-C hung: leave nothing of the stack behind
            for pid in [*_descendants(process.pid), process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def test_redis_refuses_clients_without_the_password(
    redis_server: Settings, redis_client: redis.Redis
) -> None:
    url = urlsplit(redis_server.redis_url)
    anonymous = redis.Redis(host=url.hostname or "", port=url.port or 6379)
    wrong = redis.Redis(host=url.hostname or "", port=url.port or 6379, password="wrong")
    try:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
    finally:
        anonymous.close()
        wrong.close()
    assert redis_client.ping()


@pytest.mark.timeout(120)
def test_ctrl_c_stops_the_workers_before_redis(tmp_path: Path) -> None:
    """taskstack-local: on Ctrl-C every worker ends while Redis still answers, then Redis."""
    require(shutil.which("redis-server") is not None, "redis-server")
    with local_stack(tmp_path) as local:
        client = redis.Redis.from_url(local.settings.redis_url, socket_timeout=5)
        try:
            local.wait_for_workers()
            workers = [
                pid
                for pid in _descendants(local.process.pid)
                if "taskstack.worker" in _cmdline(pid)
            ]
            assert len(workers) >= len(names.QUEUES)  # the workers (and their pool processes)
            local.process.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends it
            wait_for(lambda: not any(_alive(pid) for pid in workers), 60, "the workers to exit")
            assert client.ping()  # Redis outlived the workers: their requeued tasks reached it
            assert local.process.wait(timeout=30) is not None
            with pytest.raises(redis.ConnectionError):
                client.ping()
        finally:
            client.close()


@pytest.mark.timeout(180)
def test_prometheus_scrapes_the_local_workers_and_flower_with_the_stacks_rules(
    tmp_path: Path,
) -> None:
    require(shutil.which("redis-server") is not None, "redis-server")
    require(shutil.which("prometheus") is not None, "prometheus")
    with local_stack(tmp_path) as local:
        port = local.settings.prometheus_port
        local.wait_for_workers()
        metrics = local.settings.metrics_port
        expected_up = {
            ("flower", f"127.0.0.1:{local.env['FLOWER_PORT']}", None): "1",  # its password works
            ("workers", f"127.0.0.1:{metrics}", "worker-cpu"): "1",
            ("workers", f"127.0.0.1:{metrics + 1}", "worker-io"): "1",
        }
        wait_for(lambda: _up(port) == expected_up, 60, "Prometheus to scrape all three as up")

        with ClusterExecutor(settings=local.settings) as executor:
            assert list(executor.map(square, range(40))) == [x * x for x in range(40)]
            # A sample of the counters before the next map, so that its items make a rate
            # whether or not a new series is first exposed at 0.
            wait_for(lambda: _value(port, OK_ITEMS) == 40, 30, "Prometheus to count 40 items")
            assert list(executor.map(square, range(60))) == [x * x for x in range(60)]
        wait_for(lambda: _value(port, OK_ITEMS) == 100, 30, "Prometheus to count 100 items")
        rate = wait_for(
            lambda: _value(port, "sum(taskstack:items:rate1m)"), 30, "the recording rule > 0"
        )
        assert rate > 0

        # Flower's password reaches Prometheus in a file only we may read, never on a
        # command line; nor does Redis' reach any process's.
        assert (tmp_path / "prometheus" / "flower_password").stat().st_mode & 0o777 == 0o600
        commands = [_cmdline(pid) for pid in _descendants(local.process.pid)]
        assert any("--config.file=" in command for command in commands)
        for secret in (local.settings.flower_password, local.env["REDIS_PASSWORD"]):
            assert not any(secret in command for command in commands)

        assert dashboard.url(f"http://127.0.0.1:{port}") in _demo(local)

        local.process.send_signal(signal.SIGINT)  # Ctrl-C stops Prometheus with the rest
        assert local.process.wait(timeout=60) is not None
        assert not dashboard.ready(f"http://127.0.0.1:{port}")


def test_without_prometheus_it_says_so_and_the_demo_links_no_dashboard(tmp_path: Path) -> None:
    server = shutil.which("redis-server")
    require(server is not None, "redis-server")
    path = tmp_path / "bin"  # a PATH with redis-server and without prometheus
    path.mkdir()
    (path / "redis-server").symlink_to(server or "")
    with local_stack(tmp_path, PATH=str(path)) as local:
        local.wait_for_workers()  # the rest runs
        assert (
            "taskstack-local: no prometheus on PATH: running without Prometheus" in local.output()
        )
        port = local.settings.prometheus_port
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
            pass
        shown = _demo(local)
        assert "throughput dashboard (Prometheus): none, no Prometheus runs" in shown
        assert f"127.0.0.1:{port}/" not in shown and "/graph?" not in shown


OK_ITEMS = 'sum(taskstack_items_total{outcome="ok"})'


def _demo(local: Local) -> str:
    """What scripts/demo.py prints at the end of a small run against ``local``."""
    argv = [sys.executable, "scripts/demo.py", "--limit=20000", "--chunks=8"]
    out = run(argv, env={**local.env, "PATH": os.environ["PATH"]})
    return out[out.index("watch the stack:") :]


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    """An instant query's result from the Prometheus on ``port`` (its HTTP API)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?{urlencode({'query': promql})}"
    status, body = http_get(url, timeout=5)
    assert status == 200, body
    result: list[dict[str, Any]] = json.loads(body)["data"]["result"]
    return result


def _value(port: int, promql: str) -> float | None:
    result = _query(port, promql)
    return float(result[0]["value"][1]) if result else None


def _up(port: int) -> dict[tuple[str, str, str | None], str]:
    """Each target's ``up``, by job, instance and service."""
    return {
        (r["metric"]["job"], r["metric"]["instance"], r["metric"].get("service")): r["value"][1]
        for r in _query(port, "up")
    }


def _two_free_ports() -> int:
    """A free port whose next one is free too: the local workers' metrics ports."""

    def pair() -> int | None:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                return None
        return port

    return wait_for(pair, 10, "two adjacent free ports")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        found += children
        todo += children
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline")).read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
