"""The base class of every task a worker runs: what happens around a task's body.

:func:`taskstack.worker.install` makes it the app's ``Task`` before any task
is made, so the stack's tasks, the batch task and a team's tasks (made with
``shared_task`` or ``app.task``, without a ``base=`` of their own) all derive
from it. Clients keep Celery's own: none of this runs there.

- A ``MemoryError`` the body raises fails that task alone, as Python's own
  ``MemoryError`` (:mod:`taskstack.worker.memory`, whose request class this
  names).
- On the io queue's threads pool, what a body returns or raises after its
  time limit failed it is discarded (:mod:`taskstack.worker.timelimits`).
- A result larger than ``MAX_PAYLOAD_BYTES`` fails the task with
  ``PayloadTooLarge`` instead of being stored. The result is serialized once
  to be measured (Celery serializes it again to store it): microseconds for
  the usual result, tens of milliseconds near the limit.
"""

from __future__ import annotations

from typing import Any

import celery
from kombu.exceptions import EncodeError
from kombu.serialization import dumps

from taskstack import names
from taskstack.errors import PayloadTooLarge
from taskstack.worker import memory, timelimits


class Task(celery.Task):  # type: ignore[misc]
    """Celery's task, with the worker's limits around its body."""

    Request = f"{memory.__name__}:Request"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request.called_directly:  # a plain call, e.g. from another task's body
            return super().__call__(*args, **kwargs)
        with timelimits.in_time(f"{self.name}[{self.request.id}]"):
            try:
                value = super().__call__(*args, **kwargs)
            except MemoryError as exc:
                if type(exc) is MemoryError:
                    raise
                # e.g. NumPy's _ArrayMemoryError(shape, dtype), which no client rebuilds
                raise MemoryError(str(exc)) from exc
        if not (self.request.ignore_result or self.ignore_result):
            _check_result(self, value)
        return value


def _check_result(task: celery.Task, value: Any) -> None:
    limit = task.app.conf[names.MAX_PAYLOAD_SETTING]
    try:
        _, _, body = dumps(value, serializer=task.app.conf.result_serializer)
    except EncodeError:
        return  # Celery fails the task with this error as it stores the result
    if len(body) > limit:
        raise PayloadTooLarge(
            f"the result of {task.name} serializes to {len(body):,} bytes, over "
            f"MAX_PAYLOAD_BYTES={limit:,}: return less, or store the data elsewhere and "
            "return where it is"
        )
