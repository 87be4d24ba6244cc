"""What the item metrics call a function (taskstack/worker/metrics.py), and their off switch."""

from __future__ import annotations

import functools

import pytest

from taskstack.errors import SettingsError
from taskstack.settings import Settings
from taskstack.worker import metrics


def double(x: int) -> int:
    return 2 * x


class BatchedCalls:
    """Shaped like joblib's: the calls it carries are in ``items``."""

    def __init__(self, n: int) -> None:
        self.items: list[tuple[object, tuple[int], dict[str, object]]] = [
            (double, (i,), {}) for i in range(n)
        ]


def test_functions_are_named_by_module_and_qualname() -> None:
    assert metrics.function_name(double) == f"{__name__}.double"
    assert metrics.function_name(functools.partial(double, 1)) == f"{__name__}.double"


def test_a_joblib_batch_is_named_after_its_calls_and_counts_them() -> None:
    assert metrics.function_name(BatchedCalls(3)) == f"{__name__}.double"
    assert metrics._items_of(BatchedCalls(3)) == 3
    assert metrics._items_of(double) == 1


def test_port_zero_turns_metrics_off() -> None:
    assert metrics.start(0, "127.0.0.1", "cpu", "cpu@host", Settings().redis_url) is False
    assert Settings.from_env({"WORKER_METRICS_PORT": "0"}).metrics_port == 0


def test_a_metrics_port_out_of_range_is_refused() -> None:
    with pytest.raises(SettingsError, match="WORKER_METRICS_PORT"):
        Settings.from_env({"WORKER_METRICS_PORT": "70000"})
