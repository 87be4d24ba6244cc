"""Packing a batch: isolated pickling errors, the payload limit, the Python version check."""

from __future__ import annotations

import pickle
import threading

import pytest

from taskstack.client.packing import BY_VALUE_MARKERS, Packed, pack
from taskstack.errors import PayloadTooLarge, VersionMismatch, raise_error
from taskstack.signing import Signer
from tests.integration.work import square

SIGNER = Signer("unit-test-secret")
LIMIT = 1 << 20


def _pack(
    calls: list[tuple[object, tuple[object, ...], None]], workers: tuple[str, ...] = ()
) -> Packed:
    return pack(SIGNER, calls, None, max_bytes=LIMIT, local_python="3.11", worker_pythons=workers)  # type: ignore[arg-type]


def test_cloudpickle_marks_code_pickled_by_value_and_only_that() -> None:
    by_value = SIGNER.dumps([(lambda x: x, (1,), None)])
    by_reference = SIGNER.dumps([(square, (1,), None)])
    assert any(marker in by_value for marker in BY_VALUE_MARKERS)
    assert not any(marker in by_reference for marker in BY_VALUE_MARKERS)


def test_code_by_value_is_refused_for_workers_on_another_python() -> None:
    with pytest.raises(VersionMismatch, match=r"client runs Python 3\.11, workers run 3\.12"):
        _pack([(lambda x: x, (1,), None)], workers=("3.12",))
    _pack([(square, (1,), None)], workers=("3.12",))  # by reference: fine
    _pack([(lambda x: x, (1,), None)], workers=("3.11",))  # same Python: fine


def test_an_unpicklable_call_is_a_stand_in_and_its_own_error_is_kept() -> None:
    packed = _pack([(square, (2,), None), (square, (threading.Lock(),), None)])
    calls, _ = SIGNER.loads(packed.blob)
    assert calls[0] == (square, (2,), None)
    fn, (error,), _ = calls[1]
    assert fn is raise_error
    assert isinstance(error, pickle.PicklingError) and "square(...)" in str(error)
    assert list(packed.unpicklable) == [1]  # what the client settles the call with
    assert isinstance(packed.unpicklable[1], TypeError)
    assert "cannot pickle '_thread.lock' object" in str(packed.unpicklable[1])


def test_an_oversized_batch_names_the_limit() -> None:
    with pytest.raises(PayloadTooLarge, match="MAX_PAYLOAD_BYTES=1,048,576"):
        _pack([(square, (b"x" * (LIMIT + 1),), None)])
