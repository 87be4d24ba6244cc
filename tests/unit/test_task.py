"""taskstack.shared_task (taskstack/task.py): Celery's task, typed with its function's signature.

mypy, with the project's configuration, reads code that uses the stack's
tasks and a team's: right calls pass, wrong ones are errors where they are
written. That the decorated task is Celery's own, sent by ``delay`` to a real
worker, is tests/integration/test_stack.py's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

TEAM_TASK = """\
from taskstack import shared_task


@shared_task(name="myteam.word_count")
def word_count_task(text: str) -> int:
    return len(text.split())
"""

RIGHT = """\
from celery.canvas import Signature
from celery.result import AsyncResult

from tasks.stack import count_primes, whoami
from taskstack import TypedTask

primes: int = count_primes(0, 100)
sent: AsyncResult = count_primes.delay(0, stop=100)
node: AsyncResult = whoami.delay()
chained: Signature = count_primes.s(0)
task: TypedTask[[int, int], int] = count_primes
"""

WRONG = {
    "word_count_task.delay(3)": "[arg-type]",  # the README's example
    'count_primes.delay(0, "100")': "[arg-type]",
    "whoami.delay(1)": "[call-arg]",  # bound: the task itself is never passed
    "count_primes.si(0)": "[call-arg]",
    "words: str = word_count_task('to be')": "[assignment]",
}


def test_calls_are_checked_against_the_tasks_function(tmp_path: Path) -> None:
    (tmp_path / "team.py").write_text(TEAM_TASK)
    (tmp_path / "right.py").write_text(RIGHT)
    wrong = ["from tasks.stack import count_primes, whoami", "from team import word_count_task"]
    (tmp_path / "wrong.py").write_text("\n".join([*wrong, *WRONG]) + "\n")
    report = subprocess.run(
        [Path(sys.executable).parent / "mypy", "--config-file", ROOT / "pyproject.toml", tmp_path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    errors = [line for line in report.splitlines() if ": error:" in line]
    by_line = {int(line.split(":")[1]): line for line in errors if "wrong.py" in line}
    first = len(wrong) + 1
    for number, (call, code) in enumerate(WRONG.items(), start=first):
        assert code in by_line.get(number, ""), f"{call}: {by_line.get(number)}"
    assert len(errors) == len(WRONG), report  # team.py and right.py are clean
