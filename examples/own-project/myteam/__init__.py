"""A team's own tasks, served by the stack's workers (see docs/own-project.md).

Workers import this package at start (``TASK_MODULES=tasks,myteam``), and it
imports its task modules, so that their ``@shared_task`` registrations run.
"""

from myteam import tasks as tasks
