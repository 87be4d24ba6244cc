"""The stack's dashboard: Prometheus's own graph page, with the queries in its URL.

Flower 2.x shows no graphs over time; the stack's Prometheus
(services/prometheus/) keeps the workers' item metrics and Flower's task
metrics, and this one URL opens a panel for each of the numbers below. The
README's link is this module's :func:`url` (a test keeps them equal);
``scripts/demo.py`` prints it through :func:`link`, only while a Prometheus
answers (``taskstack-local`` runs none without a ``prometheus`` binary).
"""

from __future__ import annotations

import http.client
import urllib.request
from typing import Final
from urllib.parse import urlencode, urlsplit

PANELS: Final = (
    ("items/s per worker", "sum by (worker) (taskstack:items:rate1m)"),
    ("items/s per function", "sum by (function) (taskstack:items:rate1m)"),
    ("tasks/s per worker", "sum by (worker) (taskstack:tasks:rate1m)"),
    ("messages waiting per queue", "max by (queue) (taskstack_queue_messages)"),
    ("failed items/s per function", "sum by (function) (taskstack:items_failed:rate1m)"),
    (
        "batch runtime p50 and p95 (s)",
        'label_replace(taskstack:batch_seconds:p50, "q", "p50", "", "")'
        ' or label_replace(taskstack:batch_seconds:p95, "q", "p95", "", "")',
    ),
    ("workers online", "sum(flower_worker_online)"),
    ("dead letters (taskstack-deadletters list)", "max(taskstack_dead_letters)"),
)
"""(title, PromQL) of each panel, top to bottom."""

RANGE: Final = "15m"
"""How far back each graph reaches when the page opens."""


def url(base: str = "http://127.0.0.1:9090", span: str = RANGE) -> str:
    """The graph page of the Prometheus at ``base`` with every panel of :data:`PANELS`,
    each graph reaching ``span`` back."""
    params: dict[str, str] = {}
    for index, (_, query) in enumerate(PANELS):
        params[f"g{index}.expr"] = query
        params[f"g{index}.tab"] = "0"  # the graph, not the table
        params[f"g{index}.range_input"] = span
    return f"{base.rstrip('/')}/graph?{urlencode(params)}"


def queries() -> list[str]:
    return [query for _, query in PANELS]


def ready(base: str, timeout: float = 3) -> bool:
    """Whether the Prometheus at ``base`` answers, with its storage open (``/-/ready``)."""
    try:
        with urllib.request.urlopen(f"{base.rstrip('/')}/-/ready", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):  # refused, timed out, not HTTP, an error status
        return False


def link(base: str) -> str:
    """The dashboard's URL while a Prometheus answers at ``base``; else words saying none
    runs, since a link would lead nowhere."""
    if ready(base):
        return url(base)
    return (
        f"none, no Prometheus runs (nothing answers on {urlsplit(base).netloc}; "
        "taskstack-local starts one when a `prometheus` binary is on PATH)"
    )
