"""What ``scripts/simulate.py`` reads, derives and shows: counters before and after a
point, CPU per batch, the knee of each series, the extrapolation, the table and the plot."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import redis

from scripts.sim_load import cpu_seconds, machine_busy_seconds

PER_HOST = 8
"""Processes of the host the extrapolation counts in (one 8-core server)."""


def snapshot(
    control: redis.Redis, pids: dict[str, list[int]], counters: list[Any]
) -> dict[str, Any]:
    cpu = control.info("cpu")
    stats = control.info("stats")
    commands = control.info("commandstats")
    out: dict[str, Any] = {
        "t": time.perf_counter(),
        "redis_main_s": float(cpu["used_cpu_user_main_thread"])
        + float(cpu["used_cpu_sys_main_thread"]),
        "commands": sum(float(s["calls"]) for s in commands.values()),
        "bytes_in": float(stats["total_net_input_bytes"]),
        "batches": sum(c[0] for c in counters),
        "items": sum(c[1] for c in counters),
        "machine_s": machine_busy_seconds(),
    }
    for role, ids in pids.items():
        out[role] = [cpu_seconds(pid) for pid in ids]
    return out


def usage(before: dict[str, Any], after: dict[str, Any], redis_allowance: float) -> dict[str, Any]:
    """Rates and CPU between two snapshots; a share is CPU seconds per wall second."""
    wall = after["t"] - before["t"]
    batches = max(1, after["batches"] - before["batches"])

    def used(role: str) -> list[float]:
        return [a - b for a, b in zip(after[role], before[role], strict=True)]

    client, harness = used("client"), used("harness")
    redis_main = after["redis_main_s"] - before["redis_main_s"]
    machine = after["machine_s"] - before["machine_s"]
    ours = sum(client) + sum(harness) + used("redis")[0]
    return {
        "wall_s": wall,
        "batches_per_s": (after["batches"] - before["batches"]) / wall,
        "items_per_s": (after["items"] - before["items"]) / wall,
        "redis_us_per_batch": redis_main / batches * 1e6,
        "client_us_per_batch": sum(client) / batches * 1e6,
        "harness_us_per_batch": sum(harness) / batches * 1e6,
        "redis_commands_per_batch": (after["commands"] - before["commands"]) / batches,
        "redis_bytes_in_per_batch": (after["bytes_in"] - before["bytes_in"]) / batches,
        "redis_share": redis_main / wall,
        "redis_share_of_allowance": redis_main / wall / redis_allowance,
        "client_share_max": max(client) / wall,
        "harness_share_max": max(harness) / wall,
        "machine_share": machine / wall / len(os.sched_getaffinity(0)),
        "others_share": max(0.0, machine - ours) / wall,
    }


LIMITS = {
    "client": "client_share_max",
    "Redis": "redis_share_of_allowance",
    "harness": "harness_share_max",
}
"""Each part that can stop the growth and its utilisation: one client process is held to
about one core by its interpreter lock, as is a harness process; Redis to its allowance."""
SATURATED = {"client": 0.7, "Redis": 0.85, "harness": 0.85, "machine (all CPUs)": 0.85}
"""A part this busy is taken as the limit; if none is, and the machine is, the machine is
(its CPUs are shared: ``others_share`` says how much went to other jobs); if neither,
none was saturated. A client's sender, receiver and caller threads share one interpreter
lock: one client alone stopped growing at 71-77 % of a core, with cores to spare."""


def knees(rows: list[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Per series: the first point whose efficiency is below ``threshold``, and which
    part was the limit there."""
    out = []
    for label in dict.fromkeys(r["series"] for r in rows):
        points = sorted((r for r in rows if r["series"] == label), key=lambda r: r["processes"])
        knee = next((r for r in points if r["efficiency"] < threshold), None)
        entry: dict[str, Any] = {
            "series": label,
            "peak_batches_per_s": max(r["batches_per_s"] for r in points),
            "peak_items_per_s": max(r["items_per_s"] for r in points),
            "knee_processes": None if knee is None else knee["processes"],
        }
        if knee is not None:
            linear = [r["processes"] for r in points if r["processes"] < knee["processes"]]
            entry["last_linear_processes"] = linear[-1] if linear else None
            busy = {name: knee[key] for name, key in LIMITS.items()}
            busy["machine (all CPUs)"] = knee["machine_share"]
            entry["utilisation_at_knee"] = busy
            entry["others_cores_at_knee"] = knee["others_share"]
            full = [name for name in LIMITS if busy[name] >= SATURATED[name]]
            part = max(full, key=lambda name: busy[name] / SATURATED[name], default="")
            if not part:
                machine = busy["machine (all CPUs)"] >= SATURATED["machine (all CPUs)"]
                part = "machine (all CPUs)" if machine else "none saturated"
            entry["limit"] = part
        out.append(entry)
    return out


