"""The docs' Python, run against real workers (tests/support/snippets.py finds it).

Each script block of README.md and docs/ runs in a process of its own, with
the session stack's settings in its environment as a user's script finds a
stack, and prints what its comments say. The README's task module, saved as
``tasks/myteam.py`` in a copy of the tree, is served by a worker started from
that copy and answers the call the README makes. tests/unit/test_docs.py
checks the same blocks without a stack.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from taskstack import names
from taskstack.app import create_app
from taskstack.services.local import worker_command
from taskstack.settings import Settings
from tests.support import ROOT, Worker, settings_env, start, wait_for
from tests.support.snippets import Snippet, checkout_with, snippets

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

RUN_TIMEOUT = 180
SCRIPTS = [s for s in snippets("python") if s.module is None and s.not_run is None]
TASK_MODULE = next(s for s in snippets("python") if s.module == "tasks/myteam.py")
SENT = 'app.send_task("myteam.word_count", ("to be or not",)).get(timeout=30)'
"""The README's call of the module's task: four words."""


@pytest.mark.parametrize("snippet", SCRIPTS, ids=lambda snippet: snippet.id)
def test_a_python_snippet_runs_against_the_stack(
    snippet: Snippet,
    redis_server: Settings,
    cpu_worker: Worker,
    io_worker: Worker,
    tmp_path: Path,
) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(snippet.text)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=settings_env(redis_server),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    printed = done.stdout.splitlines()
    assert printed, "every script shows its results"
    for expected in snippet.printed:
        assert expected in printed


@pytest.fixture
def team_db(redis_server: Settings) -> Iterator[Settings]:
    """The session's Redis, database 2: the team's worker takes no other test's work."""
    url = redis_server.redis_url.rsplit("/", 1)[0] + "/2"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield replace(redis_server, redis_url=url, metrics_port=0)
    client.flushdb()
    client.close()


def test_the_readme_task_module_is_served_by_name(
    team_db: Settings, tmp_path: Path, logs_dir: Path
) -> None:
    assert SENT in (ROOT / "README.md").read_text()
    tree = checkout_with(TASK_MODULE, tmp_path)
    hostname = f"myteam-{secrets.token_hex(3)}"
    node = names.node_name(names.CPU_QUEUE, hostname)
    # Run in the copy: `python -m` and Celery's imports take the working directory's
    # packages first, so the worker serves the copy's tasks, the README's module among them.
    command = worker_command(names.CPU_QUEUE, hostname)
    service = start(node, command, settings_env(team_db), logs_dir, cwd=tree)
    app = create_app(team_db)
    try:
        wait_for(
            lambda: (
                service.process.poll() is None and app.control.ping(destination=[node], timeout=0.5)
            ),
            60,
            f"worker {node} to answer ping (log: {service.log})",
        )
        result = app.send_task("myteam.word_count", ("to be or not",))
        assert result.get(timeout=30) == 4
        assert result.worker == node
        # The result can arrive before the worker has counted its task done, and a
        # worker with a task in hand waits out the soft shutdown (20 s) when stopped.
        wait_for(
            lambda: app.control.inspect([node], timeout=0.5).active() == {node: []},
            30,
            f"worker {node} to have no task in hand",
        )
    finally:
        app.close()
        service.stop()
