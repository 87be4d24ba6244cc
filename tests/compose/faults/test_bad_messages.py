"""Scenario 8: entries that are not well-formed messages, pushed straight onto the queues as
an attacker holding the Redis password would, go to the dead-letter list; no worker restarts,
and the work queued behind them completes."""

from __future__ import annotations

import time

import pytest

from taskstack import ClusterExecutor, names
from taskstack.app import create_app
from taskstack.connections import connect
from tests.compose.conftest import Row, Stack, docker
from tests.compose.faults import work
from tests.compose.faults.stack import (
    MARKS,
    POLL_SECONDS,
    RESULT_TIMEOUT,
    ensure_cpu_workers,
    host_redis,
    inspect,
)
from tests.support import wait_for
from tests.support.entries import BAD_ENTRIES, bomb_entry, letters

pytestmark = MARKS

BEHIND = 300
ON_IO = ("a JSON list", "headers without id", "timelimit 'x'")
"""The entries pushed onto the io queue too: its threads worker takes them."""


def peak_rss_kib(container: str) -> int:
    """The peak resident memory of the container's PID 1: the worker's main process."""
    text = docker("exec", container, "cat", "/proc/1/status")
    return int(next(line for line in text.splitlines() if line.startswith("VmHWM:")).split()[1])


@pytest.mark.scenario("8 bad entries pushed onto the queues")
def test_bad_entries_go_to_the_dead_letters_and_no_worker_restarts(
    faults: Stack, report_row: Row
) -> None:
    workers = ensure_cpu_workers(faults) + faults.containers("worker-io")
    started = {c: inspect(c, "{{.RestartCount}} {{.State.StartedAt}}") for c in workers}
    peaks = {c: peak_rss_kib(c) for c in workers}
    client = host_redis(faults)
    client.delete(names.DEAD_LETTERS_KEY)
    app = create_app(faults.client_settings)
    pushed = [(names.CPU_QUEUE, bad.name, bad.build(), bad.reason) for bad in BAD_ENTRIES]
    pushed.append((names.CPU_QUEUE, "bzip2 bomb (256 MiB)", bomb_entry(), "compressed"))
    pushed += [(names.IO_QUEUE, name, raw, why) for _, name, raw, why in pushed if name in ON_IO]

    # Pushed as someone holding a client's Redis password may.
    attacker = connect(faults.client_settings.redis_address)
    with ClusterExecutor(settings=faults.client_settings) as executor:
        sent_at = time.time()
        for queue, _, raw, _ in pushed:
            attacker.lpush(queue, raw)
        attacker.close()
        # Work queued behind them, on both queues.
        waits = [app.send_task(names.WAIT, (0.1,)) for _ in range(10)]
        behind = list(executor.map(work.cube, range(BEHIND)))
        done_after = time.time() - sent_at
        assert behind == [x**3 for x in range(BEHIND)]
        assert [result.get(timeout=RESULT_TIMEOUT) for result in waits] == [0.1] * 10
    report_row.sent = len(pushed) + BEHIND + len(waits)
    report_row.completed = len(behind) + len(waits)

    wait_for(
        lambda: len(letters(client)) == len(pushed),
        60,
        f"{len(pushed)} dead letters",
        interval=POLL_SECONDS,
    )
    found = letters(client)
    by_entry = {(letter.queue, letter.entry): letter for letter in found}
    for queue, name, raw, reason in pushed:
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        letter = by_entry[(queue, text)]
        assert letter.reason.startswith(reason), (name, letter.reason)
    # No worker stopped, restarted or was replaced; the bomb was never inflated.
    assert {c: inspect(c, "{{.RestartCount}} {{.State.StartedAt}}") for c in workers} == started
    assert all(s.startswith("0 ") for s in started.values())
    grown = {c: (peak_rss_kib(c) - peaks[c]) * 1024 for c in workers}
    assert max(grown.values()) < 100 * 1024 * 1024, grown

    # What an operator sees, from inside the stack's own image.
    listed = faults.compose("exec", "-T", "worker-cpu", "taskstack-deadletters", "list")
    assert len(listed.splitlines()) == 1 + len(pushed)
    purged = faults.compose("exec", "-T", "worker-cpu", "taskstack-deadletters", "purge")
    assert purged.strip() == f"purged {len(pushed)} dead letters"
    app.close()

    report_row.duplicates = None
    report_row.figures = {
        "entries": len(pushed),
        "worker_restarts": 0,
        "behind_done_after_s": round(done_after, 1),
        "most_peak_rss_growth_mb": round(max(grown.values()) / 1e6, 1),
        "reasons": sorted({letter.reason.split(":")[0] for letter in found}),
    }
    report_row.note(
        f"{len(pushed)} entries ({len(pushed) - len(ON_IO)} on cpu, {len(ON_IO)} on io: each "
        "kind of entry reliability.md lists, pickle, an unknown task, a 256 MiB bzip2 bomb) went to the "
        f"dead-letter list with their reasons; RestartCount stayed 0 on all {len(workers)} "
        f"workers, the {BEHIND}-item map and 10 io tasks queued behind them were done "
        f"{done_after:.1f} s after the entries were pushed, and the workers' peak RSS grew by "
        "at most "
        f"{max(grown.values()) / 1e6:.1f} MB"
    )
