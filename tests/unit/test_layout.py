"""The package's shape: its public surface, the client/worker boundary, module size."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import taskstack
from tests.support import ROOT

MAX_MODULE_LINES = 300


def _imported_after(statement: str, cwd: Path = ROOT) -> set[str]:
    """Modules loaded by ``statement`` in a fresh interpreter run in ``cwd``."""
    code = f"import json, sys; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout
    return set(json.loads(out))


def test_public_surface_is_exactly_all() -> None:
    public = {
        name for name in vars(taskstack) if not name.startswith("_") and name[0].isupper()
    } | {"create_app", "share", "shared_task"}
    modules = {name for name, value in vars(taskstack).items() if type(value) is type(taskstack)}
    assert set(taskstack.__all__) == public - modules
    assert {"ClusterExecutor", "Pool", "Settings"} <= set(taskstack.__all__)


def test_public_names_are_exported_and_documented() -> None:
    assert sorted(taskstack.__all__) == sorted(set(taskstack.__all__))
    for name in taskstack.__all__:
        obj = getattr(taskstack, name)
        assert obj.__doc__, f"taskstack.{name} has no docstring"


def test_client_side_imports_nothing_from_the_worker_side() -> None:
    loaded = _imported_after("from taskstack import ClusterExecutor, Pool, Settings")
    assert "taskstack.client.executor" in loaded  # the probe does see the client
    worker_side = sorted(
        m for m in loaded if m == "tasks" or m.startswith(("taskstack.worker", "tasks."))
    )
    assert worker_side == []


def test_a_users_own_tasks_module_does_not_shadow_the_engine(tmp_path: Path) -> None:
    # Celery's tutorials put a project's tasks in tasks.py, next to the client code.
    (tmp_path / "tasks.py").write_text("raise ImportError('the user tasks module was imported')\n")
    loaded = _imported_after("from taskstack import ClusterExecutor, Pool, Settings", tmp_path)
    assert "taskstack.client.pool" in loaded and "tasks" not in loaded


def test_no_engine_module_outgrows_one_concept() -> None:
    for path in sorted((ROOT / "taskstack").rglob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


def test_only_task_modules_import_the_tasks_package() -> None:
    for path in sorted((ROOT / "taskstack").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert not any(n == "tasks" or n.startswith("tasks.") for n in names), path
