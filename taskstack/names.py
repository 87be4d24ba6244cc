"""Every name that crosses the wire: queues, node names, task names, Redis keys,
app settings and the executor's reply protocol.

Workers, clients, Flower, the YAML files and the tests all follow this module,
so renaming one here renames it everywhere at once.

The executor's request is a Celery task message (JSON) whose ``payload`` is a
signed pickle of a :data:`Request`, and whose ``stop_keys`` name the keys that
tell a running batch its client stopped it (see :mod:`taskstack.claims`). Replies go straight to the client's own Redis
list, one ``RPUSH`` each, and start with a one-byte kind:

- :data:`STARTED` + batch id: the batch started running (futures become *running*);
- :data:`PROGRESS` + batch id + signed pickle of a :data:`Segment`: outcomes of
  calls that finished while the batch runs on, so a batch redelivered after its
  worker died runs only the calls whose outcomes were not yet sent;
- :data:`DONE` + batch id + signed pickle of a :data:`Ending`: the batch ran to its
  end; its last outcomes;
- :data:`FAILED` + JSON ``{"id", "type", "error"}``: the batch was refused before
  anything of it was unpickled (bad signature, malformed message), or it failed
  as a whole (its process died every time it ran, it hit the hard time limit);
  plain text only, never a pickle;
- :data:`QUIT`: the client's own wake-up call at shutdown.
"""

from __future__ import annotations

from typing import Any, Final

# -- queues and nodes ------------------------------------------------------------

CPU_QUEUE: Final = "cpu"
"""Queue consumed by the prefork worker: CPU-bound work, one process per core."""

IO_QUEUE: Final = "io"
"""Queue consumed by the threads worker: I/O-bound work, many threads per process."""

QUEUES: Final = (CPU_QUEUE, IO_QUEUE)

POOL_FOR_QUEUE: Final = {CPU_QUEUE: "prefork", IO_QUEUE: "threads"}
"""The Celery pool each queue's worker runs, as ProcessPool vs ThreadPool locally."""


def node_name(queue: str, hostname: str) -> str:
    """A worker's Celery node name: ``<queue>@<hostname>``, distinct per replica."""
    return f"{queue}@{hostname}"


# -- task names --------------------------------------------------------------------

TASK_PREFIX: Final = "taskstack."
"""The stack's own task names start with this, so they never clash with a team's."""

COUNT_PRIMES: Final = TASK_PREFIX + "count_primes"
MONTE_CARLO_PI: Final = TASK_PREFIX + "monte_carlo_pi"
MANDELBROT_TILE: Final = TASK_PREFIX + "mandelbrot_tile"
MATMUL_TRACE: Final = TASK_PREFIX + "matmul_trace"
FETCH_URL: Final = TASK_PREFIX + "fetch_url"
WAIT: Final = TASK_PREFIX + "wait"
WHOAMI: Final = TASK_PREFIX + "whoami"
SPIN: Final = TASK_PREFIX + "spin"
NOOP: Final = TASK_PREFIX + "noop"
COUNT_PRIMES_ON: Final = TASK_PREFIX + "count_primes_on"
RUN_BATCH: Final = TASK_PREFIX + "run_batch"
"""The executor's task: runs a signed batch of calls and replies with their outcomes."""

IO_TASKS: Final = (FETCH_URL, WAIT)
"""Tasks routed to the ``io`` queue; every other task goes to ``cpu``."""

RUNNER_MODULE: Final = "taskstack.worker.runner"
"""Where the batch task lives; workers import it, clients never need to."""

# -- Redis keys ------------------------------------------------------------------------

KEY_PREFIX: Final = "taskstack:"
"""Every Redis key the stack itself creates starts with this (Celery's own keys aside)."""

REPLY_KEY_PREFIX: Final = KEY_PREFIX + "reply:"
"""``<prefix>[<Redis user>:]<client id>``: list where workers push an executor client's batch
outcomes."""


def reply_key(user: str | None, client_id: str) -> str:
    """A client's reply list, under the name of the Redis user it connects as: a client
    user's ACL lets it read its own user's lists only (services/redis/users.acl)."""
    return f"{REPLY_KEY_PREFIX}{user}:{client_id}" if user else REPLY_KEY_PREFIX + client_id


CAPACITY_KEY_PREFIX: Final = KEY_PREFIX + "capacity:"
"""``<prefix><queue>``: hash of node -> "processes expires_at python cloudpickle", kept
fresh by each worker."""

CLAIM_KEY_PREFIX: Final = KEY_PREFIX + "claim:"
"""``<prefix><batch id>``: hash of ``started`` (a worker took the batch), ``all`` or
``c<index>`` (the client cancelled the batch or one call before it started)."""

