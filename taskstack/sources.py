"""Source lines that travel with code pickled by value, so that remote tracebacks show them.

cloudpickle sends a function defined in ``__main__``, in a notebook cell or in
a ``__main__`` class by value, and names its code's file ``<dynamic-code>``:
a worker's traceback showed no source line where a local pool shows the line
that raised. The client's :class:`Pickler` keeps each code object's file name
and ships the lines it spans, read from :mod:`linecache` as it is pickled (a
script's file, or a cell IPython registered there), at most
:data:`SOURCE_MAX_BYTES` per payload. Unpickling registers them in the worker
process's linecache under the same name, as IPython registers its cells, so the
worker's traceback, and the client's re-raised remote one, read as local ones.
"""

from __future__ import annotations

import io
import linecache
import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import cloudpickle

SOURCE_MAX_BYTES: Final = 64 * 1024
"""Source text one payload carries at most: a function's own lines (not its whole file)
fit many times over; code past it travels with its file name alone."""
REGISTERED_MAX_FILES: Final = 256
"""Files whose shipped lines a worker process keeps (each notebook cell is one); the
oldest are forgotten first."""

_registered: OrderedDict[str, None] = OrderedDict()
_reducer_override = cloudpickle.Pickler.reducer_override


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle ships no types
    """cloudpickle's pickler, whose code objects keep their file name and carry their lines."""

    def __init__(self, file: io.BytesIO, buffer_callback: Any = None) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self._budget = SOURCE_MAX_BYTES
        self._shipped: dict[str, list[tuple[int, int]]] = {}

    def reducer_override(self, obj: Any, _code: Any = types.CodeType) -> Any:
        # Called for nearly every object pickled: kept to one test before cloudpickle's.
        if type(obj) is not _code:
            return _reducer_override(self, obj)
        rebuild, args = self.dispatch_table[_code](obj)
        return code_at, (rebuild, args, self._source(obj))

    def _source(self, code: types.CodeType) -> Source | str:
        """The lines ``code`` spans, unless shipped already (an inner function's are its
        outer one's) or past the budget: then its file name alone."""
        filename = code.co_filename
        first = code.co_firstlineno
        last = max((line for *_, line in code.co_lines() if line is not None), default=first)
        shipped = self._shipped.setdefault(filename, [])
        if any(start <= first and last <= end for start, end in shipped):
            return filename
        text = "".join(linecache.getlines(filename)[first - 1 : last])
        if not text or len(text) > self._budget:
            return filename
        self._budget -= len(text)
        shipped.append((first, last))
        return Source(filename, first, text)


class Source:
    """Lines ``first`` on of ``filename``: unpickled, they join the process's linecache."""

    def __init__(self, filename: str, first: int, text: str) -> None:
        self.filename, self.first, self.text = filename, first, text

    def __reduce__(self) -> tuple[Callable[..., str], tuple[str, int, str]]:
        return register, (self.filename, self.first, self.text)


def dumps(obj: object, buffer_callback: Any = None) -> bytes:
    """``obj`` pickled as :func:`cloudpickle.dumps` does (protocol 5), code with its lines."""
    with io.BytesIO() as file:
        Pickler(file, buffer_callback=buffer_callback).dump(obj)
        return file.getvalue()


def register(filename: str, first: int, text: str) -> str:
    """Put ``text`` at line ``first`` of ``filename`` in linecache; the file name.

    A file this process can read itself (a module deployed on the workers too) is
    left to linecache, as for code sent by reference: a partial entry would hide
    its other lines from the tracebacks of that code.
    """
    if filename not in _registered and linecache.getlines(filename):
        return filename
    lines = text.splitlines(keepends=True)
    lines[-1] = lines[-1] if lines[-1].endswith("\n") else lines[-1] + "\n"
    entry = linecache.cache.get(filename)
    known = list(entry[2]) if entry is not None and len(entry) == 4 else []
    known.extend(["\n"] * (first - 1 + len(lines) - len(known)))
    known[first - 1 : first - 1 + len(lines)] = lines
    # No modification time: linecache.checkcache() keeps the entry (as IPython's cells).
    linecache.cache[filename] = (sum(map(len, known)), None, known, filename)
    _registered[filename] = None
    _registered.move_to_end(filename)
    while len(_registered) > REGISTERED_MAX_FILES:
        linecache.cache.pop(_registered.popitem(last=False)[0], None)
    return filename


def code_at(
    rebuild: Callable[..., types.CodeType], args: tuple[Any, ...], filename: str
) -> types.CodeType:
    """The code object cloudpickle rebuilds, under its own file name again."""
    return rebuild(*args).replace(co_filename=filename)
