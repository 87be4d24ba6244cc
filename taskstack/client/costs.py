"""What a call costs alike by: the key the batch sizer learns a function's cost under.

Keys are kept for good, so a key never holds the callable itself (a bound method's
instance, a partial's arguments): only the code it runs, or its name.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ItemsKey:
    """The cost key of joblib's batches: the function inside them, costed per item.

    joblib hands the backend ``BatchedCalls`` objects of varying length; their
    cost is learnt per item of the function they run, so that the backend
    sizes its next batches from it (:mod:`taskstack.client.joblib_backend`).
    """

    fn: object
    per_call: float = field(default=1.0, compare=False)
    """Items per ``BatchedCalls`` in the batch measured (not part of the key)."""


def cost_key(fn: Callable[..., Any]) -> object:
    """What calls of ``fn`` cost alike by: its code, never ``fn`` itself, which the
    sizer's keys (kept for good) would keep alive with its instance or arguments."""
    inner = joblib_items(fn)
    if inner:
        return ItemsKey(cost_key(inner[0][0]), len(inner))
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    if isinstance(code, types.CodeType):
        return code
    # A builtin, a class, a ufunc, a callable instance: named, not held (list.append's list).
    names = (getattr(fn, "__module__", None), getattr(fn, "__qualname__", None))
    return type(fn), *(name if isinstance(name, str) else None for name in names)


def joblib_items(fn: object) -> list[Any] | None:
    """The calls inside a joblib ``BatchedCalls``; None for any other callable."""
    if type(fn).__name__ != "BatchedCalls":
        return None
    items = getattr(fn, "items", None)
    return items if isinstance(items, list) else None
