"""Running a batch's calls in a worker process (taskstack/worker/calls.py)."""

from __future__ import annotations

import sys

import pytest

from taskstack.signing import Signer
from taskstack.worker import calls
from taskstack.worker.calls import pack_outcomes, run_calls


def test_run_calls_captures_values_and_exceptions_with_tracebacks() -> None:
    outcomes = run_calls([(divmod, (7, 2), None), (divmod, (1, 0), None), (dict, (), {"a": 1})])
    assert outcomes[0] == (True, (3, 1))
    ok, (exc, tb) = outcomes[1]
    assert not ok and isinstance(exc, ZeroDivisionError) and "ZeroDivisionError" in tb
    assert outcomes[2] == (True, {"a": 1})


def test_unpicklable_results_become_clear_errors() -> None:
    signer = Signer("k")
    outcomes, _ = signer.loads(
        pack_outcomes(signer, [(True, 1), (True, (x for x in range(3)))], 0.5)
    )
    assert outcomes[0] == (True, 1)
    ok, (exc, _) = outcomes[1]
    assert not ok and "result of type generator could not be pickled" in str(exc)


def test_stopping_the_process_is_not_an_outcome_of_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SystemExit that billiard's terminate handler raises in a pool child being
    # stopped ends the batch (Celery requeues it); it is no call's outcome.
    monkeypatch.setattr(calls, "terminate_handler_fired", lambda: True)
    with pytest.raises(SystemExit):
        run_calls([(sys.exit, (3,), None)])
