from pathlib import Path

import pytest

from taskstack.errors import SignatureError
from taskstack.signing import TAG_SIZE, Signer
from taskstack.worker.runner import pack_outcomes, run_calls


class Tripwire:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.path,))


def test_round_trip_by_value_and_by_reference() -> None:
    signer = Signer("s3cret")
    offset = 3
    fn, value = signer.loads(signer.dumps((lambda x: x + offset, Path("/tmp"))))
    assert fn(1) == 4 and value == Path("/tmp")


@pytest.mark.parametrize(
    "forge",
    [
        lambda blob: Signer("other").dumps(object()),
        lambda blob: blob[TAG_SIZE:],
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),
        lambda blob: bytes([blob[0] ^ 1]) + blob[1:],
        lambda blob: b"",
    ],
    ids=["other secret", "tag stripped", "payload flipped", "tag flipped", "empty"],
)
def test_forged_payloads_are_never_unpickled(tmp_path: Path, forge: object) -> None:
    signer = Signer("s3cret")
    tripwire = tmp_path / "unpickled"
    blob = signer.dumps(Tripwire(tripwire))
    with pytest.raises(SignatureError):
        signer.loads(forge(blob))  # type: ignore[operator]
    assert not tripwire.exists()
    signer.loads(blob)
    assert tripwire.exists()  # the tripwire does fire when the signature is good


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Signer("")


def test_run_calls_captures_values_and_exceptions_with_tracebacks() -> None:
    outcomes = run_calls([(divmod, (7, 2), None), (divmod, (1, 0), None), (dict, (), {"a": 1})])
    assert outcomes[0] == (True, (3, 1))
    ok, (exc, tb) = outcomes[1]
    assert not ok and isinstance(exc, ZeroDivisionError) and "ZeroDivisionError" in tb
    assert outcomes[2] == (True, {"a": 1})


def test_unpicklable_results_become_clear_errors() -> None:
    signer = Signer("k")
    outcomes, _ = signer.loads(pack_outcomes(signer, [(True, 1), (True, (x for x in []))], 0.5))
    assert outcomes[0] == (True, 1)
    ok, (exc, _) = outcomes[1]
    assert not ok and "result of type generator could not be pickled" in str(exc)


def test_stopping_the_process_is_not_an_outcome_of_the_call() -> None:
    import sys

    import pytest as _pytest

    with _pytest.raises(SystemExit):
        run_calls([(sys.exit, (3,), None)])
