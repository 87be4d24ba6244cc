"""scripts/simulate.py on ``--quick``: real clients and a real Redis against simulated
worker processes, which must answer in parallel and in a form the clients accept."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, require, run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(45)]


def test_simulated_processes_carry_real_clients_in_parallel(tmp_path: Path) -> None:
    require(shutil.which("redis-server") is not None, "redis-server")
    # Half-second batches keep the load light on a shared machine: 20 batches/s at 10
    # processes, 100 at 50, about a tenth of what the client and Redis could take.
    run(
        [
            sys.executable,
            str(ROOT / "scripts" / "simulate.py"),
            "--quick",
            "--processes=10,50",
            "--call-ms=5",
            "--batch-ms=500",
            "--rounds=2",
            "--harness=1",
            "--seconds=2",
            f"--out={tmp_path}",
        ]
    )
    report = json.loads((tmp_path / "simulated.json").read_text())
    rows = {row["processes"]: row for row in report["rows"]}
    assert sorted(rows) == [10, 50]
    for processes, row in rows.items():
        # Every result went through the client's signature and binding checks, then
        # was compared with the simulated calls' value: a whole first map at least.
        assert row["maps_completed"] >= 1, row
        assert row["results_verified"] >= processes * 100, row
        assert row["wrong_results"] == 0, row
    # Processes held one after the other would move as many batches at 50 as at 10.
    assert rows[50]["batches_per_s"] > 2.5 * rows[10]["batches_per_s"], rows
    assert (tmp_path / "simulated.png").stat().st_size > 0
