"""A command run to its end with a timeout, its stderr kept with a failure.

Shared by the scripts (``scripts/lan.py``) and the compose tests (``tests/compose/cli.py``).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import IO

COMMAND_TIMEOUT = 120


def run(
    *argv: str,
    env: Mapping[str, str] | None = None,
    stdin: IO[bytes] | None = None,
    timeout: float = COMMAND_TIMEOUT,
) -> str:
    """Run a command and return its stdout; its stderr goes with a failure."""
    try:
        completed = subprocess.run(
            argv,
            env=None if env is None else dict(env),
            stdin=stdin,
            check=True,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.CalledProcessError as exc:
        exc.add_note(f"stderr:\n{exc.stderr.decode(errors='replace')[-3000:]}")
        raise
    return completed.stdout.decode(errors="replace")