def extrapolate(rows: list[dict[str, Any]], calibration: dict[str, Any] | None) -> dict[str, Any]:
    """One Redis core and one client process, from their measured CPU per batch (the
    median over the points that moved at least 50 batches/s) to what they carry; with a
    ``calibration``, Redis's bound for real workers too (its CPU per batch x the ratio)."""
    loaded = [r for r in rows if r["batches_per_s"] >= 50] or rows
    redis_us = statistics.median(r["redis_us_per_batch"] for r in loaded)
    client_us = statistics.median(r["client_us_per_batch"] for r in loaded)
    batch_s = loaded[0]["batch_s"]
    redis_bound, client_bound = 1e6 / redis_us, 1e6 / client_us
    real: dict[str, float] = {}
    if calibration is not None:
        bound = redis_bound / calibration["redis_ratio"]
        real = {
            "real_worker_redis_ratio": calibration["redis_ratio"],
            "redis_batches_per_s_real_workers": bound,
            "redis_processes_real_workers": bound * batch_s,
            f"redis_hosts_of_{PER_HOST}_real_workers": bound * batch_s / PER_HOST,
        }
    return {
        **real,
        "redis_us_per_batch": redis_us,
        "client_us_per_batch": client_us,
        "batch_s": batch_s,
        "redis_batches_per_s": redis_bound,
        "client_batches_per_s": client_bound,
        "redis_processes": redis_bound * batch_s,
        "client_processes": client_bound * batch_s,
        f"redis_hosts_of_{PER_HOST}": redis_bound * batch_s / PER_HOST,
        f"client_hosts_of_{PER_HOST}": client_bound * batch_s / PER_HOST,
    }


def table(report: dict[str, Any]) -> str:
    setup = report["setup"]
    lines = [
        f"Setup: {setup['cpus']} CPUs, batches of {setup['batch_ms']:g} ms "
        f"({setup['call_ms']:g} ms calls), {setup['processes_per_host']} processes per "
        f"simulated host, {setup['seconds_per_point']:g} s per point",
        "",
        "| series | processes | batches/s | items/s | efficiency | Redis µs/batch "
        "| client µs/batch | harness µs/batch | Redis core | busiest client | busiest harness "
        "| machine | other jobs (cores) | results verified |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['series']} | {r['processes']} | {r['batches_per_s']:,.0f} "
            f"| {r['items_per_s']:,.0f} | {r['efficiency']:.2f} | {r['redis_us_per_batch']:.0f} "
            f"| {r['client_us_per_batch']:.0f} | {r['harness_us_per_batch']:.0f} "
            f"| {r['redis_share']:.0%} | {r['client_share_max']:.0%} "
            f"| {r['harness_share_max']:.0%} | {r['machine_share']:.0%} | {r['others_share']:.2f} "
            f"| {r['results_verified']:,} ({r['wrong_results']} wrong) |"
        )
    lines.append("")
    for k in report["knees"]:
        where = (
            f"knee at {k['knee_processes']} processes (linear up to "
            f"{k.get('last_linear_processes')}), limit: {k['limit']}"
            if k["knee_processes"]
            else "no knee in the range measured"
        )
        lines.append(f"{k['series']}: peak {k['peak_batches_per_s']:,.0f} batches/s; {where}")
    x = report["extrapolated"]
    lines.append(
        f"Extrapolated: one Redis core {x['redis_batches_per_s']:,.0f} batches/s "
        f"({x['redis_processes']:,.0f} processes at {x['batch_s'] * 1000:g} ms batches), one "
        f"client {x['client_batches_per_s']:,.0f} batches/s ({x['client_processes']:,.0f})"
    )
    if "real_worker_redis_ratio" in x:
        lines.append(
            f"A real worker costs Redis {x['real_worker_redis_ratio']:.2f}x a simulated host per "
            f"batch: one Redis core with real workers {x['redis_batches_per_s_real_workers']:,.0f} "
            f"batches/s ({x['redis_processes_real_workers']:,.0f} processes)"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    knees_by = {k["series"]: k for k in report["knees"]}
    for ax, key, unit in (
        (axes[0], "batches_per_s", "batches/s"),
        (axes[1], "items_per_s", "items/s"),
    ):
        xs = sorted({r["processes"] for r in rows})
        scale = rows[0][key] / rows[0]["batches_per_s"] if rows[0]["batches_per_s"] else 1
        ideal = [x / rows[0]["batch_s"] * scale for x in xs]
        ax.plot(xs, ideal, color="grey", linestyle=":", label="linear (every process busy)")
        bounds = report["extrapolated"]
        lines = [
            ("redis_batches_per_s", "--", "one Redis core, simulated hosts"),
            ("redis_batches_per_s_real_workers", (0, (1, 3)), "one Redis core, real workers"),
            ("client_batches_per_s", "-.", "one client"),
        ]
        for key_, style, name in lines:
            if key_ in bounds:
                ax.axhline(bounds[key_] * scale, color="black", linestyle=style, linewidth=0.8,
                           label=f"{name}: 1 / its CPU per batch (extrapolated)")  # fmt: skip
        for n, (label, knee) in enumerate(knees_by.items()):
            points = sorted((r for r in rows if r["series"] == label), key=lambda r: r["processes"])
            (line,) = ax.plot(
                [r["processes"] for r in points], [r[key] for r in points], "o-", label=label
            )
            if knee["knee_processes"]:
                at = next(r for r in points if r["processes"] == knee["knee_processes"])
                ax.plot(
                    [at["processes"]], [at[key]], marker="X", markersize=13, color=line.get_color()
                )
                ax.annotate(f"knee: {knee['limit']}", (at["processes"], at[key]),
                            textcoords="offset points", xytext=(8, -12 - 9 * n), fontsize=7,
                            color=line.get_color())  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("simulated worker processes")
        ax.set_ylabel(unit)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    setup = report["setup"]
    fig.suptitle(
        f"Real clients and Redis, simulated workers: {setup['batch_ms']:g} ms batches of "
        f"{setup['call_ms']:g} ms calls, {setup['cpus']} CPUs (X: the knee)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
