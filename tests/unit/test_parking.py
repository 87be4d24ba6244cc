"""Which messages parking looks at: the ETA it reads from a Celery v2 message's headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from taskstack.worker.parking import eta_of


def message(headers: object) -> SimpleNamespace:
    return SimpleNamespace(headers=headers)


def test_an_aware_eta_is_read_as_a_timestamp() -> None:
    eta = datetime.now(UTC) + timedelta(days=1)
    assert eta_of(message({"eta": eta.isoformat()})) == pytest.approx(eta.timestamp())


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"eta": None},
        {"eta": ""},
        {"eta": "2030-01-01T00:00:00"},  # naive: Celery reads it in its own timezone
        {"eta": "tomorrow"},  # Celery's own path refuses it, with its error
        {"eta": 12},
        None,
        ["eta"],
    ],
)
def test_messages_without_a_clear_eta_are_left_to_celery(headers: object) -> None:
    assert eta_of(message(headers)) is None
