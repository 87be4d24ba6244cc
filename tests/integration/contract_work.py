"""Functions the drop-in contract tests run on the workers (importable there)."""

from __future__ import annotations

import os
import pickle
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


def running_at_once(redis_url: str, key: str, seconds: float) -> int:
    """How many calls sharing ``key`` run while this one starts (itself included)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    running = int(client.incr(key))
    try:
        time.sleep(seconds)  # the call's work: long enough for a second one to overlap
    finally:
        client.decr(key)
    return running


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


class MyObject:
    """As CPython's executor tests' MyObject: a result or argument whose lifetime is watched."""

    def my_method(self) -> None:
        pass


def make_dummy_object(_: object) -> MyObject:
    return MyObject()


def fail_on(bad: int, redis_url: str, key: str, i: int, gate: str = "") -> int:
    """Item ``i`` of a map: item ``bad`` raises; with a ``gate``, item 0 first waits for
    it; each item that runs is recorded in ``key``."""
    client = redis.Redis.from_url(redis_url, socket_timeout=40)
    if i == 0 and gate:
        client.blpop([gate], timeout=30)
    client.rpush(key, i)
    if i == bad:
        raise ValueError(f"item {i} failed")
    return i


class ErrorAtPickle:
    """As CPython's: pickling it raises PicklingError."""

    def __reduce__(self) -> tuple[object, ...]:
        raise pickle.PicklingError("Error in pickle")


class ExitAtPickle:
    """As CPython's: pickling it exits (SystemExit)."""

    def __reduce__(self) -> tuple[object, ...]:
        raise SystemExit(1)


class RuntimeErrorAtPickle:
    """Pickling it raises RuntimeError (its ``__reduce__`` refuses)."""

    def __reduce__(self) -> tuple[object, ...]:
        raise RuntimeError("refused to pickle")


def return_instance(cls: type[object]) -> object:
    return cls()


def worker_pid(_: object = None) -> int:
    return os.getpid()


def square(x: int) -> int:
    return x * x


def nap_or_fail(bad: int, redis_url: str, key: str, seconds: float, i: int) -> int:
    """Record item ``i`` in ``key``, nap, and fail if it is item ``bad``."""
    redis.Redis.from_url(redis_url).rpush(key, i)
    time.sleep(seconds)
    if i == bad:
        raise ValueError(f"item {i} failed")
    return i
