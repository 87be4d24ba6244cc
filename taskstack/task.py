"""Celery's ``shared_task``, typed: a task keeps the signature of the function it wraps.

Celery ships no type information, so under ``mypy --strict`` its decorator
erases the function it decorates ("untyped decorator makes function
untyped"). :func:`shared_task` here *is* Celery's decorator and returns the
very task Celery registers; only its type says more. :class:`TypedTask` is that
type: calling the task, ``delay`` and ``si`` take the function's own
parameters, so a wrong argument is a type error where the task is used, not a
failure in a worker.

Both sides may import this module: it registers tasks on whichever app the
process runs, and loads nothing of the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar, cast, overload

import celery
from celery.canvas import Signature
from celery.result import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class TypedTask(Protocol[P, R_co]):
    """A Celery task over a function ``(*P) -> R``, as :func:`shared_task` returns it."""

    name: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Run the function here, in this process, as a plain call."""
        ...

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Send the task with these arguments to the workers."""
        ...

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send the task with Celery's options (``queue``, ``countdown``...); unchecked arguments."""
        ...

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature for a canvas; partial, since a chain fills in the rest."""
        ...

    def si(self, *args: P.args, **kwargs: P.kwargs) -> Signature:
        """An immutable signature: these arguments, and nothing a chain passes on."""
        ...


# A bound task (``bind=True``) takes the task itself first; callers never pass it.
@overload
def shared_task(
    *, name: str, bind: Literal[False] = False, **options: Any
) -> Callable[[Callable[P, R]], TypedTask[P, R]]: ...


@overload
def shared_task(
    *, name: str, bind: Literal[True], **options: Any
) -> Callable[[Callable[Concatenate[Any, P], R]], TypedTask[P, R]]: ...


def shared_task(
    *, name: str, bind: bool = False, **options: Any
) -> Callable[[Callable[..., Any]], TypedTask[..., Any]]:
    """Celery's ``@shared_task(name=..., **options)``, keeping the function's signature.

    ``name`` is required: clients send tasks by name, and Celery's default (the
    module's path) changes whenever the module moves. Use your team's prefix
    (``myteam.resize``); the stack's own tasks are ``taskstack.*``.
    """

    def register(function: Callable[..., Any]) -> TypedTask[..., Any]:
        task = celery.shared_task(name=name, bind=bind, **options)(function)
        return cast("TypedTask[..., Any]", task)

    return register
