"""The worker side: the entrypoint, the batch task, shutdown, malformed messages, CPUs.

Clients never import this package (``tests/unit/test_layout.py`` checks it).
"""

from __future__ import annotations

from celery import Celery

from taskstack.capacity import CapacityBeacon
from taskstack.worker import heap, shutdown
from taskstack.worker.leases import Leases
from taskstack.worker.parking import Parking


def install(app: Celery) -> None:
    """Add what only a worker runs to ``app``: the capacity beacon, lease renewal, parking
    of ETA tasks, soft shutdown and its deadline, and a heap left out of garbage collection."""
    heap.install()
    app.steps["worker"].add(CapacityBeacon)
    app.steps["consumer"].add(Leases)
    app.steps["consumer"].add(Parking)
    shutdown.install(app)
