"""The batch task's reply path (taskstack/worker/runner.py), against a Redis that cannot
be reached."""

from __future__ import annotations

import base64
import time

import pytest
from celery.exceptions import Reject

from taskstack import names
from taskstack.app import create_app
from taskstack.settings import Settings
from taskstack.signing import BatchSeal, Signer
from taskstack.worker.runner import run_batch
from tests.support import free_port


def test_an_undeliverable_reply_requeues_the_batch() -> None:
    """Redis gone when the outcomes are ready: the message goes back, it does not fail."""
    settings = Settings(redis_url=f"redis://:pw@127.0.0.1:{free_port()}/0", secret="s" * 32)
    app = create_app(settings)
    batch_id, reply_to = "1" * names.ID_SIZE, names.REPLY_KEY_PREFIX + "client"
    signer = Signer(settings.secret).bind(BatchSeal(batch_id, reply_to, time.time() + 60))
    payload = base64.b64encode(signer.dumps(([(pow, (2, 10), None)], None))).decode()
    run_batch.push_request(id=batch_id)
    try:
        with pytest.raises(Reject) as rejected:
            run_batch.run(payload, reply_to, notify_start=True)
    finally:
        run_batch.pop_request()
        app.close()
    assert rejected.value.requeue is True
    assert "Connection" in type(rejected.value.reason).__name__
