"""A task that runs out of memory fails alone, as ``MemoryError``; its worker runs on.

Celery re-raises, in the worker's main process, a ``MemoryError`` that a task
raised in a pool process (``celery/worker/request.py``, ``Request.on_failure``):
the worker stops with "Unrecoverable error", kombu restores the message, and
the next worker to take it stops the same way. Yet what failed is the task's
own allocation (NumPy refusing 7 TiB), in a process of the pool that freed it
at once; the main process holds none of it, and a pool process that stays too
big is replaced after the task (``WORKER_MAX_MEMORY_PER_CHILD``).

Two hooks, each where Celery lets a project put one:

- the stack's task base class (:mod:`taskstack.worker.base`) turns a
  subclass the body raises (NumPy's ``_ArrayMemoryError``) into Python's own
  ``MemoryError`` with the same message: the pool process stores the failure,
  and every client rebuilds it as ``MemoryError`` (a result carries an
  exception as its type's name and arguments, and
  ``_ArrayMemoryError(shape, dtype)`` cannot be rebuilt from JSON);
- :class:`Request`, the request class of that base class (``Task.Request``),
  handles that failure in the main process as it handles any other: the
  message is acknowledged, the stored failure stands, Flower is told.

The alternatives fall short: a ``task_failure`` receiver runs after the main
process has decided, and changes nothing; a base class that raised some other
exception instead would keep the worker up, but the client would no longer
get a ``MemoryError`` (``except MemoryError`` would miss it), and Flower would
name the stand-in.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery.worker import request
from kombu.utils.encoding import safe_repr

logger = logging.getLogger(__name__)


class OutOfMemory(Exception):
    """Stands in for a task's ``MemoryError`` while Celery's failure handling runs in the
    main process, which would re-raise the real one there."""


class Request(request.Request):  # type: ignore[misc]
    """Celery's request, except that a task's ``MemoryError`` is a failure of the task."""

    def on_failure(
        self, exc_info: ExceptionInfo, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        raised = exc_info.exception
        exc = raised.exc if isinstance(raised, ExceptionWithTraceback) else raised
        if not isinstance(exc, MemoryError):
            return super().on_failure(exc_info, send_failed_event, return_ok)
        logger.error(
            "%s[%s] ran out of memory (%s): the task failed, the worker runs on",
            self.name,
            self.id,
            exc,
        )
        # return_ok: the pool process stored the MemoryError, and Celery stores nothing
        # more; otherwise (raised by Celery's own tracing) the stand-in is stored.
        super().on_failure(_stand_in(exc), send_failed_event=False, return_ok=return_ok)
        if send_failed_event:
            self.send_event("task-failed", exception=safe_repr(exc), traceback=exc_info.traceback)


def _stand_in(exc: MemoryError) -> ExceptionInfo:
    try:
        raise OutOfMemory(f"MemoryError: {exc}")
    except OutOfMemory:
        return ExceptionInfo()
