"""The stack a benchmark measures: a private redis-server and prefork worker, or a running one.

Used by ``scripts/bench.py``; the private stack's worker can be restarted
between methods (``--fresh-worker``), and its processes' memory read.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from taskstack import Settings, names
from taskstack.app import create_app
from taskstack.capacity import capacity
from taskstack.services.local import redis_command, worker_command, write_redis_config


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser, with the options every one of them takes."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--processes", type=int, default=2, help="worker processes (and local pool size)")
    add("--use-running", action="store_true", help="measure the stack REDIS_URL names instead")
    add("--out", type=Path, default=Path("docs/benchmarks"), help="where to write the results")
    return parser


@dataclass
class Stack:
    settings: Settings
    description: str
    processes: int = 0
    """Worker processes serving the ``cpu`` queue (0: unknown, use ``--processes``)."""
    worker: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    log: IO[bytes] | None = None
    restarts: int = 0

    def start_worker(self) -> None:
        """Start a prefork worker under a new node name and wait until it answers."""
        node = f"bench-{secrets.token_hex(3)}"
        self.worker = subprocess.Popen(
            [*worker_command(names.CPU_QUEUE, node), "--loglevel=WARNING"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        app = create_app(self.settings)
        try:
            wait(
                lambda: app.control.ping(destination=[names.node_name("cpu", node)], timeout=0.5),
                "the cpu worker",
            )
        finally:
            app.close()

    def stop_worker(self) -> None:
        if self.worker is not None:
            stop(self.worker)
            self.worker = None

    def restart_worker(self) -> None:
        self.stop_worker()
        self.start_worker()
        self.restarts += 1


def worker_pss(stack: Stack) -> int | None:
    """Proportional set size of the private worker's processes in bytes (None elsewhere)."""
    if stack.worker is None:
        return None
    pids = [stack.worker.pid]
    for task in Path(f"/proc/{stack.worker.pid}/task").iterdir():
        try:
            pids += [int(pid) for pid in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            continue
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):  # a child replaced meanwhile
            continue
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def private_stack(processes: int, *, metrics: bool = True) -> Iterator[Stack]:
    """A throwaway redis-server and one prefork worker of ``processes`` processes, which
    serves its item metrics (as the stack's workers do) unless ``metrics`` is False."""
    tmp = Path(tempfile.mkdtemp(prefix="taskstack-bench-"))
    port, metrics_port = free_port(), free_port() if metrics else 0
    settings = Settings(
        redis_url=f"redis://:{secrets.token_urlsafe(12)}@127.0.0.1:{port}/0",
        secret=secrets.token_urlsafe(32),
        cpu_concurrency=processes,
        shared_dir=str(tmp / "shared"),
        metrics_port=metrics_port,
    )
    env = {**os.environ, **settings.to_env()}
    log = (tmp / "stack.log").open("wb")
    server = subprocess.Popen(
        redis_command(write_redis_config(settings, tmp)), stdout=log, stderr=subprocess.STDOUT
    )
    stack = Stack(settings, "private redis-server + 1 prefork worker", processes, env=env, log=log)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        wait(client.ping, "redis-server")
        stack.start_worker()
        yield stack
    finally:
        stack.stop_worker()  # the worker first: it hands work back to Redis
        stop(server)
        client.close()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def running_stack() -> Iterator[Stack]:
    """The stack ``REDIS_URL`` (or ``REDIS_PORT``/``REDIS_PASSWORD``) and the secret name."""
    settings = Settings.from_env()
    with redis.Redis.from_url(settings.redis_url) as client:
        processes = capacity(client, names.CPU_QUEUE).processes
    yield Stack(settings, "running stack", processes)


def stop(child: subprocess.Popen[Any]) -> None:
    child.terminate()
    try:
        child.wait(60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(10)
        print(f"bench: {child.args!r} ignored SIGTERM and was killed", file=sys.stderr)


def wait(condition: Callable[[], Any], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")
