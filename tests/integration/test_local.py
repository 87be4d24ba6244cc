"""The local stack (taskstack/services/local.py) for real: its redis-server, its Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from taskstack import names
from taskstack.app import create_app
from taskstack.settings import Settings
from tests.support import ROOT, UNSET, child_pids, free_port, require, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


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
    port, flower_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env |= {"REDIS_PORT": str(port), "REDIS_PASSWORD": secrets.token_hex(8)}
    settings = Settings.from_env(env)
    local = subprocess.Popen(
        [sys.executable, "-m", "taskstack.services.local", f"--flower-port={flower_port}",
         f"--state-dir={tmp_path}"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    app = create_app(settings)
    try:
        wait_for(
            lambda: len(app.control.ping(timeout=0.5)) == len(names.QUEUES),
            60,
            "both local workers to answer ping",
        )
        workers = [pid for pid in _descendants(local.pid) if "taskstack.worker" in _cmdline(pid)]
        assert len(workers) >= len(names.QUEUES)  # the workers (and their pool processes)
        local.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends it
        wait_for(lambda: not any(_alive(pid) for pid in workers), 60, "the workers to exit")
        assert client.ping()  # Redis outlived the workers: their requeued tasks reached it
        assert local.wait(timeout=30) is not None
        with pytest.raises(redis.ConnectionError):
            client.ping()
    finally:
        app.close()
        client.close()
        if local.poll() is None:  # the test failed first: leave nothing of the stack behind
            for pid in [*_descendants(local.pid), local.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            local.wait()


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
