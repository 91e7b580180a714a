"""The three places the node reaches into pynetdicom's private API, and nowhere else.

pynetdicom 3.0 has no public way to do these; each is a measured need (benchmarks/README.md):

- :func:`quiet_standard_handlers`: pynetdicom's standard event handlers describe every PDU
  and DIMSE message; with its logger above INFO they only build messages nobody reads, a
  measurable part of the receive path's time (``pynetdicom._config.LOG_HANDLER_LEVEL``).
- :func:`set_poll_interval`: the sleep of an association's DUL loop when it finds no event
  (``DULServiceProvider._run_loop_delay``, 1 ms by default; the DICOM_POLL_INTERVAL_MS setting).
- :func:`register_server`: a server made with ``AE.make_server`` (to use the node's own server
  class) registered with the AE as ``AE.start_server`` does, so ``AE.shutdown()`` stops it and
  aborts its associations (``AE._servers``).

:func:`check_private_api` tells whether the installed pynetdicom still has all three; a test
calls it, so an upgrade that changes them fails loudly instead of silently losing the effect.
"""

from __future__ import annotations

from typing import Any

import pynetdicom
from pynetdicom import AE, _config
from pynetdicom.dul import DULServiceProvider

_DELAY_ATTRIBUTE = "_run_loop_delay"


class PrivateApiChanged(RuntimeError):
    """The installed pynetdicom no longer has an attribute the node relies on."""


def check_private_api() -> None:
    """Raise :class:`PrivateApiChanged` naming what the installed pynetdicom lacks."""
    missing = []
    if not hasattr(_config, "LOG_HANDLER_LEVEL"):
        missing.append("pynetdicom._config.LOG_HANDLER_LEVEL")
    if not isinstance(getattr(AE(), "_servers", None), list):
        missing.append("AE._servers (a list)")
    if not _has_run_loop_delay():
        missing.append(f"DULServiceProvider.{_DELAY_ATTRIBUTE}")
    if missing:
        raise PrivateApiChanged(
            f"pynetdicom {pynetdicom.__version__} lacks {', '.join(missing)}: "
            "update dicom_node/dicom/pynetdicom_private.py"
        )


def _has_run_loop_delay() -> bool:
    """Set in the provider's ``__init__`` and read by its reactor loop."""
    return all(
        _DELAY_ATTRIBUTE in method.__code__.co_names
        for method in (DULServiceProvider.__init__, DULServiceProvider.run_reactor)
    )


def quiet_standard_handlers() -> None:
    _config.LOG_HANDLER_LEVEL = "none"


def set_poll_interval(association: Any, seconds: float) -> None:
    association.dul._run_loop_delay = seconds


def register_server(ae: AE, server: Any) -> None:
    ae._servers.append(server)
