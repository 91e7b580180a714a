"""The two kinds of failure a job or a delivery can have."""

from __future__ import annotations


class TriageError(Exception):
    """Base of the failures the pipeline and the deliveries raise on purpose."""


class TransientError(TriageError):
    """Worth retrying later (with backoff): a peer down, a timeout, a lock."""


class PermanentError(TriageError):
    """Retrying cannot help (unreadable series, ROI outside the volume, a peer's refusal):
    fail the job or delivery and keep the reason."""


def describe_error(exc: BaseException) -> str:
    """An exception in one line: its type and the first line of its message."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
