"""docs/own-project.md's install of the client library, run as written, into a fresh venv.

The command is the page's own (its ``pip install`` from a checkout), with a
clone of this repository in place of ``/path/to/taskstack``: a user's checkout
must come out of it exactly as ``git status`` found it (a build inside it
would leave ``build/`` behind, with stale copies of the code), and the
installed client must import. pip fetches the locked dependencies from the
package index, or its cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, require, run
from tests.support.snippets import PLACEHOLDER, snippets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PAGE = Path("docs/own-project.md")


def documented_install() -> str:
    """The page's install from a checkout (the other line names a placeholder Git host)."""
    lines = [
        line
        for snippet in snippets("console")
        if snippet.path == PAGE
        for line in snippet.text.splitlines()
        if line.startswith("pip install") and PLACEHOLDER in line.split()[-1]
    ]
    assert len(lines) == 1, lines
    return lines[0]


def git_status(checkout: Path) -> str:
    return run(["git", "-C", str(checkout), "status", "--porcelain", "--ignored"])


def test_the_documented_install_leaves_the_checkout_as_it_was(tmp_path: Path) -> None:
    require(shutil.which("git") is not None, "git")
    checkout, venv = tmp_path / "taskstack", tmp_path / "venv"
    run(["git", "clone", "--quiet", str(ROOT), str(checkout)])
    run([sys.executable, "-m", "venv", str(venv)])
    before = git_status(checkout)

    command = documented_install().replace(PLACEHOLDER, str(checkout))
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env["VIRTUAL_ENV"] = str(venv)
    done = subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr[-5000:]

    assert git_status(checkout) == before
    assert not (checkout / "build").exists()
    # Imported from the venv, away from any checkout, with the versions the workers run.
    probe = (
        "import importlib.metadata as m, taskstack; "
        "print(taskstack.__file__, m.version('celery'), m.version('kombu'))"
    )
    imported = subprocess.run(
        [venv / "bin" / "python", "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert imported.returncode == 0, imported.stderr
    where, celery, kombu = imported.stdout.split()
    assert Path(where).is_relative_to(venv)
    locked = (ROOT / "requirements" / "lock.txt").read_text()
    assert f"celery=={celery} " in locked and f"kombu=={kombu} " in locked
