"""The systems the multi-host benchmark compares, each started on the first ``n`` hosts.

A system is a context manager registered with :func:`system`: given the lab
and ``n``, it starts its workers on hosts 1..n (untimed), waits until all of
them serve, and yields a function that opens the system's client for one run
(a context manager yielding a runner of one workload). Leaving it stops the
workers and clears the hosts.

- ``taskstack``: on each host one prefork worker of the stack (the command
  the image runs, ``taskstack.worker.main cpu``) with ``WORKER_CPU_CONCURRENCY=1``,
  reaching Redis through the relay; the client is a fresh ``ClusterExecutor``
  per run, the array passed as ``share(array)``.
- ``dask``: a scheduler on this machine, on each host one ``dask worker``
  (one thread, no nanny), reaching the scheduler and each other through the
  relay; one ``Client`` per start, ``client.map``, the array scattered with
  ``broadcast=False`` and its future mapped over.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from scripts.bench import Runner, Workload
from scripts.bench_hosts_lab import DASK_WORKER_PORT, Lab, stop_all
from scripts.bench_stack import stop, wait
from tasks.compute import noop, strided_sum
from taskstack import ClusterExecutor, names, share
from taskstack.capacity import capacity
from taskstack.services.local import worker_command

Opener = Callable[[], AbstractContextManager[Runner]]
SYSTEMS: dict[str, Callable[[Lab, int], AbstractContextManager[Opener]]] = {}
START_TIMEOUT = 120
"""Workers start in their quotas while others start beside them: seconds each."""


def system(name: str) -> Callable[[Callable[[Lab, int], Iterator[Opener]]], None]:
    def register(fn: Callable[[Lab, int], Iterator[Opener]]) -> None:
        SYSTEMS[name] = contextlib.contextmanager(fn)

    return register


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment for a host's process, with the checkout importable (the workloads)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@contextlib.contextmanager
def logged_on_failure(lab: Lab, n: int, log: str) -> Iterator[None]:
    """Show the end of each host's ``log`` when the workers fail to start."""
    try:
        yield
    except (Exception, SystemExit):  # not on Ctrl-C
        for host in lab.hosts[:n]:
            path = host.directory / log
            tail = path.read_text(errors="replace")[-2000:] if path.exists() else "(none)"
            print(f"--- {host.name}: {log}\n{tail}", file=sys.stderr)
        raise


@system("taskstack")
def taskstack(lab: Lab, n: int) -> Iterator[Opener]:
    workers = []
    try:
        for host in lab.hosts[:n]:
            node = f"{host.name}-{secrets.token_hex(3)}"
            env = child_env(lab.worker_settings(host).to_env())
            argv = [*worker_command(names.CPU_QUEUE, node), "--loglevel=WARNING"]
            workers.append(host.spawn(argv, env, "worker.log"))
        with logged_on_failure(lab, n, "worker.log"):
            wait(
                lambda: capacity(lab.redis, names.CPU_QUEUE).processes == n,
                f"{n} taskstack worker(s)",
                START_TIMEOUT,
            )

        @contextlib.contextmanager
        def opener() -> Iterator[Runner]:
            with ClusterExecutor(settings=lab.settings) as executor:
                list(executor.map(noop, range(n * 4), timeout=60))

                def run(w: Workload) -> list[Any]:
                    if w.array is None:
                        return list(executor.map(w.fn, w.items))
                    handle: Any = share(w.array)  # on the workers: the array itself
                    fn = functools.partial(strided_sum, handle)
                    return list(executor.map(fn, w.items))

                yield run

        yield opener
    finally:
        stop_all(workers)
        lab.clear_hosts()
        # a stopped worker withdraws its beacon: the next start counts only its own
        wait(lambda: capacity(lab.redis, names.CPU_QUEUE).processes == 0, "beacons withdrawn")


@system("dask")
def dask(lab: Lab, n: int) -> Iterator[Opener]:
    from distributed import Client

    scheduler_argv = [
        *(sys.executable, "-m", "distributed.cli.dask_scheduler"),
        *("--host", "127.0.0.1", "--port", str(lab.scheduler_port), "--no-dashboard"),
    ]
    with (lab.directory / "scheduler.log").open("ab") as log:
        scheduler = subprocess.Popen(
            scheduler_argv, env=child_env({}), stdout=log, stderr=subprocess.STDOUT
        )
    lab.scheduler_pid = scheduler.pid
    workers = []
    client = None
    try:
        for host in lab.hosts[:n]:
            argv = [
                *(sys.executable, "-m", "distributed.cli.dask_worker", lab.scheduler_address()),
                *("--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", host.name),
                *("--listen-address", f"tcp://{host.address}:{DASK_WORKER_PORT}"),
                *("--contact-address", lab.worker_contact(host)),
                *("--memory-limit", "0", "--local-directory", str(host.directory / "dask")),
                *("--death-timeout", "60"),
            ]
            workers.append(host.spawn(argv, child_env({}), "dask-worker.log"))
        with logged_on_failure(lab, n, "dask-worker.log"):
            client = Client(f"tcp://127.0.0.1:{lab.scheduler_port}", timeout=START_TIMEOUT)
            client.wait_for_workers(n, timeout=START_TIMEOUT)
        dask_client = client

        @contextlib.contextmanager
        def opener() -> Iterator[Runner]:
            dask_client.gather(dask_client.map(noop, range(n * 4), pure=False))

            def run(w: Workload) -> list[Any]:
                if w.array is None:
                    return list(dask_client.gather(dask_client.map(w.fn, w.items, pure=False)))
                [array] = dask_client.scatter([w.array], broadcast=False)
                futures = dask_client.map(strided_sum, [array] * len(w.items), w.items, pure=False)
                got = list(dask_client.gather(futures))
                del futures, array  # released: the next run's array replaces it
                return got

            yield run

        yield opener
    finally:
        if client is not None:
            client.close()
        stop_all(workers)
        stop(scheduler)
        lab.scheduler_pid = None
        lab.clear_hosts()
