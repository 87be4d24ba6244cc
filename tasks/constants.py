"""Every name that crosses the wire: queues, task names, node prefixes, Redis keys.

Workers, clients, Flower and the tests all read these, so renaming one here
renames it everywhere at once.
"""

from typing import Final

CPU_QUEUE: Final = "cpu"
"""Queue consumed by the prefork worker: CPU-bound work, one process per core."""

IO_QUEUE: Final = "io"
"""Queue consumed by the threads worker: I/O-bound work, many threads per process."""

QUEUES: Final = (CPU_QUEUE, IO_QUEUE)

POOL_FOR_QUEUE: Final = {CPU_QUEUE: "prefork", IO_QUEUE: "threads"}
"""The Celery pool each queue's worker runs, as ProcessPool vs ThreadPool locally."""

TASK_PREFIX: Final = "tasks."

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
"""The executor's task: runs a signed batch of calls and returns their outcomes."""


KEY_PREFIX: Final = "taskstack:"
"""Every Redis key the stack itself creates starts with this (Celery's own keys aside)."""

REPLY_KEY_PREFIX: Final = KEY_PREFIX + "reply:"
"""``<prefix><client id>``: list where workers push an executor client's batch outcomes."""

CAPACITY_KEY_PREFIX: Final = KEY_PREFIX + "capacity:"
"""``<prefix><queue>``: hash of node -> "processes expires_at", kept fresh by each worker."""

CAPACITY_TTL_SECONDS: Final = 30.0
CAPACITY_REFRESH_SECONDS: Final = 10.0
CAPACITY_WITHDRAW_SECONDS: Final = 5.0
"""A stopping worker waits this long at most to withdraw its entry (else it expires)."""

REDIS_CONNECTION: Final = {
    "socket_timeout": 10.0,
    "socket_connect_timeout": 5.0,
    "socket_keepalive": True,
    "health_check_interval": 10,
}
"""How every Redis connection of the stack (kombu's, the result backend's, the
executor's) notices a broker that vanished without closing TCP (a partition, a
host gone): blocking calls give up after 10 s, idle connections are pinged before
use after 10 s, and kernel keepalives probe the rest. Server-side blocking calls
(BRPOP/BLPOP) use 1 s timeouts, well below the socket timeout."""
