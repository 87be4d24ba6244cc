"""The worker side: the entrypoint, the batch task, shutdown, malformed messages, CPUs.

Clients never import this package (``tests/unit/test_layout.py`` checks it).
"""

from __future__ import annotations

from celery import Celery

from taskstack import names
from taskstack.capacity import CapacityBeacon
from taskstack.worker import base, heap, shutdown, timelimits
from taskstack.worker.leases import Leases
from taskstack.worker.parking import Parking


def install(app: Celery) -> None:
    """Add what only a worker runs to ``app``: its tasks' base class, the capacity beacon,
    lease renewal, parking of ETA tasks, time limits on threads, soft shutdown and its
    deadline, and a heap left out of garbage collection."""
    if "Task" in vars(app):
        raise RuntimeError("install() must come before the app makes its first task")
    app.task_cls = base.Task
    # Its consumers put back what lost workers held (taskstack.restores).
    app.conf.broker_transport_options[names.RESTORES_OPTION] = True
    heap.install()
    app.steps["worker"].add(CapacityBeacon)
    app.steps["consumer"].add(Leases)
    app.steps["consumer"].add(Parking)
    app.steps["consumer"].add(timelimits.QoSLink)
    shutdown.install(app)
