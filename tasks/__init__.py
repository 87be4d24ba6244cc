"""taskstack: Celery workers, a Redis broker and Flower, driven from Python.

Swap ``ProcessPoolExecutor`` for :class:`ClusterExecutor`, ``multiprocessing.Pool``
for :class:`Pool`, or joblib's ``n_jobs`` backend for ``"taskstack"``, and the same
code runs on the cluster.
"""

from tasks.app import create_app
from tasks.batching import BatchSizer
from tasks.cpus import available_cpus
from tasks.dispatch import ClusterFuture, RemoteTraceback
from tasks.executor import ClusterExecutor
from tasks.joblib_backend import BACKEND_NAME as JOBLIB_BACKEND
from tasks.joblib_backend import ClusterBackend, register
from tasks.pool import AsyncResult, Pool
from tasks.runner import PayloadTooLarge
from tasks.settings import Settings, SettingsError
from tasks.signing import SignatureError, Signer

register()

__all__ = [
    "JOBLIB_BACKEND",
    "AsyncResult",
    "BatchSizer",
    "ClusterBackend",
    "ClusterExecutor",
    "ClusterFuture",
    "PayloadTooLarge",
    "Pool",
    "RemoteTraceback",
    "Settings",
    "SettingsError",
    "SignatureError",
    "Signer",
    "available_cpus",
    "create_app",
]
