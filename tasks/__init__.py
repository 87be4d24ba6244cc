"""The stack's Celery tasks, and the place for your team's own.

Workers import this package at start (the ``TASK_MODULES`` setting, ``tasks``
by default), and it imports every module in this folder: add ``tasks/mine.py``
with functions decorated ``@shared_task(name="myteam.resize")`` (``from taskstack
import shared_task``: Celery's, typed), and ``docker compose up --wait`` rebuilds the
image: the workers serve them. Keep the logic in plain functions and the tasks thin,
as :mod:`tasks.stack` does over :mod:`tasks.compute` and :mod:`tasks.iowork`.

Clients need none of this to send work: ``app.send_task(name, args)`` goes by
name, and the executor sends functions by reference or by value.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
