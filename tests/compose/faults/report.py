"""The reliability report, a pytest plugin (tests/conftest.py registers it).

A test marked ``scenario(title)`` takes the ``report_row`` fixture and fills in
its row as it goes; the row is recorded with the test's outcome. Every run that
recorded rows prints them as a table at the end; ``--reliability-report DIR``
also merges them into ``DIR/reliability.{md,json}`` (and the timelines into
``DIR/timelines.json`` and a plot), as scripts/reliability.py does for
docs/reliability/.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPORT_COLUMNS = (
    ("scenario", "scenario"),
    ("sent", "items sent"),
    ("completed", "items completed"),
    ("duplicates", "duplicates"),
    ("recovery_s", "recovery (s)"),
    ("outcome", "outcome"),
    ("notes", "notes"),
)
TIMELINE_PLOT = "timeline.png"

_report_key = pytest.StashKey[list[dict[str, Any]]]()
_setup_key = pytest.StashKey[dict[str, Any]]()
_phase_reports_key = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        metavar="DIR",
        type=Path,
        help="merge the fault scenarios' rows into DIR/reliability.{md,json} "
        "(scripts/reliability.py passes docs/reliability); they are always printed",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "scenario(title): the reliability report row a compose test records"
    )


def report_setup(config: pytest.Config, **setup: Any) -> None:
    """Describe what the session's rows were measured on (stacks, settings, machine)."""
    config.stash.setdefault(_setup_key, {}).update(setup)


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
        "`tests/compose/faults/` and `tests/compose/test_swarm_hosts.py`); "
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
