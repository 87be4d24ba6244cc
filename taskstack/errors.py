"""Exceptions of the stack: every one names what was wrong and what to do."""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


class SignatureError(ValueError):
    """A payload was unsigned, truncated, or signed with another secret: it was not unpickled."""


class UnboundPayload(SignatureError):
    """A payload was signed by a release that did not bind it to its batch: upgrade that side."""


class PayloadTooLarge(ValueError):
    """A batch is larger than ``MAX_PAYLOAD_BYTES``."""


class SharedDataGone(LookupError):
    """A batch names shared data that is no longer in Redis (its client shut down)."""


class Terminated(RuntimeError):
    """The executor or pool was terminated before this call finished."""


class VersionMismatch(RuntimeError):
    """Code pickled by value was about to go to workers running another Python version."""


def raise_error(error: BaseException) -> None:
    """Stands in for a call that could not be sent: the worker raises its error."""
    raise error


class RemoteError(Exception):
    """An exception raised on a worker that could not travel back as itself.

    ``type_name`` names the original class; the message says why it could not
    be rebuilt, and ``__cause__`` carries the remote traceback as usual.
    """

    def __init__(self, message: str, type_name: str = "") -> None:
        # Both arguments are kept in ``args``, so that this one always unpickles.
        super().__init__(message, type_name)
        self.type_name = type_name

    def __str__(self) -> str:
        return str(self.args[0])

    @classmethod
    def describe(cls, exc: BaseException, reason: str) -> RemoteError:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}"
        try:
            text = str(exc)
        except Exception:
            text = "<unprintable>"
        return cls(f"{name}: {text} (raised on a worker; {reason})", name)


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
