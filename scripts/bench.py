#!/usr/bin/env python3
"""Cluster executor, Pool and joblib backend against their local counterparts.

One run, one machine, the same worker processes for every cluster method:

    python scripts/bench.py                      # starts a private redis-server + cpu worker
    REDIS_URL=redis://:pw@host:6379/0 TASKSTACK_SECRET=... python scripts/bench.py --use-running

Workloads: many tiny items (~0.1 ms each) and fewer larger ones (~10 ms each),
as ``serial``, ``multiprocessing.Pool``, ``ProcessPoolExecutor``, joblib (loky),
plain Celery (one task per item), and this project's ``ClusterExecutor``,
``Pool`` and joblib backend; then 5,000 individually submitted no-op calls and
the round-trip latency of a single call. Efficiency = serial time /
(processes x parallel time). Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import celery
import joblib
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.compute import noop, spin
from taskstack import JOBLIB_BACKEND, ClusterExecutor, Pool, Settings, names
from taskstack.app import create_app
from taskstack.capacity import capacity
from taskstack.services.local import redis_command, worker_command, write_redis_config


def calibrate(seconds: float) -> int:
    """Iterations of :func:`spin` that take about ``seconds`` here."""
    n = 20_000
    start = time.perf_counter()
    spin(n)
    per_iteration = (time.perf_counter() - start) / n
    return max(1, round(seconds / per_iteration))


@contextmanager
def private_stack(processes: int) -> Iterator[Settings]:
    """A throwaway redis-server and one prefork worker of ``processes`` processes."""
    tmp = Path(tempfile.mkdtemp(prefix="taskstack-bench-"))
    with socket_port() as port:
        pass
    settings = Settings(
        redis_url=f"redis://:{secrets.token_urlsafe(12)}@127.0.0.1:{port}/0",
        secret=secrets.token_urlsafe(32),
        cpu_concurrency=processes,
    )
    env = dict(
        os.environ,
        REDIS_URL=settings.redis_url,
        TASKSTACK_SECRET=settings.secret,
        WORKER_CPU_CONCURRENCY=str(processes),
    )
    log = (tmp / "stack.log").open("wb")
    children = [
        subprocess.Popen(
            redis_command(write_redis_config(settings, tmp)), stdout=log, stderr=subprocess.STDOUT
        )
    ]
    client = redis.Redis.from_url(settings.redis_url)
    try:
        wait(client.ping, "redis-server")
        children.append(
            subprocess.Popen(
                [*worker_command("cpu", f"bench-{port}"), "--loglevel=WARNING"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        wait(lambda: capacity(client, names.CPU_QUEUE).processes >= processes, "the cpu worker")
        yield settings
    finally:
        for child in reversed(children):  # the worker first: it hands work back to Redis
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                log.flush()
                tail = (tmp / "stack.log").read_text(errors="replace").splitlines()[-30:]
                print(
                    f"bench: {program(child)} ignored SIGTERM; its log ends:",
                    *tail,
                    sep="\n",
                    file=sys.stderr,
                )
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)


def program(child: subprocess.Popen[bytes]) -> str:
    """The program a child process runs, for messages."""
    argv = child.args
    if isinstance(argv, Sequence) and not isinstance(argv, str | bytes):
        return os.fsdecode(argv[0])
    return os.fsdecode(argv)


@contextmanager
def socket_port() -> Iterator[int]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


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


def spin_each(items: list[int]) -> list[int]:
    """The serial baseline: :func:`spin` over the items in this process."""
    return [spin(n) for n in items]


def timed(run: Callable[[], list[Any]], expected: list[Any], repeat: int) -> float:
    """Median wall time of ``run`` over ``repeat`` runs, each checked for correct results."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        got = run()
        times.append(time.perf_counter() - start)
        if got != expected:
            raise SystemExit("bench: a method returned wrong results")
    return statistics.median(times)


@contextmanager
def map_methods(
    settings: Settings, processes: int
) -> Iterator[dict[str, Callable[[list[int]], list[Any]]]]:
    """Each method maps ``spin`` over a list of iteration counts, pools already warm."""
    fork = multiprocessing.get_context("fork")
    with (
        fork.Pool(processes) as mp_pool,
        ProcessPoolExecutor(processes, mp_context=fork) as ppe,
        ClusterExecutor(settings=settings) as executor,
        Pool(settings=settings) as pool,
    ):
        app = create_app(settings)
        list(ppe.map(noop, range(processes * 4)))
        executor.submit(noop).result()
        try:
            yield _map_methods(settings, processes, mp_pool, ppe, executor, pool, app)
        finally:
            app.close()


