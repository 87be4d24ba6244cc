"""The compose tier's stacks: built and started from compose.yaml, one project each.

``stack`` is the stack as users run it (defaults, three cpu workers), shared by a
module. :func:`new_stack` and :func:`running` let a module start one with other
settings, e.g. short timeouts (``new_stack("taskstack-faults",
REDIS_VISIBILITY_TIMEOUT="45", ...)``). The reliability report that
tests/compose/test_faults.py fills in is collected here and printed at the end
of the session (and merged into ``--reliability-report DIR``, as
scripts/reliability.py does for docs/reliability/).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import time
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from taskstack import names
from taskstack.settings import ENV_VARS, Settings
from tests.support import ROOT as ROOT
from tests.support import free_port, http_get, print_past_capture, require, run

PROJECT = "taskstack-test"
"""Its own project name: the containers, network and volumes of a stack the
developer runs from the same checkout are left alone."""

CPU_WORKERS = 3
UP_TIMEOUT_SECONDS = 300
"""Covers the first start on a slow machine; the image build comes on top."""

RESTORE_SWEEP_SECONDS = 10
"""How often one consumer looks for expired unacknowledged messages: kombu's Redis
transport sweeps every ``unacked_restore_interval`` (10 s) as taskstack.app sets
``unacked_restore_throttle`` to 1."""


def redelivery_deadline(visibility_timeout: int) -> int:
    """Seconds for work held by a lost worker to be redelivered and done: the
    visibility timeout, up to two restore sweeps, and room for a slow machine."""
    return visibility_timeout + 2 * RESTORE_SWEEP_SECONDS + 60


SETTINGS_VARIABLES = frozenset(name for name, _ in ENV_VARS.values())


def compose(env: Mapping[str, str], *args: str, project: str = PROJECT) -> str:
    """Run ``docker compose`` on a test project and return its stdout.

    compose.yaml is named explicitly so that a developer's compose.override.yaml
    is not merged in.
    """
    argv = ["docker", "compose", "--project-name", project, "--file", str(ROOT / "compose.yaml")]
    return run([*argv, *args], env=env)


def docker(*args: str) -> str:
    """Run a plain ``docker`` command and return its stdout."""
    return run(["docker", *args])


def docker_available() -> bool:
    try:
        for argv in (["docker", "info"], ["docker", "compose", "version"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@dataclass(frozen=True)
class Stack:
    redis_port: int
    flower_port: int
    redis_password: str
    flower_password: str
    secret: str
    project: str = PROJECT
    settings: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Settings variables (e.g. ``REDIS_VISIBILITY_TIMEOUT``) given to every service."""

    @property
    def env(self) -> dict[str, str]:
        """The environment ``docker compose`` interpolates compose.yaml with."""
        env = dict(os.environ)
        # A settings variable exported in the developer's shell (or a .env file) must
        # not change what is tested: set-but-empty wins over .env and means "default".
        env.update({name: "" for name in SETTINGS_VARIABLES})
        env.update(self.settings)
        env.update(
            REDIS_PORT=str(self.redis_port),
            FLOWER_PORT=str(self.flower_port),
            REDIS_PASSWORD=self.redis_password,
            FLOWER_PASSWORD=self.flower_password,
            TASKSTACK_SECRET=self.secret,
            BIND_ADDRESS="127.0.0.1",
            # Its own image tags: a test run leaves the developer's taskstack:local alone.
            TASKSTACK_TAG="test",
        )
        return env

    @property
    def client_settings(self) -> Settings:
        """Settings of a client on the host, through the published Redis port."""
        return Settings.from_env(
            {
                **self.settings,
                "REDIS_URL": f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0",
                "TASKSTACK_SECRET": self.secret,
                "FLOWER_PASSWORD": self.flower_password,
            }
        )

    @property
    def internal_redis_url(self) -> str:
        """Redis as the containers reach it: by service name, on the compose network."""
        return f"redis://:{self.redis_password}@redis:6379/0"

    @property
    def network(self) -> str:
        """The project's default network (compose names it ``<project>_default``)."""
        return f"{self.project}_default"

    def compose(self, *args: str) -> str:
        return compose(self.env, *args, project=self.project)

    def containers(self, service: str) -> list[str]:
        """Ids of a service's running containers."""
        return self.compose("ps", "--quiet", service).split()

    def nodes(self, service: str, queue: str) -> set[str]:
        """Celery node names of a service's containers: ``<queue>@<container hostname>``."""
        ids = self.containers(service)
        if not ids:
            return set()
        hostnames = docker("inspect", "--format", "{{.Config.Hostname}}", *ids).split()
        return {names.node_name(queue, hostname) for hostname in hostnames}


