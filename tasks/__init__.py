"""taskstack: Celery workers, a Redis broker and Flower, driven from Python."""

from tasks.app import create_app
from tasks.cpus import available_cpus
from tasks.settings import Settings, SettingsError

__all__ = [
    "Settings",
    "SettingsError",
    "available_cpus",
    "create_app",
]
