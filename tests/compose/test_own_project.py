"""A team's own worker image on the compose stack, as docs/own-project.md runs it.

examples/own-project/Dockerfile is built FROM the session's stack image
(``taskstack:<TASKSTACK_TAG>``, ``test`` here) with a task package of its own
(``myteam``) and a dependency the stack's image lacks (python-slugify);
examples/own-project/compose.yaml makes the workers run it. The commands are the
page's: ``docker compose build worker-cpu``, then ``docker compose -f compose.yaml
-f examples/own-project/compose.yaml up --wait``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from celery import Celery

from tasks import compute
from taskstack import names
from taskstack.app import create_app
from tests.compose.conftest import (
    ROOT,
    UP_TIMEOUT_SECONDS,
    Stack,
    compose,
    docker,
    docker_available,
    new_stack,
    show_logs,
)
from tests.conftest import require

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

OVERRIDE = ROOT / "examples" / "own-project" / "compose.yaml"
SLUG = "myteam.slug"
"""examples/own-project/myteam/tasks.py; sent by name, the host has no myteam."""
RESULT_TIMEOUT = 60


def team_image(stack: Stack) -> str:
    return f"taskstack-myteam:{stack.env['TASKSTACK_TAG']}"


def with_team(stack: Stack, *args: str) -> str:
    """``docker compose -f compose.yaml -f examples/own-project/compose.yaml ARGS``."""
    return compose(stack.env, "--file", str(OVERRIDE), *args, project=stack.project)


@pytest.fixture(scope="module")
def team_stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The stack with its workers on the team's image; removed with that image afterwards."""
    require(docker_available(), "a Docker engine with Compose v2")
    stack = new_stack("taskstack-own-project")
    failed_before = request.session.testsfailed
    try:
        stack.compose("build", "worker-cpu")  # the base: this session's taskstack:test
        try:
            with_team(stack, "up", "--wait", f"--wait-timeout={UP_TIMEOUT_SECONDS}")
        except subprocess.CalledProcessError:
            show_logs(request.config, stack)
            raise
        yield stack
        if request.session.testsfailed > failed_before:
            show_logs(request.config, stack)
    finally:
        with_team(stack, "down", "--volumes", "--remove-orphans")
        # Nothing else runs the team's image; the stack's own stays for the other tests.
        if docker("image", "ls", "--quiet", team_image(stack)).strip():
            docker("image", "rm", team_image(stack))


@pytest.fixture(scope="module")
def client(team_stack: Stack) -> Iterator[Celery]:
    """A client app on the host, through the published Redis port: no team code here."""
    app = create_app(team_stack.client_settings)
    yield app
    app.close()


@pytest.mark.parametrize("service", ["worker-cpu", "worker-io"])
def test_the_workers_run_the_team_image(team_stack: Stack, service: str) -> None:
    ids = team_stack.containers(service)
    assert ids
    images = docker("inspect", "--format", "{{.Config.Image}}", *ids).split()
    assert images == [team_image(team_stack)] * len(ids)


def test_a_team_worker_runs_the_teams_task_by_name(team_stack: Stack, client: Celery) -> None:
    result = client.send_task(SLUG, ("Déjà vu, again!",))
    assert result.get(timeout=RESULT_TIMEOUT) == "deja-vu-again"
    assert result.worker in team_stack.nodes("worker-cpu", names.CPU_QUEUE)


def test_the_teams_dependency_comes_from_its_image_alone(team_stack: Stack) -> None:
    # Flower runs the stack's image as it is: the team's Dockerfile added python-slugify.
    with pytest.raises(subprocess.CalledProcessError) as missing:
        team_stack.compose("exec", "-T", "flower", "python", "-c", "import slugify")
    assert "No module named 'slugify'" in missing.value.stderr


def test_a_team_worker_still_runs_the_stacks_own_tasks(team_stack: Stack, client: Celery) -> None:
    primes = client.send_task(names.COUNT_PRIMES, (0, 100_000))
    assert primes.get(timeout=RESULT_TIMEOUT) == compute.count_primes(0, 100_000)
    assert primes.worker in team_stack.nodes("worker-cpu", names.CPU_QUEUE)

    waited = client.send_task(names.WAIT, (0.2,))  # routed to the io queue
    assert waited.get(timeout=RESULT_TIMEOUT) == 0.2
    assert waited.worker in team_stack.nodes("worker-io", names.IO_QUEUE)
