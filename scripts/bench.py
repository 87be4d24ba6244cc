#!/usr/bin/env python3
"""Cluster executor, Pool and joblib backend against their local counterparts and Dask.

One invocation, one machine:

    python scripts/bench.py                      # starts a private redis-server + cpu worker
    python scripts/bench.py --repeat 1 --tiny 2000 --large 40 --shared-calls 100   # quick
    python scripts/bench.py --workloads shared --methods "joblib (loky),ClusterExecutor.map"
    python scripts/bench.py --workloads tiny --methods ClusterExecutor.map --probes none --tls-overhead
    REDIS_URL=redis://:pw@host:6379/0 TASKSTACK_SECRET=... python scripts/bench.py --use-running

Workloads (``WORKLOADS``): many tiny items (~0.1 ms each), fewer larger ones
(~10 ms each), and a map of 1,000 calls that all read one 50 MB NumPy array
(``functools.partial``). Methods (``METHODS``): serial, ``multiprocessing.Pool``,
``ProcessPoolExecutor``, joblib (loky), Dask ``LocalCluster`` ``client.map``,
plain Celery (one task per item), and this project's ``ClusterExecutor``,
``Pool`` and joblib backend; then individually submitted no-op calls and the
round-trip latency of a single call (``PROBES``).

Order does not pick the winner: every repetition runs every method on one
workload, then on the next, in an order rotated by one per repetition, so
each method follows each other alike (a method over 10 s a run, such as Dask
or plain Celery on the tiny items, repeats ``--slow-repeat`` times only);
each run opens the method afresh (a new pool or executor: nothing learnt on
another run), and ``--fresh-worker`` also restarts the worker before each
cluster run. The table shows the median
and the spread (min-max) of the repetitions. Efficiency = serial time /
(processes x time); "vs best local" = the time of the local baseline with
the lower median (``multiprocessing.Pool`` or loky) / the method's, paired
within each repetition (median and spread of those ratios). For the shared
array, the table adds the bytes that went through Redis per map and how much the
worker's processes grew (their proportional set size, private stack only).
Prints a table, writes JSON and a PNG plot.

A method is a context manager registered with :func:`method`: it sets up
(pools, clients; untimed) and yields a function that runs one workload.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import celery
import joblib
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_stack import (
    Stack,
    argument_parser,
    private_stack,
    running_stack,
    worker_pss,
)
from tasks.compute import noop, spin, strided_sum
from taskstack import JOBLIB_BACKEND, ClusterExecutor, Pool, Settings, names
from taskstack.app import create_app
from taskstack.client.joblib_backend import shutdown_executors

Runner = Callable[["Workload"], list[Any]]


# -- workloads ----------------------------------------------------------------------------


@dataclass
class Workload:
    """One map to time: ``fn`` over ``items``, whose results must equal ``expected``."""

    name: str
    title: str
    fn: Callable[[Any], Any]
    items: list[Any]
    expected: list[Any]
    array: np.ndarray[Any, Any] | None = None
    """The big array every call reads, when there is one."""

    def fresh(self, run: int) -> Workload:
        """This workload with an array of its own for ``run``: nothing cached from earlier runs."""
        if self.array is None:
            return self
        array = self.array.copy()
        array[0] = run
        fn = functools.partial(strided_sum, array)
        expected = [fn(item) for item in self.items]
        return Workload(self.name, self.title, fn, self.items, expected, array)

    def check(self, got: list[Any]) -> None:
        if len(got) != len(self.expected) or not np.allclose(got, self.expected):
            raise SystemExit(f"bench: a method returned wrong results for {self.title}")


def calibrate(seconds: float) -> int:
    """Iterations of :func:`spin` that take about ``seconds`` here.

    The fastest of several tries: on a busy machine one try that was preempted made
    the 10 ms items of a run 5 ms ones.
    """
    n = 20_000
    tries = []
    for _ in range(7):
        start = time.perf_counter()
        spin(n)
        tries.append(time.perf_counter() - start)
    return max(1, round(seconds / (min(tries) / n)))


def spin_workload(name: str, count: int, seconds: float) -> Workload:
    n = calibrate(seconds)
    return Workload(
        name, f"{count:,} x {seconds * 1000:g} ms", spin, [n] * count, [spin(n)] * count
    )


def shared_workload(calls: int, megabytes: int) -> Workload:
    array = np.random.default_rng(0).random(megabytes * 1024 * 1024 // 8)
    items = list(range(calls))
    return Workload(
        "shared",
        f"{calls:,} calls x {megabytes} MB array",
        functools.partial(strided_sum, array),
        items,
        [strided_sum(array, i) for i in items],
        array,
    )


WORKLOADS: dict[str, Callable[[argparse.Namespace], Workload]] = {
    "tiny": lambda args: spin_workload("tiny", args.tiny, 0.0001),
    "large": lambda args: spin_workload("large", args.large, 0.01),
    "shared": lambda args: shared_workload(args.shared_calls, args.shared_mb),
}


# -- methods ------------------------------------------------------------------------------


@dataclass
class Bench:
    """What a method may use: the stack, the process count, the options."""

    stack: Stack
    processes: int
    args: argparse.Namespace

    @property
    def settings(self) -> Settings:
        return self.stack.settings


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    """``local``, ``peer`` (Dask) or ``cluster`` (this stack: gets a fresh worker on request)."""
    open: Callable[[Bench], AbstractContextManager[Runner]]
    handles: Callable[[Workload], bool]


METHODS: dict[str, Method] = {}


def method(
    name: str, kind: str, handles: Callable[[Workload], bool] = lambda w: True
) -> Callable[[Callable[[Bench], Iterator[Runner]]], None]:
    """Register a method: a generator that sets up, yields a runner, and tears down."""

    def register(fn: Callable[[Bench], Iterator[Runner]]) -> None:
        METHODS[name] = Method(name, kind, contextmanager(fn), handles)

    return register


def no_array(workload: Workload) -> bool:
    return workload.array is None


@method("serial", "local")
def serial(bench: Bench) -> Iterator[Runner]:
    yield lambda w: [w.fn(item) for item in w.items]


@method("multiprocessing.Pool", "local")
def mp_pool(bench: Bench) -> Iterator[Runner]:
    with multiprocessing.get_context("fork").Pool(bench.processes) as pool:
        pool.map(noop, range(bench.processes * 4))
        yield lambda w: pool.map(w.fn, w.items)


# chunksize=1 (its default) pickles the array once per call: 50 GB for the shared map.
@method("ProcessPoolExecutor", "local", handles=no_array)
def process_pool(bench: Bench) -> Iterator[Runner]:
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(bench.processes, mp_context=fork) as ppe:
        list(ppe.map(noop, range(bench.processes * 4)))
        yield lambda w: list(ppe.map(w.fn, w.items))


@method("joblib (loky)", "local")
def loky(bench: Bench) -> Iterator[Runner]:
    with joblib.Parallel(n_jobs=bench.processes) as parallel:
        parallel(joblib.delayed(noop)(i) for i in range(bench.processes * 4))
        yield lambda w: list(parallel(joblib.delayed(w.fn)(item) for item in w.items))


@method("Dask LocalCluster client.map", "peer")
def dask(bench: Bench) -> Iterator[Runner]:
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=bench.processes,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.gather(client.map(noop, range(bench.processes * 4)))

        def run(w: Workload) -> list[Any]:
            if w.array is None:
                return list(client.gather(client.map(w.fn, w.items, pure=False)))
            # Dask's own advice for large arguments: scatter them, then pass the future.
            [array] = client.scatter([w.array], broadcast=True)
            futures = client.map(strided_sum, [array] * len(w.items), w.items, pure=False)
            return list(client.gather(futures))

        yield run


@method("plain Celery, task per item", "cluster", handles=no_array)
def plain_celery(bench: Bench) -> Iterator[Runner]:
    app = create_app(bench.settings)
    try:

        def run(w: Workload) -> list[Any]:
            results = [app.send_task(names.SPIN, (n,)) for n in w.items]
            return [r.get(timeout=600) for r in results]

        yield run
    finally:
        app.close()


@method("ClusterExecutor.map", "cluster")
def cluster_executor(bench: Bench) -> Iterator[Runner]:
    with ClusterExecutor(settings=bench.settings) as executor:
        list(executor.map(noop, range(bench.processes * 4), timeout=60))
        yield lambda w: list(executor.map(w.fn, w.items))


@method("cluster Pool.map", "cluster")
def cluster_pool(bench: Bench) -> Iterator[Runner]:
    with Pool(settings=bench.settings) as pool:
        pool.map(noop, range(bench.processes * 4))
        yield lambda w: pool.map(w.fn, w.items)


@method("cluster joblib backend", "cluster")
def cluster_joblib(bench: Bench) -> Iterator[Runner]:
    try:
        with (
            joblib.parallel_config(backend=JOBLIB_BACKEND, settings=bench.settings),
            joblib.Parallel(n_jobs=-1) as parallel,
        ):
            parallel(joblib.delayed(noop)(i) for i in range(bench.processes * 4))
            yield lambda w: list(parallel(joblib.delayed(w.fn)(item) for item in w.items))
    finally:
        shutdown_executors()  # the backend's reused executor, before its stack stops


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Measured:
    seconds: list[float] = field(default_factory=list)
    redis_bytes: list[int] = field(default_factory=list)
    worker_growth: list[int] = field(default_factory=list)


def measure(
    bench: Bench, methods: list[Method], workloads: list[Workload]
) -> dict[str, dict[str, Measured]]:
    """Every method on every workload it handles, ``repeat`` times, in rotating order."""
    out: dict[str, dict[str, Measured]] = {w.name: {} for w in workloads}
    client = redis.Redis.from_url(bench.settings.redis_url)
    runs = 0
    for rep in range(bench.args.repeat):
        for workload in workloads:
            todo = [
                m
                for m in methods
                if m.handles(workload) and repeats(out, workload, m, rep, bench.args.slow_repeat)
            ]
            shift = rep % len(todo)
            for m in todo[shift:] + todo[:shift]:
                if m.kind == "cluster" and bench.args.fresh_worker:
                    bench.stack.restart_worker()
                runs += 1
                w = workload.fresh(runs)  # a run caches nothing for the next one
                print(f"[{rep + 1}/{bench.args.repeat}] {w.title}: {m.name}", file=sys.stderr)
                record = out[w.name].setdefault(m.name, Measured())
                with m.open(bench) as run:  # a fresh executor: no cost learnt on another run
                    traffic = _traffic(client)
                    memory = worker_pss(bench.stack)
                    settle_garbage()
                    start = time.perf_counter()
                    got = run(w)
                    record.seconds.append(time.perf_counter() - start)
                w.check(got)
                if w.array is not None and m.kind == "cluster":
                    record.redis_bytes.append(_traffic(client) - traffic)
                    if memory is not None:
                        record.worker_growth.append((worker_pss(bench.stack) or 0) - memory)
    client.close()
    return out


SLOW_SECONDS = 10.0
"""A method whose first run on a workload took longer repeats only ``--slow-repeat`` times."""


def repeats(
    out: dict[str, dict[str, Measured]], workload: Workload, m: Method, rep: int, slow: int
) -> bool:
    """Whether ``m`` runs ``workload`` in repetition ``rep``: always, unless it is slow (Dask
    and plain Celery took 35-90 s on the tiny items, far from any ratio in question) and
    already ran ``slow`` times. Its ratios pair with the first repetitions, where it ran."""
    record = out[workload.name].get(m.name)
    if record is None or record.seconds[0] <= SLOW_SECONDS:
        return True
    return rep < slow


def settle_garbage() -> None:
    """Collect the harness's garbage before a timed run, so that every run starts from the
    same collector state: a full collection of this process's heap (the workloads, the
    results so far) falling inside a run took 60-90 ms here, a third of a submit round."""
    gc.collect()


def _traffic(client: redis.Redis) -> int:
    stats = client.info("stats")
    return int(stats["total_net_input_bytes"]) + int(stats["total_net_output_bytes"])


LOCAL_BASELINES = ("multiprocessing.Pool", "joblib (loky)")


def best_local(rows: dict[str, Any]) -> str | None:
    """The local baseline with the lower median: the one every method is paired against.

    A method, not the faster of the two runs in each repetition: that would be the
    minimum of two noisy draws, faster than either baseline typically runs (in one
    run here, loky itself came out at 0.92x of it on the tiny items).
    """
    local = [name for name in LOCAL_BASELINES if name in rows]
    return min(local, key=lambda name: rows[name]["median_s"]) if local else None


def summarize(measured: dict[str, Measured], processes: int, efficiency: bool) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name, record in measured.items():
        rows[name] = {
            "seconds": record.seconds,
            "median_s": statistics.median(record.seconds),
            "min_s": min(record.seconds),
            "max_s": max(record.seconds),
        }
        if record.redis_bytes:
            rows[name]["redis_mb_per_map"] = statistics.median(record.redis_bytes) / 2**20
        if record.worker_growth:
            rows[name]["worker_growth_mb"] = max(record.worker_growth) / 2**20
    serial = rows.get("serial", {}).get("median_s")
    baseline = best_local(rows)
    best = measured[baseline].seconds if baseline else []
    for row in rows.values():
        if serial is not None and efficiency:
            row["efficiency"] = serial / (processes * row["median_s"])
        if best:
            # paired: each repetition against the baseline's run of the same repetition,
            # minutes apart at most, so a machine that speeds up or slows down in between
            # moves both alike
            ratios = [b / t for b, t in zip(best, row["seconds"], strict=False)]
            row["vs_best_local"] = statistics.median(ratios)
            row["vs_best_local_min"], row["vs_best_local_max"] = min(ratios), max(ratios)
    return rows


# -- probes: calls one at a time ---------------------------------------------------------


def alternating(methods: list[str], rounds: int) -> Iterator[str]:
    """``methods`` in turn for ``rounds`` rounds, which one goes first alternating too, so
    that a moment when the machine is busy costs each alike."""
    for i in range(rounds):
        yield from methods if i % 2 else methods[::-1]


def submit_rate(settings: Settings, count: int, repeat: int) -> dict[str, dict[str, float]]:
    """Individually submitted no-op calls resolved per second, executor vs plain Celery:
    median and spread of ``repeat`` rounds, the two methods alternating (a fresh executor
    each round, as a program that starts, submits and waits)."""

    def executor_rate() -> float:
        with ClusterExecutor(settings=settings) as executor:
            executor.submit(noop).result()
            settle_garbage()
            start = time.perf_counter()
            futures = [executor.submit(noop, i) for i in range(count)]
            assert [f.result() for f in futures] == list(range(count))
            return count / (time.perf_counter() - start)

    def celery_rate() -> float:
        settle_garbage()
        start = time.perf_counter()
        results = [app.send_task(names.NOOP, (i,)) for i in range(count)]
        assert [r.get(timeout=600) for r in results] == list(range(count))
        return count / (time.perf_counter() - start)

    app = create_app(settings)
    runs = {"ClusterExecutor.submit": executor_rate, "plain Celery send_task": celery_rate}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for name in alternating(list(runs), repeat):
        rates[name].append(runs[name]())
    app.close()
    return {
        name: {"median": statistics.median(r), "min": min(r), "max": max(r)}
        for name, r in rates.items()
    }


def latency(settings: Settings, samples: int) -> dict[str, dict[str, float]]:
    """One call at a time: p50 and p99 round trip in milliseconds.

    The two methods alternate call by call (which goes first alternates too), so a
    moment when the machine is busy costs both alike.
    """
    app = create_app(settings)
    with ClusterExecutor(settings=settings) as executor:
        runs: dict[str, Callable[[], Any]] = {
            "ClusterExecutor.submit": lambda: executor.submit(noop, 1).result(timeout=60),
            "plain Celery send_task": lambda: app.send_task(names.NOOP, (1,)).get(timeout=60),
        }
        for run in runs.values():
            for _ in range(20):  # connections, imports, the workers' first calls
                run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for name in alternating(list(runs), samples):
            start = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - start) * 1000)
    app.close()
    return {
        name: {"p50_ms": statistics.median(t), "p99_ms": statistics.quantiles(t, n=100)[98]}
        for name, t in times.items()
    }


PROBES: dict[str, Callable[[Bench], Any]] = {
    "submit_rate_per_s": lambda b: submit_rate(b.settings, b.args.submits, b.args.repeat),
    "latency": lambda b: latency(b.settings, b.args.latency_samples),
}


# -- output -------------------------------------------------------------------------------


def _ratio(row: dict[str, Any]) -> str:
    if "vs_best_local" not in row:
        return ""
    low, high = row["vs_best_local_min"], row["vs_best_local_max"]
    return f"{row['vs_best_local']:.2f}x ({low:.2f}-{high:.2f})"


def table(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        f"Setup: {setup['processes']} worker processes, {setup['stack']}, {setup['cpus']} CPUs, "
        f"{setup['repeat']} repetition(s) in rotating order"
        + f" ({setup['slow_repeat']} for a method over {SLOW_SECONDS:g} s a run)"
        + (", fresh worker per cluster run" if setup["fresh_worker"] else ""),
    ]
    for workload in report["workloads"].values():
        shared = any("redis_mb_per_map" in r for r in workload["methods"].values())
        head = "| method | median (s) | spread (s) | efficiency | vs best local |"
        title = f"{workload['title']} (best local: {workload.get('baseline')})"
        lines += ["", f"{title}:", "", head + (" Redis MB / map |" if shared else "")]
        lines.append("|---|---|---|---|---|" + ("---|" if shared else ""))
        for name, row in workload["methods"].items():
            cells = [
                f"{row['median_s']:.2f}",
                f"{row['min_s']:.2f}-{row['max_s']:.2f}",
                f"{row['efficiency']:.2f}" if "efficiency" in row else "",
                _ratio(row),
            ]
            if shared:
                mb = row.get("redis_mb_per_map")
                cells.append("" if mb is None else f"{mb:.0f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "submit_rate_per_s" in report and "latency" in report:
        lines += [
            "",
            "| calls | no-op futures resolved / s | spread | single call p50 (ms) | p99 (ms) |",
            "|---|---|---|---|---|",
        ]
        for m, rate in report["submit_rate_per_s"].items():
            lat = report["latency"][m]
            lines.append(
                f"| {m} | {rate['median']:,.0f} | {rate['min']:,.0f}-{rate['max']:,.0f} "
                f"| {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} |"
            )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["workloads"]
    methods = sorted({m for w in workloads.values() for m in w["methods"]}, key=list(METHODS).index)
    latency = report.get("latency")
    fig, axes = plt.subplots(
        1,
        2 if latency else 1,
        figsize=(15, 5),
        squeeze=False,
        width_ratios=[4, 1][: 1 + bool(latency)],
    )
    ax = axes[0][0]
    width = 0.8 / max(1, len(workloads))
    for i, data in enumerate(workloads.values()):
        rows = {n: r for n, r in data["methods"].items() if "vs_best_local" in r}
        shown = [n for n in methods if n in rows]
        speed = [rows[n]["vs_best_local"] for n in shown]
        low = [s - rows[n]["vs_best_local_min"] for s, n in zip(speed, shown, strict=True)]
        high = [rows[n]["vs_best_local_max"] - s for s, n in zip(speed, shown, strict=True)]
        xs = [methods.index(n) + i * width for n in shown]
        ax.bar(xs, speed, width, yerr=[low, high], capsize=2, label=data["title"])
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xticks([m + width * (len(workloads) - 1) / 2 for m in range(len(methods))])
    ax.set_xticklabels(methods, rotation=25, ha="right")
    ax.set_ylabel("speed vs the best local baseline: median, min-max")
    ax.set_title(f"{report['setup']['processes']} worker processes")
    ax.legend()
    if latency:
        lat = axes[0][1]
        calls = list(latency)
        lat.bar([0, 1], [latency[c]["p50_ms"] for c in calls], 0.4, label="p50")
        lat.bar([0.4, 1.4], [latency[c]["p99_ms"] for c in calls], 0.4, label="p99")
        lat.set_xticks([0.2, 1.2])
        lat.set_xticklabels([c.replace(" ", "\n", 1) for c in calls])
        lat.set_ylabel("single call round trip (ms)")
        lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _names(raw: str, known: dict[str, Any], what: str) -> list[str]:
    chosen = [n.strip() for n in raw.split(",") if n.strip()] if raw else list(known)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"bench: unknown {what} {unknown}; known: {list(known)}")
    return chosen


def main() -> None:
    parser = argument_parser(__doc__)
    add = parser.add_argument
    add("--tiny", type=int, default=20_000, help="items in the ~0.1 ms workload")
    add("--large", type=int, default=400, help="items in the ~10 ms workload")
    add("--shared-calls", type=int, default=1000, help="calls in the shared-array workload")
    add("--shared-mb", type=int, default=50, help="size of the shared array")
    add("--submits", type=int, default=5_000, help="individually submitted no-op calls")
    add("--latency-samples", type=int, default=2000)
    add("--repeat", type=int, default=3, help="repetitions; each runs every method once")
    add(
        "--slow-repeat",
        type=int,
        default=3,
        help=f"repetitions of a method whose first run took over {SLOW_SECONDS:g} s",
    )
    add("--workloads", default="", help=f"comma-separated subset of {list(WORKLOADS)}")
    add("--methods", default="", help="comma-separated subset of the method names")
    add("--probes", default="", help=f"comma-separated subset of {list(PROBES)}; 'none' for none")
    add("--fresh-worker", action="store_true", help="restart the worker before each cluster run")
    add(
        "--metrics-overhead",
        action="store_true",
        help="also time the tiny workload with the workers' item metrics on and off",
    )
    add(
        "--tls-overhead",
        action="store_true",
        help="also time a single call and the tiny workload over TLS with Redis users and without",
    )
    args = parser.parse_args()
    methods = [METHODS[n] for n in _names(args.methods, METHODS, "method")]
    workloads = [WORKLOADS[n](args) for n in _names(args.workloads, WORKLOADS, "workload")]
    probes = [] if args.probes == "none" else _names(args.probes, PROBES, "probe")
    if args.use_running and args.fresh_worker:
        raise SystemExit("bench: --fresh-worker restarts the private stack's worker only")

    stack_cm = running_stack() if args.use_running else private_stack(args.processes)
    with stack_cm as stack:
        bench = Bench(stack, stack.processes or args.processes, args)
        report = run(bench, methods, workloads, probes)
    if args.metrics_overhead:
        report["metrics_overhead"] = metrics_overhead(args)
    if args.tls_overhead:
        from scripts.bench_tls import tls_overhead  # which imports this module

        report["tls_overhead"] = tls_overhead(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "bench.png")
    print(table(report))
    if args.metrics_overhead:
        print(metrics_table(report["metrics_overhead"]))
    if args.tls_overhead:
        from scripts.bench_tls import tls_table

        print(tls_table(report["tls_overhead"]))
    print(f"\nwrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")


def run(
    bench: Bench, methods: list[Method], workloads: list[Workload], probes: list[str]
) -> dict[str, Any]:
    import dask

    report: dict[str, Any] = {
        "setup": {
            "processes": bench.processes,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "celery": celery.__version__,
            "joblib": joblib.__version__,
            "dask": dask.__version__,
            "repeat": bench.args.repeat,
            "slow_repeat": bench.args.slow_repeat,
            "fresh_worker": bench.args.fresh_worker,
            "stack": bench.stack.description,
            "date": time.strftime("%Y-%m-%d"),
            "run": secrets.token_hex(4),
        },
        "workloads": {},
    }
    measured = measure(bench, methods, workloads)
    for w in workloads:
        rows = summarize(measured[w.name], bench.processes, w.array is None)
        report["workloads"][w.name] = {
            "title": w.title,
            "baseline": best_local(rows),
            "methods": rows,
        }
    for name in probes:
        print(f"probe: {name}", file=sys.stderr)
        report[name] = PROBES[name](bench)
    return report


def metrics_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """The tiny workload through ClusterExecutor.map on two private stacks, one whose
    worker records item metrics and one whose worker does not (WORKER_METRICS_PORT=0).

    Both stacks are up for the whole comparison and the runs alternate, on, off,
    on, off..., so a machine that slows down meanwhile slows both alike.
    """
    print("metrics on/off...", file=sys.stderr)
    workload = spin_workload("tiny", args.tiny, 0.0001)
    times: dict[str, list[float]] = {"on": [], "off": []}
    with ExitStack() as stacks:
        executors: dict[str, ClusterExecutor] = {}
        for mode in times:
            stack = stacks.enter_context(private_stack(args.processes, metrics=mode == "on"))
            executors[mode] = stacks.enter_context(ClusterExecutor(settings=stack.settings))
            list(executors[mode].map(workload.fn, workload.items))  # warm: the cost per call
        for _ in range(max(args.repeat, 5)):
            for mode, executor in executors.items():
                settle_garbage()
                started = time.perf_counter()
                workload.check(list(executor.map(workload.fn, workload.items)))
                times[mode].append(time.perf_counter() - started)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    return {
        "items": args.tiny,
        "on_s": on,
        "off_s": off,
        "on_runs_s": times["on"],
        "off_runs_s": times["off"],
        "overhead_pct": (on / off - 1) * 100,
    }


def metrics_table(result: dict[str, Any]) -> str:
    return (
        f"\nitem metrics, {result['items']:,} x 0.1 ms through ClusterExecutor.map, median of "
        f"{len(result['on_runs_s'])} alternating runs: on {result['on_s']:.3f} s, "
        f"off {result['off_s']:.3f} s, overhead {result['overhead_pct']:+.1f} %"
    )


if __name__ == "__main__":
    main()
