#!/usr/bin/env python3
"""Regenerate the reliability report: faults on the real compose stack.

    .venv/bin/python scripts/reliability.py              # every scenario (about 8 minutes)
    .venv/bin/python scripts/reliability.py -k kill      # some of them; other rows are kept

Runs ``pytest -m faults`` on tests/compose/faults/ (a module per scenario) and
tests/compose/test_swarm_hosts.py with this checkout's venv (a Docker engine
with Compose v2 is required: the project's stack is built and started with
short timeouts, then removed; the host scenario needs root for a second
engine), then prints
docs/reliability/reliability.md. A scenario's row is replaced by the new run's;
the rows of scenarios not run are kept, each with the time it was measured.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "docs" / "reliability" / "reliability.md"
SCENARIO_MODULES = ("tests/compose/faults", "tests/compose/test_swarm_hosts.py")


def venv_python() -> Path:
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        sys.exit(f"{python} is missing: run scripts/install first")
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "-k", dest="keyword", help="only the scenarios whose test matches (pytest -k)"
    )
    parser.add_argument("--quiet", action="store_true", help="pytest -q instead of -v")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args()

    argv = [str(venv_python()), "-m", "pytest", "-m", "faults", *SCENARIO_MODULES]
    argv += ["--reliability-report", str(REPORT.parent)]
    argv += ["-q"] if args.quiet else ["-v"]
    if args.keyword:
        argv += ["-k", args.keyword]
    argv += args.pytest_args
    print("+", " ".join(argv), flush=True)
    status = subprocess.run(argv, cwd=ROOT, check=False).returncode
    if REPORT.exists():
        print(f"\n{REPORT.relative_to(ROOT)}:\n")
        print(REPORT.read_text())
    else:
        print(f"no report at {REPORT.relative_to(ROOT)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
