"""Only workers put back the messages of lost consumers.

Every kombu consumer of the Redis transport, not only a worker's (the replies of
Celery's ``ping`` and ``inspect`` in a client, Flower's events), now and then takes
``unacked_mutex`` and moves the messages whose claim lapsed back to their queues
(``QoS.restore_visible``): writes to the workers' keys. A client or Flower connects as a
Redis user that may not write them (services/redis/users.acl), and the refusal failed
their ``ping`` and ``inspect``. The workers restore those messages anyway (their restore
sweep: taskstack.worker.leases), so an app's consumers restore only when its transport
options set :data:`taskstack.names.RESTORES_OPTION`, as :func:`taskstack.worker.install`
does.
"""

from __future__ import annotations

import functools
from typing import Any

from taskstack import names


def install() -> None:
    """Make kombu's Redis ``QoS.restore_visible`` ask its app's transport options first."""
    from kombu.transport.redis import QoS

    if getattr(QoS.restore_visible, "__wrapped__", None):
        return
    restore = QoS.restore_visible

    @functools.wraps(restore)
    def restore_visible(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.channel.connection.client.transport_options.get(names.RESTORES_OPTION):
            return restore(self, *args, **kwargs)
        return None

    QoS.restore_visible = restore_visible
