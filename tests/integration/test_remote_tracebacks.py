"""Remote tracebacks of code sent by value read as local ones: the lines that raised.

As CPython's _test_multiprocessing ``test_traceback`` finds ``raise RuntimeError(123)
# some comment`` in a pool's remote traceback, each frame of a function defined in a
``__main__`` script, a classmethod of a ``__main__`` class, and a notebook cell (code
exec'd under a name registered in linecache, as IPython does) must appear in the
worker's traceback exactly as a local traceback prints it, source line included.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from taskstack.settings import Settings
from tests.support import Worker, run, settings_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLIENT = """
import json, linecache, os, traceback

from taskstack import ClusterExecutor, Pool, RemoteTraceback

# As a client on another host than the workers': they cannot read this file. Its lines
# stay in this process's linecache, as a notebook's cells do.
LINES = linecache.getlines(__file__)
linecache.cache[__file__] = (sum(map(len, LINES)), None, LINES, __file__)
os.remove(__file__)


def check(x):
    if x > 1:
        raise ValueError(f"too big: {x}")  # the line that raised
    return x


class Model:
    @classmethod
    def fit(cls, x):
        scaled = x * 10
        return check(scaled)


CELL = "def cell(x):\\n    inverse = 1 / x\\n    return inverse\\n"
NAME = "<ipython-input-7-0123456789ab>"
linecache.cache[NAME] = (len(CELL), None, CELL.splitlines(keepends=True), NAME)
namespace = {"__name__": "__main__"}
exec(compile(CELL, NAME, "exec"), namespace)
cell = namespace["cell"]


def local_frames(fn, arg):
    try:
        fn(arg)
    except Exception as exc:
        return traceback.format_tb(exc.__traceback__)[1:]  # without this frame


seen = {}
with ClusterExecutor() as ex, Pool() as pool:
    for name, fn, arg in (("main", check, 5), ("classmethod", Model.fit, 1), ("cell", cell, 0)):
        try:
            ex.submit(fn, arg).result(timeout=30)
        except Exception as exc:
            assert isinstance(exc.__cause__, RemoteTraceback)
            seen[name] = {"local": local_frames(fn, arg), "remote": str(exc.__cause__)}
    try:
        pool.apply(cell, (0,))
    except ZeroDivisionError as exc:
        seen["pool"] = {"local": local_frames(cell, 0), "remote": str(exc.__cause__)}
print(json.dumps(seen))
"""


def test_remote_frames_of_code_sent_by_value_read_as_local_ones(
    redis_server: Settings, cpu_worker: Worker, tmp_path: Path
) -> None:
    script = tmp_path / "client_script.py"
    script.write_text(textwrap.dedent(CLIENT))
    seen = json.loads(run([sys.executable, str(script)], settings_env(redis_server)))
    assert set(seen) == {"main", "classmethod", "cell", "pool"}
    for name, case in seen.items():
        assert len(case["local"]) >= 1, name
        for frame in case["local"]:  # file, line, function, source line and carets
            assert frame in case["remote"], f"{name}: {frame!r} not in {case['remote']}"
        assert "<dynamic-code>" not in case["remote"]
    assert 'raise ValueError(f"too big: {x}")  # the line that raised' in seen["main"]["remote"]
    assert f'File "{script}", line' in seen["classmethod"]["remote"]
    assert "inverse = 1 / x" in seen["cell"]["remote"]
