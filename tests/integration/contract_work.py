"""Functions the drop-in contract tests run on the workers (importable there)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import redis
from joblib import Parallel, delayed


class TwoArgumentError(Exception):
    """Pickles, but does not unpickle: ``__init__`` takes other arguments than it passes up."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}/{b}")


def raise_two_argument_error() -> None:
    raise TwoArgumentError(1, 2)


class ExitOnUnpickle:
    """A result whose unpickling raises SystemExit in whoever loads it."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (exit_on_load, (3,))


def exit_on_load(code: int) -> None:
    raise SystemExit(code)


def exit_on_unpickle() -> ExitOnUnpickle:
    return ExitOnUnpickle()


def record(redis_url: str, key: str, value: object) -> object:
    """Append ``value`` to the list ``key`` when the call starts; return it."""
    redis.Redis.from_url(redis_url).rpush(key, repr(value))
    return value


def record_and_nap(redis_url: str, key: str, seconds: float, value: object) -> object:
    redis.Redis.from_url(redis_url).rpush(key, repr(value))
    time.sleep(seconds)
    return value


def leave(code: int) -> None:
    raise SystemExit(code)


def interrupt() -> None:
    raise KeyboardInterrupt


def nested_sum(n: int) -> int:
    return sum(Parallel(n_jobs=2)(delayed(abs)(-i) for i in range(n)))


def set_marker(value: str) -> None:
    os.environ["TASKSTACK_TEST_MARKER"] = value


def marker_and_pid(_: object) -> tuple[str | None, int]:
    time.sleep(0.05)
    return os.environ.get("TASKSTACK_TEST_MARKER"), os.getpid()


def span(seconds: float) -> tuple[float, float]:
    """When this call started and ended (wall clock, shared by the host's processes)."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def failing_initializer() -> None:
    raise ValueError("no setup today")


def numbers_then_error(n: int) -> Iterator[int]:
    yield from range(n)
    raise ValueError("the input broke")


class Box:
    """An input whose lifetime the tests watch (importable: it travels by reference)."""

    def __init__(self, value: int) -> None:
        self.value = value


def unbox(box: Box) -> int:
    return box.value
