"""Functions the tests run on the workers (importable there, so they travel by reference)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import redis


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def inverse(x: float) -> float:
    return 1 / x


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def hold(redis_url: str, gate: str, timeout: float = 30) -> str:
    """Block until ``gate`` is pushed to, occupying this worker process."""
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout + 5)
    client.blpop([gate], timeout=timeout)
    return "released"


def count_and_hold(redis_url: str, key: str, gate: str, timeout: float = 30) -> int:
    """Count this run in ``key``, then block until ``gate`` is pushed to: how many runs."""
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout + 5)
    runs = int(client.incr(key))
    client.blpop([gate], timeout=timeout)
    return runs


def mark(redis_url: str, key: str) -> str:
    redis.Redis.from_url(redis_url).set(key, "ran")
    return "marked"


@dataclass(frozen=True)
class Point:
    x: float
    y: float


def norm(p: Point) -> Point:
    length = (p.x**2 + p.y**2) ** 0.5
    return Point(p.x / length, p.y / length)


class Unpicklable(Exception):
    def __reduce__(self) -> NoReturn:
        raise TypeError("not today")


def fail_oddly() -> None:
    raise Unpicklable("custom")


def total_plus(array: Any, i: int) -> tuple[float, int]:
    """Reads every page of ``array``: (its sum + i, this process's pid)."""
    return float(array.sum()) + i, os.getpid()


def identity_in_process(obj: object, i: int) -> tuple[int, int, int]:
    """(pid, id of ``obj`` in this process, ``len(obj)``): one id per process means one load."""
    return os.getpid(), id(obj), len(obj)  # type: ignore[arg-type]


def logged_square(log: str, x: int) -> int:
    """``x * x`` after a few milliseconds, each run one line in ``log`` (counts reruns)."""
    time.sleep(0.003)
    with open(log, "a") as file:
        file.write(f"{x}\n")
    return x * x
