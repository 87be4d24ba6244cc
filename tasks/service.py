"""The edge where services read their settings: ``celery -A tasks.service ...``.

Importing this module reads the environment; library code never does.
"""

from tasks.app import create_app
from tasks.settings import Settings

settings = Settings.from_env()
app = create_app(settings)
