"""The objects a worker process starts with are left out of garbage collection.

A pool process inherits the worker's whole heap (Celery, Kombu, the stack,
the team's task modules: some 85,000 objects), and Python's full collections
walk all of it. Batches of thousands of quick calls build and drop enough
objects to set one off now and then: measured in the prefork children during
ten 20,000 x 0.1 ms maps, one or two full collections per process, of
35-45 ms each (about 0.7 % of its time). Frozen (:func:`gc.freeze`), those
objects are never walked again: a full collection took 0.2 ms. Collections
see only what batches create, and cycles among those are still collected
(a frozen object is still freed when its last reference goes; only a cycle
of them would stay). Each pool process freezes what it inherited when it
starts, and the main process its own heap once the worker is ready.
"""

from __future__ import annotations

import gc
from typing import Any

from celery.signals import worker_process_init, worker_ready


def _freeze(**_: Any) -> None:
    gc.freeze()


def install() -> None:
    """Freeze the heap in each pool process as it starts, and in the main process once
    the worker is ready."""
    worker_process_init.connect(_freeze, weak=False)
    worker_ready.connect(_freeze, weak=False)
