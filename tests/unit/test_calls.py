"""Running a batch's calls in a worker process (taskstack/worker/calls.py)."""

from __future__ import annotations

import sys
import time
from concurrent.futures import CancelledError

import pytest

from taskstack import names
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
    signer, batch_id = Signer("k"), "b" * names.ID_SIZE
    reply = pack_outcomes(
        signer, names.DONE, batch_id, 7, [(True, 1), (True, (x for x in range(3)))], 0.5
    )
    assert reply[: 1 + names.ID_SIZE] == names.DONE + batch_id.encode()
    first, outcomes, seconds = signer.loads_reply(
        reply[1 + names.ID_SIZE :], kind=names.DONE, batch_id=batch_id
    )
    assert (first, seconds) == (7, 0.5)
    assert outcomes[0] == (True, 1)
    ok, (exc, tb) = outcomes[1]
    # As ProcessPoolExecutor: the error pickling raised, noted with the result's type.
    assert not ok and isinstance(exc, TypeError) and "cannot pickle 'generator'" in str(exc)
    assert "the result of type generator was pickled" in "".join(exc.__notes__)
    assert "the result of type generator was pickled" in tb


def test_a_resumed_batch_runs_only_from_first_and_reports_as_it_goes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(names, "PROGRESS_SECONDS", 0.0)  # a reply is due after every call
    calls: list[tuple[object, tuple[int, ...], None]] = [(abs, (-i,), None) for i in range(5)]
    seen: list[int] = []
    outcomes = run_calls(
        calls,  # type: ignore[arg-type]
        first=2,
        progress=lambda so_far: seen.append(len(so_far)),
    )
    assert outcomes == [(True, 2), (True, 3), (True, 4)]
    assert seen == [1, 2]  # not after the last call: the batch's end answers it


def test_quick_calls_are_reported_together_and_a_slow_one_at_once() -> None:
    # 0.02 ms calls go together, one reply per PROGRESS_SECONDS; a call that takes
    # PROGRESS_CALL_SECONDS is reported as soon as it ends.
    slow = names.PROGRESS_CALL_SECONDS
    calls = [(sum, (range(100),), None)] * 2000 + [(time.sleep, (slow,), None)] * 2
    seen: list[int] = []
    started = time.monotonic()
    run_calls(calls, progress=lambda so_far: seen.append(len(so_far)))  # type: ignore[arg-type]
    quick = time.monotonic() - started - 2 * slow
    assert seen[-1] == 2001  # the first sleep: reported as it ended
    assert len(seen) <= quick / names.PROGRESS_SECONDS + 2


def test_a_stopped_batch_skips_the_calls_after_the_running_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(calls, "STOP_CHECK_SECONDS", 0.0)
    ran: list[int] = []
    batch = [(ran.append, (i,), None) for i in range(5)]
    outcomes = run_calls(batch, stopped=lambda: len(ran) >= 2)  # type: ignore[arg-type]
    assert ran == [0, 1]
    assert [ok for ok, _ in outcomes] == [True, True, False, False, False]
    assert all(isinstance(value[0], CancelledError) for _, value in outcomes[2:])


def test_stopping_the_process_is_not_an_outcome_of_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SystemExit that billiard's terminate handler raises in a pool child being
    # stopped ends the batch (Celery requeues it); it is no call's outcome.
    monkeypatch.setattr(calls, "terminate_handler_fired", lambda: True)
    with pytest.raises(SystemExit):
        run_calls([(sys.exit, (3,), None)])