def _map_methods(
    settings: Settings,
    processes: int,
    mp_pool: Any,
    ppe: ProcessPoolExecutor,
    executor: ClusterExecutor,
    pool: Pool,
    app: celery.Celery,
) -> dict[str, Callable[[list[int]], list[Any]]]:

    def loky(items: list[int]) -> list[Any]:
        return list(joblib.Parallel(n_jobs=processes)(joblib.delayed(spin)(n) for n in items))

    def cluster_joblib(items: list[int]) -> list[Any]:
        with joblib.parallel_config(backend=JOBLIB_BACKEND, settings=settings):
            return list(joblib.Parallel(n_jobs=-1)(joblib.delayed(spin)(n) for n in items))

    def plain_celery(items: list[int]) -> list[Any]:
        results = [app.send_task(names.SPIN, (n,)) for n in items]
        return [r.get(timeout=600) for r in results]

    loky([1] * processes * 4)
    return {
        "multiprocessing.Pool": lambda items: mp_pool.map(spin, items),
        "ProcessPoolExecutor": lambda items: list(ppe.map(spin, items)),
        "joblib (loky)": loky,
        "plain Celery, task per item": plain_celery,
        "ClusterExecutor.map": lambda items: list(executor.map(spin, items)),
        "cluster Pool.map": lambda items: pool.map(spin, items),
        "cluster joblib backend": cluster_joblib,
    }


def submit_rate(settings: Settings, count: int) -> dict[str, float]:
    """Individually submitted no-op calls resolved per second, executor vs plain Celery."""
    rates = {}
    with ClusterExecutor(settings=settings) as executor:
        executor.submit(noop).result()
        start = time.perf_counter()
        futures = [executor.submit(noop, i) for i in range(count)]
        assert [f.result() for f in futures] == list(range(count))
        rates["ClusterExecutor.submit"] = count / (time.perf_counter() - start)
    app = create_app(settings)
    start = time.perf_counter()
    results = [app.send_task(names.NOOP, (i,)) for i in range(count)]
    assert [r.get(timeout=600) for r in results] == list(range(count))
    rates["plain Celery send_task"] = count / (time.perf_counter() - start)
    app.close()
    return rates


