"""Turning a batch into a signed payload: one call's pickling error stays its own.

A call that cannot be pickled (a lock, an open file, a generator in its
arguments) is replaced by a stand-in, so that the rest of its batch runs; the
client settles that call's future or map position with the error pickling
raised here (``TypeError: cannot pickle '_thread.lock' object``), as the
standard library's pools do, whatever the stand-in's outcome. Code pickled by value (functions from ``__main__``,
lambdas, closures) loads only on the Python minor version that pickled it:
such a batch is refused before it is sent when the workers run another one;
it carries its source lines, so that remote tracebacks show them
(:mod:`taskstack.sources`).
Big buffers and :func:`taskstack.share` handles leave the batch through the
client's :class:`~taskstack.client.sharing.SharedStore`, so ``MAX_PAYLOAD_BYTES``
bounds what remains.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Final, NamedTuple

import cloudpickle
import redis

from taskstack import names, sources
from taskstack.client.sharing import Memo, SharedStore
from taskstack.errors import PayloadTooLarge, VersionMismatch, raise_error
from taskstack.signing import Signer

BY_VALUE_MARKERS: Final = (b"_make_function", b"_make_skeleton_class", b"_make_skeleton_enum")
"""cloudpickle's reconstructors for functions and classes pickled by value: a payload
names one of them exactly when it carries code (checked against the locked cloudpickle
by tests/unit/test_packing.py)."""


class Packed(NamedTuple):
    blob: bytes
    """The signed payload."""
    unpicklable: dict[int, Exception]
    """The calls replaced by a stand-in, by index in the batch: what pickling each raised."""


def pack(
    signer: Signer,
    calls: names.Batch,
    setup: names.Setup,
    *,
    max_bytes: int,
    local_python: str,
    worker_pythons: Iterable[str] = (),
    store: SharedStore | None = None,
    memo: Memo | None = None,
) -> Packed:
    """The signed payload for ``calls``; raises what makes the whole batch unsendable.

    With a ``store``, big buffers and shared handles are stored apart (once per
    client, their digests remembered in ``memo``) and the payload names them.
    """

    def dumps(request: names.Request) -> bytes:
        if store is None:
            return signer.sign(sources.dumps(request))
        return store.dumps(signer, request, memo if memo is not None else Memo())

    unpicklable: dict[int, Exception] = {}
    try:
        blob = dumps((calls, setup))
    except (PayloadTooLarge, redis.RedisError):  # over the budget, or storing failed
        raise
    except Exception:
        if setup is not None:
            _check_picklable(setup, "the initializer and its arguments")
        blob = dumps(([_isolated(i, call, unpicklable) for i, call in enumerate(calls)], setup))
    others = sorted(set(worker_pythons) - {local_python})
    if others and any(marker in blob for marker in BY_VALUE_MARKERS):
        raise VersionMismatch(
            f"this batch carries code pickled by value (a function or class defined in "
            f"__main__, a lambda or a closure), which loads only on the Python it was "
            f"pickled on: this client runs Python {local_python}, workers run "
            f"{', '.join(others)}. Run the client on Python {others[0]}, or put the code in "
            "a module the workers can import (the tasks/ folder of the image)"
        )
    if len(blob) > max_bytes:
        raise PayloadTooLarge(
            f"a batch of {len(calls)} call(s) pickles to {len(blob):,} bytes, over "
            f"MAX_PAYLOAD_BYTES={max_bytes:,}. NumPy arrays and other buffers of at least "
            "SHARED_MIN_BYTES are sent once, outside the batch: pass big data in that form, "
            "wrap a big object every call uses in taskstack.share(obj), or pass a path or key "
            "instead of the data itself"
        )
    return Packed(blob, unpicklable)


def _trial(obj: object) -> None:
    """Pickle ``obj`` to see whether it can be; its big buffers are neither copied nor kept."""
    cloudpickle.dumps(obj, protocol=5, buffer_callback=lambda _: False)


def _isolated(index: int, call: names.Call, failed: dict[int, Exception]) -> names.Call:
    """``call``, or a stand-in if it cannot be pickled (its error kept in ``failed``)."""
    try:
        _trial(call)
    except Exception as exc:
        failed[index] = exc
        fn = getattr(call[0], "__qualname__", repr(call[0]))
        error = pickle.PicklingError(
            f"the call {fn}(...) could not be pickled to send it to the workers: "
            f"{type(exc).__name__}: {exc}"
        )
        return raise_error, (error,), None
    return call


def _check_picklable(obj: object, what: str) -> None:
    try:
        _trial(obj)
    except Exception as exc:
        raise pickle.PicklingError(f"{what} could not be pickled: {exc}") from exc
