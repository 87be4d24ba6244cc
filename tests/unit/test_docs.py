"""Generated documentation is current: the settings table of docs/configuration.md."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT


def test_the_settings_table_matches_taskstack_settings() -> None:
    check = subprocess.run(
        [sys.executable, "scripts/settings_table.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
