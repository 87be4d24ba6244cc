"""Source lines travelling with code pickled by value (taskstack/sources.py)."""

from __future__ import annotations

import linecache
import pickle
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from taskstack import sources

CELL = "def cell(x):\n    def inner(y):\n        return 1 / y\n    return inner(x)\n"


@pytest.fixture
def cell() -> Iterator[tuple[str, Callable[[int], float]]]:
    """A notebook-like cell: code exec'd under a name registered in linecache, as IPython does."""
    name = "<ipython-input-7-0123456789ab>"
    linecache.cache[name] = (len(CELL), None, CELL.splitlines(keepends=True), name)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(CELL, name, "exec"), namespace)
    yield name, namespace["cell"]
    linecache.cache.pop(name, None)


def test_code_sent_by_value_keeps_its_file_name_and_its_lines(
    cell: tuple[str, Callable[[int], float]],
) -> None:
    name, fn = cell
    blob = sources.dumps(fn)
    del linecache.cache[name]  # a worker process has never seen the cell
    loaded = pickle.loads(blob)
    assert loaded.__code__.co_filename == name
    with pytest.raises(ZeroDivisionError) as caught:
        loaded(0)
    text = "".join(traceback.format_exception(caught.value))
    assert f'File "{name}", line 3, in inner\n    return 1 / y\n' in text
    assert f'File "{name}", line 4, in cell\n    return inner(x)\n' in text
    assert blob.count(b"return 1 / y") == 1  # the inner function's lines come with the outer


def test_source_past_the_budget_travels_as_its_file_name(
    cell: tuple[str, Callable[[int], float]], monkeypatch: pytest.MonkeyPatch
) -> None:
    name, fn = cell
    monkeypatch.setattr(sources, "SOURCE_MAX_BYTES", 10)
    blob = sources.dumps(fn)
    assert b"return inner" not in blob
    del linecache.cache[name]
    assert pickle.loads(blob).__code__.co_filename == name


def test_a_worker_process_keeps_the_lines_of_a_bounded_number_of_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sources, "REGISTERED_MAX_FILES", 2)
    names = [f"<cell-{i}>" for i in range(3)]
    for name in names:
        sources.register(name, 2, "x = 1")
    assert names[0] not in linecache.cache
    assert linecache.getlines(names[2]) == ["\n", "x = 1\n"]
    for name in names[1:]:
        linecache.cache.pop(name, None)


def test_a_file_the_worker_can_read_is_left_to_linecache() -> None:
    here = linecache.getlines(__file__)
    assert sources.register(__file__, 1, "not this file's first line\n") == __file__
    assert linecache.getlines(__file__) == here
