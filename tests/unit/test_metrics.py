"""What the item metrics call a function (taskstack/worker/metrics.py), and their off switch."""

from __future__ import annotations

import functools
import types
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Any

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


@dataclass
class Scale:
    """A callable that cannot be hashed (a dataclass with ``eq``)."""

    factor: int

    def __call__(self, x: int) -> int:
        return self.factor * x


class Recorded:
    """Stands in for the Prometheus metrics: keeps what a batch added, by labels."""

    def __init__(self) -> None:
        self.added: dict[tuple[str, ...], float] = {}
        self.labelled: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> Recorded:
        return self

    def labels(self, *labels: str) -> Recorded:
        self.labelled = labels
        return self

    def inc(self, amount: float = 1) -> None:
        self.added[self.labelled] = self.added.get(self.labelled, 0) + amount

    def observe(self, value: float) -> None:
        pass


def test_a_batch_is_counted_by_function_and_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded = Recorded()
    monkeypatch.setattr(metrics, "_metrics", recorded)
    task: Any = types.SimpleNamespace(
        request=types.SimpleNamespace(delivery_info={"routing_key": "cpu"}, hostname="w")
    )
    scale = Scale(3)
    calls: Any = (
        [(double, (1,), None)] * 5 + [(scale, (1,), None)] * 2 + [(BatchedCalls(4), (), None)]
    )
    failure = (ValueError("no"), "")
    outcomes: Any = [(True, 2)] * 3 + [(False, failure), (False, (CancelledError(), ""))]
    outcomes += [(True, 3), (False, failure), (True, [2] * 4)]
    metrics.record_batch(task, calls, outcomes, 1.0)
    name = f"{__name__}.double"
    assert recorded.added == {
        (name, "cpu", "w", "ok"): 3 + 4,  # the joblib batch counts its four calls
        (name, "cpu", "w", "failed"): 1,
        (name, "cpu", "w", "skipped"): 1,
        (f"{__name__}.Scale", "cpu", "w", "ok"): 1,
        (f"{__name__}.Scale", "cpu", "w", "failed"): 1,
        ("cpu", "w"): 1,  # the batch
    }


def test_port_zero_turns_metrics_off() -> None:
    assert metrics.start(0, "127.0.0.1", "cpu", "cpu@host", Settings().redis_url) is False
    assert Settings.from_env({"WORKER_METRICS_PORT": "0"}).metrics_port == 0


def test_a_metrics_port_out_of_range_is_refused() -> None:
    with pytest.raises(SettingsError, match="WORKER_METRICS_PORT"):
        Settings.from_env({"WORKER_METRICS_PORT": "70000"})
