"""Exceptions of the stack: every one names what was wrong and what to do."""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class SignatureError(ValueError):
    """A payload was unsigned, truncated, or signed with another secret: it was not unpickled."""


class PayloadTooLarge(ValueError):
    """A batch is larger than ``MAX_PAYLOAD_BYTES``."""


class RemoteTraceback(Exception):
    """Attached as ``__cause__`` of an exception raised on a worker: the remote traceback."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def with_remote_traceback(exc: BaseException, tb: str) -> BaseException:
    """``exc`` with the worker's traceback text chained as its cause."""
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return exc