def latency(settings: Settings, samples: int) -> dict[str, dict[str, float]]:
    """One call at a time: p50 and p99 round trip in milliseconds."""

    def percentiles(run: Callable[[], Any]) -> dict[str, float]:
        run()
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
        q = statistics.quantiles(times, n=100)
        return {"p50_ms": statistics.median(times), "p99_ms": q[98]}

    app = create_app(settings)
    with ClusterExecutor(settings=settings) as executor:
        out = {
            "ClusterExecutor.submit": percentiles(lambda: executor.submit(noop, 1).result()),
            "plain Celery send_task": percentiles(
                lambda: app.send_task(names.NOOP, (1,)).get(timeout=60)
            ),
        }
    app.close()
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    methods = list(next(iter(workloads.values()))["efficiency"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(workloads)
    for i, (name, data) in enumerate(workloads.items()):
        xs = [m + i * width for m in range(len(methods))]
        ax.bar(xs, [data["efficiency"][m] for m in methods], width, label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks([m + width * (len(workloads) - 1) / 2 for m in range(len(methods))])
    ax.set_xticklabels(methods, rotation=25, ha="right")
    ax.set_ylabel("efficiency = serial / (processes x time)")
    ax.set_title(f"map efficiency, {report['setup']['processes']} worker processes")
    ax.legend()
    lat = report["latency"]
    names = list(lat)
    ax2.bar([0, 1], [lat[n]["p50_ms"] for n in names], 0.4, label="p50")
    ax2.bar([0.4, 1.4], [lat[n]["p99_ms"] for n in names], 0.4, label="p99")
    ax2.set_xticks([0.2, 1.2])
    ax2.set_xticklabels([n.replace(" ", "\n", 1) for n in names])
    ax2.set_ylabel("single call round trip (ms)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="worker processes (private stack) and local pool size",
    )
    parser.add_argument("--tiny", type=int, default=20_000, help="items in the ~0.1 ms workload")
    parser.add_argument("--large", type=int, default=400, help="items in the ~10 ms workload")
    parser.add_argument(
        "--submits", type=int, default=5_000, help="individually submitted no-op calls"
    )
    parser.add_argument("--latency-samples", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; the median is kept")
    parser.add_argument(
        "--use-running",
        action="store_true",
        help="use the stack named by REDIS_URL/TASKSTACK_SECRET instead of a private one",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument(
        "--metrics-overhead",
        action="store_true",
        help="also time the tiny workload with the workers' item metrics on and off",
    )
    args = parser.parse_args()

    with nullcontext_settings() if args.use_running else private_stack(args.processes) as settings:
        report = run(settings, args)
    if args.metrics_overhead:
        report["metrics_overhead"] = metrics_overhead(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "bench.png")
    print(table(report))
    if args.metrics_overhead:
        print(metrics_table(report["metrics_overhead"]))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


@contextmanager
def nullcontext_settings() -> Iterator[Settings]:
    yield Settings.from_env()


def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    processes = args.processes
    if args.use_running:
        with redis.Redis.from_url(settings.redis_url) as client:
            processes = capacity(client, names.CPU_QUEUE).processes
    report: dict[str, Any] = {
        "setup": {
            "processes": processes,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "celery": celery.__version__,
            "joblib": joblib.__version__,
            "repeat": args.repeat,
            "stack": "running stack"
            if args.use_running
            else "private redis-server + 1 prefork worker",
            "date": time.strftime("%Y-%m-%d"),
        },
        "workloads": {},
    }
    with map_methods(settings, processes) as methods:
        measure_maps(report, methods, processes, args)
    print("submits and latency...", file=sys.stderr)
    report["submit_rate_per_s"] = submit_rate(settings, args.submits)
    report["latency"] = latency(settings, args.latency_samples)
    for data in report["workloads"].values():
        eff = data["efficiency"]
        data["vs_ProcessPoolExecutor"] = {
            m: eff[m] / eff["ProcessPoolExecutor"]
            for m in eff
            if m.startswith(("Cluster", "cluster"))
        }
    return report


def measure_maps(
    report: dict[str, Any],
    methods: dict[str, Callable[[list[int]], list[Any]]],
    processes: int,
    args: argparse.Namespace,
) -> None:
    for label, items, seconds in (("tiny", args.tiny, 0.0001), ("large", args.large, 0.01)):
        n = calibrate(seconds)
        work = [n] * items
        expected = [spin(n)] * items
        name = f"{items:,} x {seconds * 1000:g} ms"
        print(f"[{name}] serial...", file=sys.stderr)
        serial = timed(functools.partial(spin_each, work), expected, args.repeat)
        times = {"serial": serial}
        for method, run_map in methods.items():
            print(f"[{name}] {method}...", file=sys.stderr)
            times[method] = timed(functools.partial(run_map, work), expected, args.repeat)
        report["workloads"][name] = {
            "label": label,
            "seconds": times,
            "efficiency": {m: serial / (processes * t) for m, t in times.items() if m != "serial"},
        }


def table(report: dict[str, Any]) -> str:
    workloads = report["workloads"]
    names = list(workloads)
    methods = ["serial", *next(iter(workloads.values()))["efficiency"]]
    lines = [
        f"Setup: {report['setup']['processes']} worker processes, {report['setup']['stack']}, "
        f"{report['setup']['cpus']} CPUs, median of {report['setup']['repeat']}",
        "",
        "| method | " + " | ".join(f"{n}: time (s) / efficiency" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for m in methods:
        cells = []
        for n in names:
            t = workloads[n]["seconds"][m]
            e = workloads[n]["efficiency"].get(m)
            cells.append(f"{t:.2f}" + (f" / {e:.2f}" if e is not None else ""))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| cluster method vs ProcessPoolExecutor | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for m in workloads[names[0]]["vs_ProcessPoolExecutor"]:
        lines.append(
            f"| {m} | "
            + " | ".join(f"{workloads[n]['vs_ProcessPoolExecutor'][m]:.2f}x" for n in names)
            + " |"
        )
    lines += [
        "",
        "| calls | no-op futures resolved / s | single call p50 (ms) | p99 (ms) |",
        "|---|---|---|---|",
    ]
    for m, rate in report["submit_rate_per_s"].items():
        lat = report["latency"][m]
        lines.append(f"| {m} | {rate:,.0f} | {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} |")
    return "\n".join(lines)


def metrics_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """The tiny workload through ClusterExecutor.map on two private stacks, one whose
    worker records item metrics (WORKER_METRICS_PORT set) and one without (0).

    Both stacks are up for the whole comparison and the runs alternate, on, off,
    on, off..., so a machine that slows down meanwhile slows both alike.
    """
    print("metrics on/off...", file=sys.stderr)
    items = [calibrate(0.0001)] * args.tiny
    expected = spin_each(items)
    times: dict[str, list[float]] = {"on": [], "off": []}
    with ExitStack() as stacks:
        executors: dict[str, ClusterExecutor] = {}
        for mode in times:
            with socket_port() as port:
                pass
            previous = os.environ.get("WORKER_METRICS_PORT")
            os.environ["WORKER_METRICS_PORT"] = str(port) if mode == "on" else "0"
            try:
                settings = stacks.enter_context(private_stack(args.processes))
            finally:
                if previous is None:
                    os.environ.pop("WORKER_METRICS_PORT")
                else:
                    os.environ["WORKER_METRICS_PORT"] = previous
            executors[mode] = stacks.enter_context(ClusterExecutor(settings=settings))
            list(executors[mode].map(spin, items))  # warm: per-call cost measured, imports done
        for _ in range(args.repeat):
            for mode, executor in executors.items():
                times[mode].append(
                    timed(lambda ex=executor: list(ex.map(spin, items)), expected, 1)  # type: ignore[misc]
                )
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {"items": args.tiny, "on_s": on, "off_s": off, "overhead_pct": (on / off - 1) * 100}


def metrics_table(result: dict[str, Any]) -> str:
    return (
        f"\nitem metrics, {result['items']:,} x 0.1 ms through ClusterExecutor.map: "
        f"on {result['on_s']:.3f} s, off {result['off_s']:.3f} s, "
        f"overhead {result['overhead_pct']:+.1f} %"
    )


if __name__ == "__main__":
    main()