def flower_get(stack: Stack, path: str, *, auth: bool = True) -> tuple[int, str]:
    """GET a Flower page through its published port: (status, body)."""
    credentials = stack.client_settings.flower_basic_auth if auth else None
    return http_get(
        f"http://127.0.0.1:{stack.flower_port}{path}", basic_auth=credentials, timeout=15
    )


def flower_workers(stack: Stack) -> set[str]:
    """The worker nodes Flower lists (after asking them afresh); none while it cannot answer."""
    status, body = flower_get(stack, "/api/workers?refresh=1")
    return set(json.loads(body)) if status == 200 else set()


def new_stack(project: str = PROJECT, **settings: str) -> Stack:
    """A stack description with fresh passwords and free loopback ports; not started."""
    unknown = set(settings) - SETTINGS_VARIABLES
    if unknown:
        raise ValueError(f"not settings variables: {sorted(unknown)}")
    return Stack(
        redis_port=free_port(),
        flower_port=free_port(),
        redis_password=secrets.token_urlsafe(16),
        flower_password=secrets.token_urlsafe(12),
        secret=secrets.token_urlsafe(32),
        project=project,
        settings=settings,
    )


def show_logs(config: pytest.Config, stack: Stack, tail: int = 50) -> None:
    """Print the services' last log lines, past pytest's output capture.

    The stack is torn down in the teardown of whichever test ran last, which
    usually passed: captured output would never be shown.
    """
    try:
        logs = stack.compose("logs", "--no-color", "--timestamps", "--tail", str(tail))
    except subprocess.CalledProcessError as exc:
        logs = f"(docker compose logs failed: {exc.stderr})"
    print_past_capture(
        config, f"\n--- docker compose -p {stack.project} logs --tail {tail} ---\n{logs}"
    )


@contextlib.contextmanager
def running(request: pytest.FixtureRequest, stack: Stack) -> Generator[None, None, None]:
    """Build and start ``stack`` with three cpu workers; ``down -v`` it afterwards.

    Its services' last log lines are shown when a test using it failed.
    """
    require(docker_available(), "a Docker engine with Compose v2")
    failed_before = request.session.testsfailed
    try:
        try:
            stack.compose(
                "up",
                "--build",
                "--wait",
                f"--wait-timeout={UP_TIMEOUT_SECONDS}",
                f"--scale=worker-cpu={CPU_WORKERS}",
            )
        except subprocess.CalledProcessError:
            show_logs(request.config, stack)
            raise
        yield
        if request.session.testsfailed > failed_before:
            show_logs(request.config, stack)
    finally:
        stack.compose("down", "--volumes", "--remove-orphans")


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The whole stack with three cpu workers, fresh passwords, on free loopback ports."""
    stack = new_stack()
    with running(request, stack):
        yield stack


# -- reliability report ------------------------------------------------------------

REPORT_COLUMNS = (
    ("scenario", "scenario"),
    ("sent", "items sent"),
    ("completed", "items completed"),
    ("duplicates", "duplicates"),
    ("recovery_s", "recovery (s)"),
    ("outcome", "outcome"),
    ("notes", "notes"),
)
_report_key = pytest.StashKey[list[dict[str, Any]]]()
_setup_key = pytest.StashKey[dict[str, Any]]()
_phase_reports_key = pytest.StashKey[dict[str, pytest.TestReport]]()


def report_setup(config: pytest.Config, **setup: Any) -> None:
    """Describe what the session's rows were measured on (stacks, settings, machine)."""
    config.stash.setdefault(_setup_key, {}).update(setup)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(title): the reliability report row a compose test records"
    )


@dataclass
class Row:
    """One scenario's line of the report; a test fills it in as it goes."""

    scenario: str
    sent: int | None = 0
    completed: int | None = 0
    duplicates: int | None = 0
    """Items that ran more than once; ``None`` where runs are not traced."""
    recovery_s: float | None = None
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    """Measurements beyond the table's columns; they go to the JSON file."""

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_phase_reports_key, {})[report.when] = report
    return report


