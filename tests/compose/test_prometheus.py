"""Prometheus in the compose stack (services/prometheus/): it finds every worker replica
by DNS, scrapes Flower with its password, records throughput that agrees with what a
client counts, and serves the dashboard's and the Grafana dashboard's queries; Flower
and the dashboard checked in a real browser (headless chromium), with screenshots."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from playwright.sync_api import Browser, expect

from tasks.compute import located
from tasks.iowork import wait
from taskstack import ClusterExecutor, names
from taskstack.services import dashboard
from tests.compose.conftest import CPU_WORKERS, ROOT, Stack, docker, flower_get
from tests.support import fresh_function, http_get, print_past_capture, run, wait_for
from tests.support.browser import browser, page, screenshot

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

SCRAPE_SECONDS = 5
"""services/prometheus/prometheus.yml's scrape and evaluation interval."""
LOAD_SECONDS = 100
"""A warm-up, the minute compared, and room for the last evaluations after it."""
GRAFANA_DASHBOARD = ROOT / "services" / "grafana" / "taskstack-dashboard.json"


def promql(stack: Stack, query: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query through Prometheus's published port: its result vector."""
    params = {"query": query, **({"time": f"{at:.3f}"} if at is not None else {})}
    url = f"http://127.0.0.1:{stack.prometheus_port}/api/v1/query?{urllib.parse.urlencode(params)}"
    status, body = http_get(url, timeout=10)
    assert status == 200, (query, status)
    answer = json.loads(body)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def value(stack: Stack, query: str, at: float | None = None) -> float | None:
    result = promql(stack, query, at)
    return float(result[0]["value"][1]) if result else None


def replicas_up(stack: Stack, service: str) -> float | None:
    return value(stack, f'count(up{{job="workers",service="{service}"}} == 1)')


@dataclass
class Load:
    """A steady map under way: when it started, and when each of its results came back."""

    started: float
    seen: list[float] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


@pytest.fixture(scope="module")
def load(stack: Stack) -> Iterator[Load]:
    """About 100 s of steady load (cpu replicas sleeping 20 ms per item), with a few
    failing calls, in the background; the client counts its results itself."""
    load = Load(time.time())

    def run() -> None:
        try:
            with ClusterExecutor(settings=stack.client_settings) as executor:
                failing = [executor.submit(wait, -1.0) for _ in range(5)]
                results = executor.map_unordered(wait, [0.02] * 100_000, chunksize=25)
                end = load.started + LOAD_SECONDS
                for _ in results:
                    load.seen.append(time.time())
                    if load.seen[-1] > end:
                        break
                # Leaving the map early cancels what has not started.
                cast(Generator[float, None, None], results).close()
                assert all(isinstance(f.exception(), ValueError) for f in failing)
        except BaseException as exc:  # shown by the tests that wait on the load
            load.error = exc
            raise
        finally:
            load.done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield load
    wait_for(load.done.is_set, 120, "the load to stop")
    thread.join(10)


def test_prometheus_finds_every_worker_replica_and_flower(stack: Stack) -> None:
    wait_for(lambda: replicas_up(stack, "worker-cpu") == CPU_WORKERS, 60, "every cpu replica")
    wait_for(lambda: replicas_up(stack, "worker-io") == 1, 60, "the io worker")
    wait_for(lambda: value(stack, 'up{job="flower"}') == 1, 60, "Flower's metrics")


def test_promtool_accepts_the_config_and_rules(stack: Stack) -> None:
    (container,) = stack.containers("prometheus")
    promtool = ["exec", container, "/bin/promtool"]
    docker(*promtool, "check", "config", "/tmp/taskstack-prometheus/prometheus.yml")
    out = docker(
        *promtool, "check", "rules", "/etc/taskstack/rules.yml", "/etc/taskstack/alerts.yml"
    )
    assert out.count("SUCCESS") == 2
    status, body = http_get(f"http://127.0.0.1:{stack.prometheus_port}/api/v1/rules")
    assert status == 200
    groups = json.loads(body)["data"]["groups"]
    alerts = {
        rule["name"] for group in groups for rule in group["rules"] if rule["type"] == "alerting"
    }
    assert {"TaskstackWorkerGone", "TaskstackQueueGrowing", "TaskstackFailureRate"} <= alerts


def test_a_scale_up_is_discovered_with_no_change(stack: Stack) -> None:
    stack.compose("up", "--wait", "--no-recreate", f"--scale=worker-cpu={CPU_WORKERS + 2}")
    try:
        wait_for(
            lambda: replicas_up(stack, "worker-cpu") == CPU_WORKERS + 2,
            60,
            "Prometheus to find the new replicas",
        )
    finally:
        stack.compose("up", "--wait", "--no-recreate", f"--scale=worker-cpu={CPU_WORKERS}")
    wait_for(lambda: replicas_up(stack, "worker-cpu") == CPU_WORKERS, 60, "the replicas gone")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with browser() as launched:
        yield launched


def test_flower_in_a_browser_shows_every_replica_and_names_the_work(
    stack: Stack, load: Load, chromium: Browser, tmp_path: Path
) -> None:
    nodes = stack.nodes("worker-cpu", names.CPU_QUEUE) | stack.nodes("worker-io", names.IO_QUEUE)
    base = f"http://127.0.0.1:{stack.flower_port}"
    with page(chromium, stack.client_settings.flower_basic_auth) as tab:
        tab.goto(f"{base}/workers")
        for node in nodes:
            expect(tab.get_by_text(node, exact=True)).to_be_visible(timeout=60_000)
        screenshot(tab, "flower-workers", tmp_path)
        tab.goto(f"{base}/tasks")
        # A batch's row names its function (its kwargs column), not tasks.run_batch alone.
        row = tab.get_by_role("row").filter(has_text="taskstack.run_batch")
        expect(
            row.filter(has_text=f"fn={wait.__module__}.{wait.__qualname__}").first
        ).to_be_visible(timeout=60_000)
        screenshot(tab, "flower-tasks", tmp_path)


def test_the_dashboard_in_a_browser_shows_throughput_while_a_map_runs(
    stack: Stack, load: Load, chromium: Browser, tmp_path: Path
) -> None:
    wait_for(lambda: time.time() > load.started + 85, 120, "a minute of load to fill the graphs")
    assert not load.done.is_set()  # the map still runs
    # The last few minutes only: the stack is as new as the load.
    url = dashboard.url(f"http://127.0.0.1:{stack.prometheus_port}", span="3m")
    with page(chromium) as tab:
        tab.goto(url)
        # The first panel is items/s per worker: its legend names the cpu replicas.
        replica = next(iter(stack.nodes("worker-cpu", names.CPU_QUEUE)))
        expect(tab.get_by_text(replica).first).to_be_visible(timeout=60_000)
        tab.evaluate("window.scrollTo(0, 0)")
        screenshot(tab, "dashboard", tmp_path)


def test_items_per_second_agree_with_the_clients_count(
    stack: Stack, load: Load, request: pytest.FixtureRequest
) -> None:
    # A minute of steady load after a warm-up of 15 s, and one more evaluation after it.
    at = load.started + 75
    wait_for(
        lambda: (load.seen and load.seen[-1] > at + 2 * SCRAPE_SECONDS) or load.done.is_set(),
        180,
        "results past the minute",
    )
    assert load.error is None and load.seen[-1] > at + 2 * SCRAPE_SECONDS, load.error
    shown = value(stack, "sum(taskstack:items:rate1m)", at)
    counted = sum(1 for t in load.seen if at - 60 < t <= at) / 60
    assert shown is not None and counted > 0
    print_past_capture(
        request.config,
        f"items/s over a minute of steady load: dashboard {shown:.1f}, client {counted:.1f} "
        f"({(shown - counted) / counted:+.1%})",
    )
    assert abs(shown - counted) / counted < 0.10, (shown, counted)


@pytest.mark.parametrize("source", ["dashboard", "grafana"])
def test_every_dashboard_query_returns_data(stack: Stack, load: Load, source: str) -> None:
    if source == "dashboard":
        queries = dashboard.queries()
    else:
        panels = json.loads(GRAFANA_DASHBOARD.read_text())["panels"]
        queries = [target["expr"] for panel in panels for target in panel["targets"]]
    wait_for(lambda: time.time() > load.started + 30, 60, "the load to be under way")
    for query in queries:
        wait_for(lambda q=query: promql(stack, q), 60, f"data for {query}")  # type: ignore[misc]


def test_a_wrong_flower_password_is_a_down_target(stack: Stack) -> None:
    image = f"taskstack-prometheus:{stack.env['TASKSTACK_TAG']}"
    container = docker(
        "run", "--detach", "--network", stack.network, "--env", "FLOWER_PASSWORD=wrong", image
    ).strip()
    try:

        def flower_target() -> dict[str, Any] | None:
            out = docker(
                "exec",
                container,
                "/bin/promtool",
                "query",
                "instant",
                "-o",
                "json",
                "http://127.0.0.1:9090",
                'up{job="flower"}',
            )
            result = json.loads(out)
            return result[0] if result else None

        target = wait_for(flower_target, 60, "the flower target to be scraped")
        assert target["value"][1] == "0"
        running = docker("inspect", "--format", "{{.State.Running}}", container).strip()
        assert running == "true"
    finally:
        docker("rm", "--force", "--volumes", container)


def test_metrics_endpoints_expose_no_secret(stack: Stack, load: Load) -> None:
    (worker, *_) = stack.containers("worker-cpu")
    scrape = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9808/metrics').read().decode())"
    bodies = {
        "worker": docker("exec", worker, "python3", "-c", scrape),
        "flower": flower_get(stack, "/metrics")[1],
        "targets": http_get(f"http://127.0.0.1:{stack.prometheus_port}/api/v1/targets")[1],
        "config": http_get(f"http://127.0.0.1:{stack.prometheus_port}/api/v1/status/config")[1],
    }
    assert "taskstack_items_total" in bodies["worker"]
    assert "flower_events_total" in bodies["flower"]
    for name, body in bodies.items():
        for secret in (stack.redis_password, stack.flower_password, stack.secret):
            assert secret not in body, name


def test_worker_metrics_are_not_published_on_the_host(stack: Stack) -> None:
    for container in stack.containers("worker-cpu"):
        assert docker("port", container).strip() == ""


def counted(stack: Stack, function: str, after: float) -> dict[str, float]:
    """Items of ``function`` that ran, per worker, as Prometheus's ``increase()`` has them.

    Each worker's series is read at its own last scrape, where ``increase()``
    extrapolates nothing; the window reaches back before the map.
    """
    selector = f'taskstack_items_total{{function="{function}",outcome="ok"}}'
    window = f"{int(time.time() - after) + 60}s"
    result: dict[str, float] = {}
    for series in promql(stack, f"timestamp({selector})"):
        worker, scraped = series["metric"]["worker"], float(series["value"][1])
        query = f'sum(increase({selector[:-1]},worker="{worker}"}}[{window}]))'
        result[worker] = value(stack, query, scraped) or 0.0
    return result


def assert_counted_exactly(
    stack: Stack, function: str, ran: Counter[str], started: float, ended: float
) -> None:
    """Two scrape intervals after ``ended``, Prometheus counts every item of ``ran`` (items per
    host) within 2 %, for each worker and in all."""
    wait_for(lambda: time.time() > ended + 2 * SCRAPE_SECONDS + 1, 30, "two scrape intervals")
    expected = {names.node_name(names.CPU_QUEUE, host): n for host, n in ran.items()}
    shown = counted(stack, function, started)
    assert set(shown) >= set(expected), (shown, expected)
    for worker, n in expected.items():
        assert abs(shown[worker] - n) <= 0.02 * n, (worker, shown[worker], n)
    assert abs(sum(shown.values()) - ran.total()) <= 0.02 * ran.total(), (shown, ran)


def test_every_item_counts_for_a_new_function_and_a_replica_just_added(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    stack.compose("up", "--wait", "--no-recreate", f"--scale=worker-cpu={CPU_WORKERS + 1}")
    try:
        wait_for(lambda: replicas_up(stack, "worker-cpu") == CPU_WORKERS + 1, 60, "the new replica")
        function = fresh_function()
        started = time.time()
        with ClusterExecutor(settings=stack.client_settings) as executor:
            ran = Counter(executor.map(function, [0.01] * 1_200))
        ended = time.time()
        assert len(ran) == CPU_WORKERS + 1, ran  # the new replica took its share
        label = f"{function.__module__}.{function.__qualname__}"
        assert_counted_exactly(stack, label, ran, started, ended)
        # The dashboard's items/s shows every replica, the new one included.
        for host in ran:
            worker = names.node_name(names.CPU_QUEUE, host)
            rate = f'max(max_over_time(taskstack:items:rate1m{{worker="{worker}"}}[2m]))'
            wait_for(lambda q=rate: (value(stack, q) or 0) > 0, 30, f"items/s of {worker}")  # type: ignore[misc]
        print_past_capture(request.config, f"items per replica, client and Prometheus: {ran}")
    finally:
        stack.compose("up", "--wait", "--no-recreate", f"--scale=worker-cpu={CPU_WORKERS}")


def test_the_demos_items_show_on_the_dashboard(stack: Stack) -> None:
    env = {
        **stack.env,
        "REDIS_URL": stack.client_settings.redis_url,
        "PROMETHEUS_PORT": str(stack.prometheus_port),
    }
    started = time.time()
    out = run(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/demo.py"), "--limit=400000"], env
    )
    ended = time.time()
    listing = out.split("ranges per worker host:\n", 1)[1].split("\n\n", 1)[0]
    ran = Counter({host: int(n) for host, n in (line.split() for line in listing.splitlines())})
    assert ran.total() == 400, out
    assert_counted_exactly(
        stack, f"{located.__module__}.{located.__qualname__}", ran, started, ended
    )


def test_workers_run_on_with_prometheus_stopped(stack: Stack) -> None:
    # The workers only serve their metrics; nothing of theirs waits on Prometheus.
    stack.compose("stop", "prometheus")
    try:
        with ClusterExecutor(settings=stack.client_settings) as executor:
            started = time.monotonic()
            assert list(executor.map(wait, [0.01] * 600, chunksize=25)) == [0.01] * 600
            assert time.monotonic() - started < 60
    finally:
        stack.compose("up", "--wait", "--no-recreate", "prometheus")
    wait_for(lambda: value(stack, 'up{job="flower"}') == 1, 60, "Prometheus back")
