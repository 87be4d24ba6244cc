"""What Redis over TLS with one ACL user per role costs, against the same stack without.

``scripts/bench.py --tls-overhead`` runs :func:`tls_overhead`: for ``--repeat``
repetitions, a plain private stack (``bench_stack.private_stack``: redis-server with a
password, one prefork worker of ``--processes`` processes) and a TLS one (:func:`tls_stack`:
the same, but a redis-server that listens with TLS only and knows the users of
``services/redis/users.acl``, as stack.yaml runs it; the worker connects as ``worker``,
the client as ``client``), in alternating order (plain first on even repetitions, TLS
first on odd), each started afresh. On each it measures

- the single-call round trip: the median of ``--latency-samples`` calls, one at a time,
  by ``bench.latency`` (the latency probe: ``ClusterExecutor.submit`` and plain Celery
  ``send_task`` alternating call by call), and
- the wall time of ``ClusterExecutor.map`` over the tiny workload (``--tiny`` items of
  ~0.1 ms, ``bench.spin_workload``), on a fresh executor warmed as bench.py's
  ``ClusterExecutor.map`` method warms it.

Reported per mode: the per-repetition values, their median and min-max; and the
TLS/plain ratio of each repetition (the two runs minutes apart at most), median and
min-max. The TLS server has the plain one's persistence and memory lines (append-only
file, as the image's redis.conf), so TLS and the ACL users are the only difference.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from scripts.bench import Workload, latency, settle_garbage, spin_workload
from scripts.bench_stack import Stack, free_port, private_stack, stop, wait
from tasks.compute import noop
from taskstack import ClusterExecutor, Settings
from taskstack.services.local import redis_command, write_private

ROOT = Path(__file__).resolve().parent.parent
REDIS_DIR = ROOT / "services" / "redis"
USERS = ("admin", "worker", "client")
"""The users this stack needs: admin pings, the worker and the client do the work."""
MAP_TIMEOUT = 600.0
MODES = ("plain", "tls")
MEASURES = {
    "executor_ms": "ClusterExecutor.submit round trip, p50 (ms)",
    "celery_ms": "plain Celery send_task round trip, p50 (ms)",
    "tiny_map_s": "tiny items through ClusterExecutor.map (s)",
}


@dataclass
class TlsRedis:
    port: int
    ca: Path
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return f"rediss://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"


def lib_sh(function: str, *args: str, env: dict[str, str]) -> str:
    """Output of a function of the image's services/redis/lib.sh, run here by sh."""
    script = f'. "{REDIS_DIR}/lib.sh" && {function} "$@"'
    return subprocess.run(
        ["sh", "-c", script, "lib.sh", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


@contextmanager
def tls_redis(
    directory: Path, maxmemory: int, users: tuple[str, ...] = USERS
) -> Iterator[TlsRedis]:
    """A redis-server in ``directory`` listening on loopback with TLS only, with ``users``
    (default user off; ``admin`` among them), once it answers PING over TLS; stopped on
    leaving. tests/integration/test_acl.py runs it too."""
    secrets_dir = directory / "secrets"
    subprocess.run(
        [ROOT / "scripts" / "swarm-certs"],
        env={**os.environ, "TASKSTACK_SECRETS_DIR": str(secrets_dir)},
        check=True,
        capture_output=True,
        timeout=60,
    )
    passwords = {user: secrets.token_urlsafe(16) for user in users}
    for user, password in passwords.items():
        write_private(secrets_dir / f"redis_user_{user}", password)
    port = free_port()
    acl = lib_sh(
        "acl_users", str(REDIS_DIR / "users.acl"), env={"REDIS_USERS_DIR": str(secrets_dir)}
    )
    tls = lib_sh(
        "tls_config",
        str(port),
        env={
            "REDIS_TLS_CERT_FILE": str(secrets_dir / "redis_tls.crt"),
            "REDIS_TLS_KEY_FILE": str(secrets_dir / "redis_tls.key"),
            "REDIS_TLS_CA_FILE": str(secrets_dir / "redis_ca.crt"),
        },
    )
    data = directory / "data"
    data.mkdir()
    # As the plain private stack's config (taskstack.services.local.redis_config).
    durable = f"appendonly yes\nmaxmemory {maxmemory}\nmaxmemory-policy noeviction\nsave ''\n"
    config = write_private(
        directory / "redis.conf", f"bind 127.0.0.1\ndir {data}\n{durable}{acl}{tls}"
    )
    server = TlsRedis(port, secrets_dir / "redis_ca.crt", passwords)
    with (directory / "redis.log").open("wb") as log:
        admin = redis.Redis(
            port=port,
            username="admin",
            password=passwords["admin"],
            ssl=True,
            ssl_ca_certs=str(server.ca),
            ssl_cert_reqs="required",
            socket_timeout=5,
        )
        process = subprocess.Popen(redis_command(config), stdout=log, stderr=subprocess.STDOUT)

        def ping() -> bool:
            if process.poll() is not None:
                raise SystemExit(f"bench: redis-server exited; see {directory / 'redis.log'}")
            return bool(admin.ping())

        try:
            wait(ping, "redis-server over TLS", timeout=30)
            admin.acl_log_reset()
            yield server
            # A refused command would make this a measure of something else than TLS.
            for entry in admin.acl_log(count=10):
                print(f"bench: Redis refused {entry}", file=sys.stderr)
        finally:
            admin.close()
            stop(process)


@contextmanager
def tls_stack(processes: int) -> Iterator[Settings]:
    """As ``private_stack``, over :func:`tls_redis`: yields the client's settings."""
    tmp = Path(tempfile.mkdtemp(prefix="taskstack-bench-tls-"))
    try:
        with (
            (tmp / "stack.log").open("wb") as log,
            tls_redis(tmp, Settings().redis_maxmemory) as server,  # private_stack's maxmemory
        ):
            worker = Settings(
                redis_url=server.url("worker"),
                redis_tls_ca_file=str(server.ca),
                secret=secrets.token_urlsafe(32),
                cpu_concurrency=processes,
                shared_dir=str(tmp / "shared"),
                metrics_port=free_port(),  # serves its metrics, as private_stack's worker
            )
            env = {**os.environ, **worker.to_env()}
            description = "private TLS redis-server + 1 prefork worker"
            stack = Stack(worker, description, processes, env=env, log=log)
            try:
                stack.start_worker()
                yield replace(worker, redis_url=server.url("client"))
            finally:
                stack.stop_worker()  # the worker first: it hands work back to Redis
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def plain_stack(processes: int) -> Iterator[Settings]:
    with private_stack(processes) as stack:
        yield stack.settings


STACKS: dict[str, Callable[[int], AbstractContextManager[Settings]]] = {
    "plain": plain_stack,
    "tls": tls_stack,
}


def measure_stack(client: Settings, args: argparse.Namespace, tiny: Workload) -> dict[str, float]:
    """The latency probe's p50s, then one timed map of the tiny items on a fresh executor."""
    probe = latency(client, args.latency_samples)
    with ClusterExecutor(settings=client) as executor:
        list(executor.map(noop, range(args.processes * 4), timeout=60))
        settle_garbage()
        start = time.perf_counter()
        got = list(executor.map(tiny.fn, tiny.items, timeout=MAP_TIMEOUT))
        seconds = time.perf_counter() - start
    tiny.check(got)
    return {
        "executor_ms": probe["ClusterExecutor.submit"]["p50_ms"],
        "celery_ms": probe["plain Celery send_task"]["p50_ms"],
        "tiny_map_s": seconds,
    }


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "runs": values,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def tls_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """Both stacks, ``args.repeat`` times in alternating order, each started afresh."""
    tiny = spin_workload("tiny", args.tiny, 0.0001)
    runs: dict[str, dict[str, list[float]]] = {m: {k: [] for k in MEASURES} for m in MODES}
    for rep in range(args.repeat):
        for mode in MODES if rep % 2 == 0 else MODES[::-1]:
            print(f"[{rep + 1}/{args.repeat}] TLS overhead: {mode} stack", file=sys.stderr)
            with STACKS[mode](args.processes) as client:
                for name, value in measure_stack(client, args, tiny).items():
                    runs[mode][name].append(value)
    ratios = {
        name: [t / p for t, p in zip(runs["tls"][name], runs["plain"][name], strict=True)]
        for name in MEASURES
    }
    return {
        "items": args.tiny,
        "latency_samples": args.latency_samples,
        "processes": args.processes,
        "repeat": args.repeat,
        "modes": {m: {k: spread(v) for k, v in runs[m].items()} for m in MODES},
        "tls_vs_plain": {k: spread(v) for k, v in ratios.items()},
    }


def tls_table(result: dict[str, Any]) -> str:
    def cell(s: dict[str, Any], digits: int, unit: str = "") -> str:
        return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    lines = [
        "",
        f"TLS + ACL users vs plain Redis: {result['repeat']} repetition(s), alternating, each "
        f"stack started afresh ({result['processes']} worker processes); latency: "
        f"{result['latency_samples']:,} calls a method, tiny: {result['items']:,} x 0.1 ms",
        "",
        "| measure | plain: median (min-max) | TLS: median (min-max) | TLS / plain |",
        "|---|---|---|---|",
    ]
    for name, title in MEASURES.items():
        digits = 3 if name.endswith("_s") else 2
        plain, tls = result["modes"]["plain"][name], result["modes"]["tls"][name]
        ratio = cell(result["tls_vs_plain"][name], 2, "x")
        lines.append(f"| {title} | {cell(plain, digits)} | {cell(tls, digits)} | {ratio} |")
    return "\n".join(lines)
