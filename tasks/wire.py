"""What an executor client and the batch task say to each other.

The request is a Celery task message (JSON) whose ``payload`` is a signed
pickle of a :data:`Batch`. Replies go straight to the client's own Redis list,
one Redis ``RPUSH`` each, and start with a one-byte kind:

- ``S`` + batch id: the batch started running (futures become *running*);
- ``D`` + batch id + signed pickle of ``(outcomes, seconds)``: the batch ran;
- ``F`` + JSON ``{"id", "type", "error"}``: the batch was refused before
  anything of it was unpickled (bad signature, malformed message), or it
  failed as a whole (its process died every time it ran, it hit the hard time
  limit); plain text only, never a pickle;
- ``Q``: the client's own wake-up call at shutdown.
"""

from __future__ import annotations

from typing import Any, Final

Call = tuple[Any, tuple[Any, ...], dict[str, Any] | None]
"""``(function, args, kwargs)``; ``kwargs`` is ``None`` when there are none."""

Batch = list[Call]

Outcome = tuple[bool, Any]
"""``(True, value)`` or ``(False, (exception, remote traceback text))``."""

STARTED: Final = b"S"
DONE: Final = b"D"
FAILED: Final = b"F"
QUIT: Final = b"Q"
ID_SIZE: Final = 32
"""Batch ids are ``uuid4().hex``: fixed width, so replies need no delimiter."""
