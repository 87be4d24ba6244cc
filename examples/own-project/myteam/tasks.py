"""The team's Celery tasks: thin wrappers over :mod:`myteam.text`.

Their names start with the team's prefix, never the stack's ``taskstack.``, so
they cannot clash with the stack's tasks or another team's. Clients send them
by name (``app.send_task("myteam.slug", ("Déjà vu",))``) and need none of this code.
"""

from __future__ import annotations

from myteam import text
from taskstack import shared_task

TASK_PREFIX = "myteam."
SLUG = TASK_PREFIX + "slug"


@shared_task(name=SLUG)
def slug(title: str) -> str:
    return text.slug(title)
