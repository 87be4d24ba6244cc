"""The multi-host benchmark's rows, table, JSON and plot (``scripts/bench_hosts.py``)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scripts.bench_hosts import Run

MB = 1024 * 1024


def rows_of(runs: list[Run], quota: float) -> list[dict[str, Any]]:
    """One row per system, workload, host count and latency: the speed-up over the same
    system's 1-host run of the same repetition and latency, median and min-max."""
    groups: defaultdict[tuple[str, str, float, int], dict[int, Run]] = defaultdict(dict)
    for run in runs:
        key = (run.system, run.workload, run.latency_ms, run.hosts)
        groups[key][run.repetition] = run
    rows = []
    for (system, workload, latency, hosts), by_rep in sorted(groups.items()):
        base = groups.get((system, workload, latency, 1), {})
        ratios = [base[r].seconds / run.seconds for r, run in by_rep.items() if r in base]
        if not ratios:
            continue
        mine = list(by_rep.values())
        speedup = statistics.median(ratios)
        row: dict[str, Any] = {
            "system": system,
            "workload": workload,
            "hosts": hosts,
            "latency_ms": latency,
            "speedup": round(speedup, 3),
            "spread": [round(min(ratios), 3), round(max(ratios), 3)],
            "efficiency": round(speedup / hosts, 3),
            "repetitions": len(ratios),
            "seconds": round(statistics.median(r.seconds for r in mine), 3),
            "seconds_spread": [
                round(min(r.seconds for r in mine), 3),
                round(max(r.seconds for r in mine), 3),
            ],
            "host_quota_used": round(
                statistics.median(r.host_cpu_s / (quota * hosts * r.seconds) for r in mine), 3
            ),
        }
        for part in (
            "others_cpu_s",
            "client_cpu_s",
            "redis_cpu_s",
            "relay_cpu_s",
            "scheduler_cpu_s",
        ):
            row[part] = round(statistics.median(getattr(r, part) for r in mine), 3)
        into = [b for r in mine for b in r.into_hosts]
        if workload == "shared" and into:
            row["mb_into_each_host"] = [round(min(into) / MB, 1), round(max(into) / MB, 1)]
        rows.append(row)
    for row in rows:  # what the last host added, in hosts' worth
        fewer = [
            r
            for r in rows
            if (r["system"], r["workload"], r["latency_ms"])
            == (row["system"], row["workload"], row["latency_ms"])
            and r["hosts"] < row["hosts"]
        ]
        if fewer:
            prev = max(fewer, key=lambda r: r["hosts"])
            added = row["hosts"] - prev["hosts"]
            row["gain_per_added_host"] = round((row["speedup"] - prev["speedup"]) / added, 3)
    one = {(r["system"], r["workload"], r["latency_ms"]): r for r in rows if r["hosts"] == 1}
    for row in rows:  # what the speed-up would be if a call cost the same CPU time throughout
        if row["workload"] == "shared":  # there each added host adds work: its own fetch
            continue
        first = one[row["system"], row["workload"], row["latency_ms"]]
        busy = row["hosts"] * row["host_quota_used"] / first["host_quota_used"]
        row["speedup_at_equal_cpu"] = round(busy, 3)
    return rows


def write_json(
    path: Path, rows: list[dict[str, Any]], setup: dict[str, Any], runs: list[Any]
) -> None:
    path.write_text(json.dumps({"rows": rows, "setup": setup, "runs": runs}, indent=1) + "\n")


def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _mb(row: dict[str, Any]) -> str:
    into = row.get("mb_into_each_host")
    return "" if into is None else f"{into[0]:.0f}-{into[1]:.0f}"


def table(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    lines = [
        f"Setup: {setup['quota_cpus']:g} CPU and {setup['processes_per_host']} process per host, "
        f"{setup['repeats']} interleaved repetition(s) ({setup['slow_repeats']} for a run over "
        f"30 s), relay PING round trip by latency (ms): "
        + ", ".join(f"{k}: {v:.2f}" for k, v in setup["relay_ping_ms"].items()),
        "",
        "| workload | latency | system | hosts | median (s) | speed-up (min-max) | at equal CPU "
        "| efficiency "
        "| gain / added host | hosts' quota used | others' CPU (s) | client CPU (s) | Redis CPU (s) "
        "| relay CPU (s) | scheduler CPU (s) | MB into each host |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(setup["workloads"])}
    for row in sorted(
        rows, key=lambda r: (order.get(r["workload"], 9), r["latency_ms"], r["system"], r["hosts"])
    ):
        lo, hi = row["spread"]
        lines.append(
            f"| {setup['workloads'].get(row['workload'], row['workload'])} | {row['latency_ms']:g} ms "
            f"| {row['system']} | {row['hosts']} | {row['seconds']:.2f} "
            f"| {row['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {_x(row.get('speedup_at_equal_cpu'))} "
            f"| {row['efficiency']:.2f} "
            f"| {row.get('gain_per_added_host', ''):} | {row['host_quota_used']:.0%} "
            f"| {row['others_cpu_s']:.2f} "
            f"| {row['client_cpu_s']:.2f} | {row['redis_cpu_s']:.2f} | {row['relay_cpu_s']:.2f} "
            f"| {row['scheduler_cpu_s']:.2f} | {_mb(row)} |"
        )
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """Speed-ups only, a row per system and workload: the README's "More hosts" table."""
    columns = [(n, lat) for lat in setup["latency_ms"] for n in setup["hosts"] if n > 1]
    head = " | ".join(f"{n} hosts, {lat:g} ms" for n, lat in columns)
    lines = [f"| | {head} |", "|---|" + "---|" * len(columns)]
    found = {(r["system"], r["workload"], r["hosts"], r["latency_ms"]): r for r in rows}
    for workload, title in setup["workloads"].items():
        for system in ("taskstack", "dask"):
            cells = [found.get((system, workload, n, lat)) for n, lat in columns]
            if any(cells):
                shown = [f"{c['speedup']:.2f}x" if c else "" for c in cells]
                lines.append(f"| {system}, {title} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], setup: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(setup["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4.5), squeeze=False)
    hosts = setup["hosts"]
    colors = {"taskstack": "tab:blue", "dask": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for ax, workload in zip(axes[0], workloads, strict=True):
        ax.plot(hosts, hosts, color="grey", linewidth=0.8, linestyle=":", label="ideal")
        for system, color in colors.items():
            for i, latency in enumerate(setup["latency_ms"]):
                line = sorted(
                    (
                        r
                        for r in rows
                        if (r["system"], r["workload"], r["latency_ms"])
                        == (system, workload, latency)
                    ),
                    key=lambda r: r["hosts"],
                )
                if not line:
                    continue
                xs = [r["hosts"] for r in line]
                ys = [r["speedup"] for r in line]
                err = [
                    [y - r["spread"][0] for y, r in zip(ys, line, strict=True)],
                    [r["spread"][1] - y for y, r in zip(ys, line, strict=True)],
                ]
                ax.errorbar(
                    xs,
                    ys,
                    yerr=err,
                    color=color,
                    linestyle=styles[i % len(styles)],
                    marker="o",
                    capsize=3,
                    label=f"{system}, {latency:g} ms",
                )
        ax.set_xticks(hosts)
        ax.set_xlabel(f"hosts ({setup['quota_cpus']:g} CPU each)")
        ax.set_ylabel("speed-up over 1 host: median, min-max")
        ax.set_title(setup["workloads"][workload])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
