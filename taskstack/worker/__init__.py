"""The worker side: the entrypoint, the batch task, shutdown, malformed messages, CPUs.

Clients never import this package (``tests/unit/test_layout.py`` checks it).
"""

from __future__ import annotations

from celery import Celery

from taskstack.capacity import CapacityBeacon
from taskstack.worker import shutdown


def install(app: Celery) -> None:
    """Add what only a worker runs to ``app``: the capacity beacon, soft shutdown, deadline."""
    app.steps["worker"].add(CapacityBeacon)
    shutdown.install(app)
