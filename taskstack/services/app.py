"""The edge where Celery's own command line reads the settings.

``celery -A taskstack.services.app inspect ping`` (or ``worker``, ``events``...)
builds the stack's app from the environment; library code never reads it.
"""

from taskstack import worker
from taskstack.app import create_app
from taskstack.settings import Settings

settings = Settings.from_env()
app = create_app(settings)
worker.install(app)