STOP_KEY_PREFIX: Final = KEY_PREFIX + "stop:"
"""``<prefix><client or map id>``: exists once a client stopped a map or terminated;
running batches that name it stop between calls."""

SHARED_KEY_PREFIX: Final = KEY_PREFIX + "shared:"
"""``<prefix><client id>:<sha256 hex>``: a big buffer or shared object a client sent once
(see :mod:`taskstack.sharing`); deleted when the client shuts down, else it expires."""

PARKED_KEY: Final = KEY_PREFIX + "parked"
"""Sorted set of ETA task messages no worker holds yet, each its queue's list key, a newline
and the message, scored by when a worker returns it there (see :mod:`taskstack.worker.parking`)."""

DEAD_LETTERS_KEY: Final = KEY_PREFIX + "dead"
"""List of JSON records of what workers will not run: queue entries their intake refused,
messages given up after too many deliveries (see :mod:`taskstack.worker.deadletters`)."""

DELIVERIES_KEY_PREFIX: Final = KEY_PREFIX + "deliveries:"
"""``<prefix><task id>``: hash of a message delivered again (redelivered or retried) and
not yet finished: ``count`` of such deliveries, the ``entry`` and its ``queue``."""

# -- app.conf keys that are not Celery's -------------------------------------------------

REDIS_SETTING: Final = "taskstack_redis_backend"
"""The broker as :func:`taskstack.connections.connect` takes it: a Redis, or its Sentinels.
Named a *backend* so that Celery hides its password, as for the shared data's."""

RESTORES_OPTION: Final = "taskstack_restores"
"""Broker transport option: this app's consumers put lost consumers' messages back in their
queues (a worker's only; see :mod:`taskstack.restores`)."""

SECRET_SETTING: Final = "taskstack_secret"
"""The signing secret (Celery masks keys naming SECRET when a worker's config is inspected)."""

MAX_PAYLOAD_SETTING: Final = "taskstack_max_payload_bytes"

SHARED_DIR_SETTING: Final = "taskstack_shared_dir"
"""Where a worker host keeps the shared objects it fetched, one file each."""

SHARED_EXPIRES_SETTING: Final = "taskstack_shared_expires"

SHARED_REDIS_SETTING: Final = "taskstack_shared_backend"
"""The Redis URL of shared data. Named a *backend* so that Celery hides its password when
a worker's configuration is inspected, as it does the result backend's."""

MAX_ETA_TASKS_SETTING: Final = "taskstack_max_eta_tasks"

# -- the executor's reply protocol ---------------------------------------------------------

Call = tuple[Any, tuple[Any, ...], dict[str, Any] | None]
"""``(function, args, kwargs)``; ``kwargs`` is ``None`` when there are none."""

Batch = list[Call]

Setup = tuple[str, Any, tuple[Any, ...]] | None
"""``(token, initializer, initargs)``: run once per worker process and token, first."""

Request = tuple[Batch, Setup]
"""What a batch's signed payload unpickles to."""

Outcome = tuple[bool, Any]
"""``(True, value)`` or ``(False, (exception, remote traceback text))``."""

SKIPPED_CALL: Final = "cancelled before it started"
"""The outcome text of a call the worker skipped because its client cancelled it."""

Segment = tuple[int, list[Outcome], float, int]
"""``(index of the first call, outcomes of consecutive calls, seconds, ran)``: and how
long the ``ran`` calls this delivery ran so far took."""

Ending = tuple[int, list[Outcome], float, int]
"""``(first, outcomes, seconds, ran)``: the last segment, and how long the ``ran``
calls run by this delivery took. ``first`` is :data:`WHOLE_BATCH` when its one
outcome (a batch that could not be loaded) stands for every call."""

WHOLE_BATCH: Final = -1

PROGRESS_CALL_SECONDS: Final = 0.05
"""A call that took at least this long has its outcome sent as it finishes: a kill
reruns only the call that was running. As long as :data:`PROGRESS_SECONDS`, so that a
process sends at most 20 replies a second whatever its calls take (at 10 ms, each of a
400 x 10 ms map's calls was a reply, and the map ran about 2 % slower)."""

PROGRESS_SECONDS: Final = 0.05
"""Quicker calls' outcomes are sent together, one reply per this long: at most 20
replies a second and process, and a kill reruns at most this much finished work."""

STARTED: Final = b"S"
PROGRESS: Final = b"P"
DONE: Final = b"D"
FAILED: Final = b"F"
QUIT: Final = b"Q"
ID_SIZE: Final = 32
"""Batch ids are ``uuid4().hex``: fixed width, so replies need no delimiter."""
