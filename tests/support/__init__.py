"""Helpers every tier of the tests shares, written once.

- waiting on a condition: :func:`wait_for`;
- infrastructure a tier needs: :func:`require` (skip on a laptop, fail in CI),
  :func:`free_port`;
- child processes: :func:`run` (stderr kept on failure), :class:`Service` and
  :func:`start`, :func:`child_pids`, :func:`pss_bytes`, :func:`memory_kib`,
  :func:`settings_env`;
- the stack's services: :func:`start_redis`, :func:`start_flower`;
- what went through Redis: :func:`redis_traffic`;
- what the session's fixtures hand out: :class:`Worker`, :class:`Flower`;
- HTTP with basic auth (Flower): :func:`http_get`; a worker's metrics: :func:`worker_metric`;
  a loopback HTTP server of a test's own: :func:`serve_http`;
- proof that nothing was unpickled: :class:`Tripwire`; a function new to the workers:
  :func:`fresh_function`;
- output that must get past pytest's capture: :func:`print_past_capture`.

What the deployment files (compose.yaml, stack.yaml) say is read by
:mod:`tests.support.deployment`.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import pytest
import redis
from celery import Celery

from taskstack.services.local import flower_command, redis_command, write_redis_config
from taskstack.settings import ENV_VARS, Settings

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: compose.yaml, taskstack/, tests/ and scripts/ are below it."""

IN_CI = os.environ.get("CI", "").lower() == "true"
UNSET = {name for name, _ in ENV_VARS.values()} | {"REDIS_PASSWORD", "REDIS_PORT"}
"""Variables of the caller's own stack that must not leak into the test session's."""


# -- waiting and infrastructure ---------------------------------------------------------


def wait_for(
    condition: Callable[[], T | None], timeout: float, what: str, *, interval: float = 0.05
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail naming ``what``.

    An exception counts as "not yet" (the thing waited for may refuse until it is
    up); the last one is named in the failure.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
        except Exception as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {timeout:g}s waiting for {what} (last error: {last_error!r})"
            )
        time.sleep(interval)