@pytest.fixture
def report_row(request: pytest.FixtureRequest) -> Iterator[Row]:
    """A report row for the running test, recorded with the test's outcome."""
    scenario = request.node.get_closest_marker("scenario")
    row = Row(scenario.args[0] if scenario else request.node.name)
    yield row
    phases = request.node.stash.get(_phase_reports_key, {})
    report = phases.get("call")
    outcome = "error" if report is None else report.outcome
    if report is not None and hasattr(report, "wasxfail"):  # an expected failure (a known defect)
        outcome = "xpassed" if report.passed else "xfailed"
    rows = request.config.stash.setdefault(_report_key, [])
    rows.append(
        {
            "scenario": row.scenario,
            "test": request.node.name,
            "sent": row.sent,
            "completed": row.completed,
            "duplicates": row.duplicates,
            "recovery_s": None if row.recovery_s is None else round(row.recovery_s, 1),
            "outcome": outcome,
            # Setup includes module fixtures that the first test using them pays for.
            "setup_s": round(phases["setup"].duration, 1) if "setup" in phases else None,
            "call_s": round(report.duration, 1) if report is not None else None,
            "notes": "; ".join(row.notes),
            "figures": row.figures,
            "setup": request.config.stash.get(_setup_key, {}),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(title for _, title in REPORT_COLUMNS) + " |",
        "|" + "---|" * len(REPORT_COLUMNS),
    ]
    lines += ["| " + " | ".join(cell(row[key]) for key, _ in REPORT_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


TIMELINE_PLOT = "timeline.png"


def plot_timelines(
    timelines: dict[str, dict[str, Any]], rows: list[dict[str, Any]], path: Path
) -> bool:
    """Plot each scenario's ``timeline``: items started over time, with the faults.

    Returns whether there was anything to plot.
    """
    timed = [row for row in rows if row["scenario"] in timelines]
    if not timed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(timed), 1, figsize=(10, 3.6 * len(timed)), squeeze=False)
    for ax, row in zip(axes[:, 0], timed, strict=True):
        line = timelines[row["scenario"]]
        first, again = line["first_runs_s"], line["runs_again_s"]
        ax.step(first, range(1, len(first) + 1), where="post", label="items started (first run)")
        ax.plot(
            again,
            [0] * len(again),
            "|",
            markersize=14,
            color="tab:orange",
            label=f"items run again ({len(again)})",
        )
        for name, times in line["events_s"].items():
            for i, t in enumerate(times):
                ax.axvline(t, color="tab:red", linestyle="--", label=name if i == 0 else None)
        ax.axvline(line["end_s"], color="grey", linestyle=":", label="map returned")
        ax.set_title(f"{row['scenario']}: recovery {row['recovery_s']} s")
        ax.set_xlabel("seconds since the map started")
        ax.set_ylabel("items")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], directory: Path) -> tuple[Path, Path]:
    """Merge this session's rows into ``directory`` (a scenario's new row replaces its old)."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path, md_path = directory / "reliability.json", directory / "reliability.md"
    merged: dict[str, dict[str, Any]] = {}
    if json_path.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            merged = {row["scenario"]: row for row in json.loads(json_path.read_text())["rows"]}
    # Timelines (thousands of numbers) go to a compact file of their own, merged alike.
    timelines_path = directory / "timelines.json"
    timelines: dict[str, dict[str, Any]] = {}
    if timelines_path.exists():
        with contextlib.suppress(ValueError):
            timelines = json.loads(timelines_path.read_text())
    for row in [*merged.values(), *rows]:
        if "timeline" in row["figures"]:
            row = {**row, "figures": dict(row["figures"])}
            timelines[row["scenario"]] = row["figures"].pop("timeline")
        merged[row["scenario"]] = row
    ordered = sorted(merged.values(), key=lambda row: row["scenario"])
    document = {"generated_by": "pytest -m faults (scripts/reliability.py)", "rows": ordered}
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    timelines_path.write_text(json.dumps(timelines, separators=(",", ":")) + "\n")
    setups = {json.dumps(row.get("setup", {}), sort_keys=True) for row in ordered}
    described = "\n".join(
        "Setup: " + "; ".join(f"{key}: {value}" for key, value in json.loads(setup).items())
        for setup in sorted(setups)
        if setup != "{}"
    )
    plotted = plot_timelines(timelines, ordered, directory / TIMELINE_PLOT)
    picture = f"![timeline]({TIMELINE_PLOT})\n\n" if plotted else ""
    md_path.write_text(
        "# Reliability under faults\n\n"
        "Generated by `scripts/reliability.py` (the compose tier's "
        "`tests/compose/test_faults.py` and `tests/compose/test_swarm_hosts.py`); "
        "each scenario's figures are in "
        "`reliability.json`, the plotted timelines in `timelines.json`. Outcome `xfailed` marks a known defect (see the test's "
        "reason), `xpassed` a known defect that did not show this time.\n\n"
        + markdown_table(ordered)
        + "\n\n"
        + picture
        + described
        + "\n"
    )
    return json_path, md_path


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(_report_key, [])
    if not rows:
        return
    terminalreporter.section("reliability report")
    terminalreporter.write_line(markdown_table(rows))
    directory = config.getoption("reliability_report")
    if directory is not None:
        json_path, md_path = write_report(rows, directory)
        terminalreporter.write_line(f"\nmerged into {md_path} and {json_path.name}")
