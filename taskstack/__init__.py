"""taskstack: Celery workers, a Redis broker and Flower, driven from Python.

Swap ``ProcessPoolExecutor`` for :class:`ClusterExecutor`, ``multiprocessing.Pool``
for :class:`Pool`, or joblib's ``n_jobs`` backend for ``"taskstack"``, and the same
code runs on the cluster.
"""

from taskstack.app import create_app
from taskstack.client.batching import BatchSizer
from taskstack.client.executor import ClusterExecutor
from taskstack.client.futures import ClusterFuture
from taskstack.client.joblib_backend import BACKEND_NAME as JOBLIB_BACKEND
from taskstack.client.joblib_backend import ClusterBackend, register
from taskstack.client.pool import AsyncResult, Pool
from taskstack.errors import (
    PayloadTooLarge,
    RemoteError,
    RemoteTraceback,
    SettingsError,
    SignatureError,
    Terminated,
    VersionMismatch,
)
from taskstack.settings import Settings
from taskstack.sharing import Shared, share
from taskstack.signing import Signer
from taskstack.task import TypedTask, shared_task

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
    "RemoteError",
    "RemoteTraceback",
    "Settings",
    "SettingsError",
    "Shared",
    "SignatureError",
    "Signer",
    "Terminated",
    "TypedTask",
    "VersionMismatch",
    "create_app",
    "share",
    "shared_task",
]