def require(available: bool, what: str) -> None:
    """Skip when infrastructure is missing on a laptop; fail when it is missing in CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} is required when CI=true", pytrace=False)
    pytest.skip(f"{what} is not available")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- child processes ------------------------------------------------------------------------


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Run a command to completion and return its stdout; its stderr goes with a failure."""
    try:
        return subprocess.run(
            list(argv),
            env=None if env is None else dict(env),
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except subprocess.CalledProcessError as exc:
        exc.add_note(f"stderr:\n{exc.stderr[-5000:]}")
        raise


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started, whichever of its threads started them (Linux)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return children


def pss_bytes(pids: Sequence[int]) -> int:
    """The proportional set size of ``pids`` together: a page shared by n of them counts 1/n."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A field of ``/proc/<pid>/status`` in KiB: ``VmRSS`` now, ``VmHWM`` its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(f"no {field} for process {pid}")


def redis_traffic(client: Any) -> tuple[int, int]:
    """Bytes Redis has received and sent since it started: (in, out)."""
    stats = client.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


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


def start(
    name: str, argv: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None
) -> Service:
    """Start ``argv`` (in ``cwd``, or the tests' own) with its output in ``logs/<name>.log``."""
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    out: IO[bytes] = log.open("wb")
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return Service(name, process, log)


@dataclass
class Worker:
    """A worker process the session started: its Celery node name, its process, and the
    loopback port of its item metrics."""

    node: str
    service: Service
    metrics_port: int = 0


# -- HTTP -------------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """Serve ``handler`` on a free loopback port, from threads; yields ``http://host:port``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def http_get(url: str, *, basic_auth: str | None = None, timeout: float = 10) -> tuple[int, str]:
    """GET ``url``, with ``user:password`` basic auth if given: (status, body).

    An HTTP error status is returned like any other, with an empty body.
    """
    request = urllib.request.Request(url)
    if basic_auth is not None:
        request.add_header("Authorization", f"Basic {b64encode(basic_auth.encode()).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def scrape(worker: Worker) -> str:
    """A worker's item metrics, as Prometheus scrapes them."""
    status, body = http_get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5)
    assert status == 200
    return body


def metric_samples(worker: Worker, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """The labels and value of each sample called ``name`` that ``worker`` serves."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(scrape(worker)):
        for sample in family.samples:
            if sample.name == name:
                yield sample.labels, sample.value


def worker_metric(node: Worker, name: str, /, **labels: str) -> float:
    """The sum of ``node``'s samples called ``name`` that carry ``labels``."""
    return sum(
        value
        for found, value in metric_samples(node, name)
        if all(found.get(k) == v for k, v in labels.items())
    )


@dataclass
class Flower:
    """The session's Flower: its base URL, ``user:password``, and its process."""

    url: str
    basic_auth: str
    service: Service

    def get(self, path: str, *, auth: bool = True) -> tuple[int, str]:
        return http_get(self.url + path, basic_auth=self.basic_auth if auth else None)


# -- the stack's services ------------------------------------------------------------------


def start_redis(settings: Settings, data_dir: Path, logs: Path, name: str = "redis") -> Service:
    """Start the redis-server ``settings.redis_url`` names, and wait until it answers PING.

    Started again on the same ``data_dir``, it has the same port and what it held
    (append-only file): a broker restart.
    """
    config = write_redis_config(settings, data_dir)
    service = start(name, redis_command(config), dict(os.environ), logs)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        wait_for(client.ping, 20, f"redis-server to answer PING (log: {service.log})")
    finally:
        client.close()
    return service


def start_flower(
    settings: Settings, logs: Path, name: str = "flower", db: Path | None = None
) -> Flower:
    """Start Flower as the stack runs it, on a free port, and wait for its healthcheck;
    with ``db``, it keeps its state in that file, as in compose.yaml."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = start(name, flower_command(port, db), settings_env(settings), logs)
    wait_for(
        lambda: http_get(f"{url}/healthcheck", timeout=1)[0] == 200,
        60,
        f"Flower /healthcheck (log: {service.log})",
    )
    return Flower(url, settings.flower_basic_auth, service)


# -- pickles -------------------------------------------------------------------------------


class Tripwire:
    """Unpickling this creates ``path``: no file afterwards proves nothing was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[[Path], None], tuple[Path]]:
        return (Path.touch, (self.path,))

    @property
    def fired(self) -> bool:
        return self.path.exists()


def fresh_function() -> Callable[[float], str]:
    """A function no worker has run yet, under a name of its own: it sleeps ``seconds`` and
    names its host. It travels by value (its module is importable nowhere), and its
    ``function`` label in the item metrics is new, as a team's first map of a new function."""
    name = f"fresh_{secrets.token_hex(4)}"
    namespace: dict[str, Any] = {}
    source = f"def {name}(seconds):\n    time.sleep(seconds)\n    return socket.gethostname()\n"
    exec(source, {"time": time, "socket": socket}, namespace)
    function: Callable[[float], str] = namespace[name]
    function.__module__ = "taskstack_fresh_functions"
    return function


# -- output -------------------------------------------------------------------------------


def print_past_capture(config: pytest.Config, text: str) -> None:
    """Print ``text`` to the terminal even where pytest captures output (e.g. in a teardown)."""
    capture: Any = config.pluginmanager.get_plugin("capturemanager")
    if capture is None:  # run with -p no:capture: nothing to get past
        print(text, flush=True)
        return
    with capture.global_and_fixture_disabled():
        print(text, flush=True)


def wait_until_idle(app: Celery, worker: Worker, queue: str, timeout: float = 30) -> None:
    """Wait until ``queue`` is empty and ``worker`` neither runs nor holds a task.

    What a test checks afterwards can no longer change by itself: nothing is
    left that could start another call.
    """

    def idle() -> bool:
        with app.connection_for_read() as conn:
            waiting = conn.default_channel.client.llen(queue)
        inspect = app.control.inspect(destination=[worker.node], timeout=1)
        held = [
            *(inspect.active() or {}).get(worker.node, [None]),
            *(inspect.reserved() or {}).get(worker.node, [None]),
        ]
        return waiting == 0 and not held

    wait_for(idle, timeout, f"{worker.node} to be idle with {queue} empty", interval=0.2)
