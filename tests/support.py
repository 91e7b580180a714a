"""Shared helpers for tests that need real components.

Under ``CI=true`` a missing component is a failure, never a skip: a green run must mean the
real peer was exercised.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing_component(what: str) -> None:
    """Fail under CI, skip on a developer machine, naming what is missing."""
    message = f"required component not available: {what}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def require_binary(name: str) -> str:
    """Return the path of an executable, or fail (CI) / skip (dev) when it is absent."""
    path = shutil.which(name)
    if path is None:
        for prefix in ("/usr/sbin", "/usr/bin", "/usr/lib/postgresql/15/bin"):
            candidate = os.path.join(prefix, name)
            if os.access(candidate, os.X_OK):
                return candidate
        missing_component(f"executable {name!r}")
        raise AssertionError("unreachable")
    return path


DCMTK_BIN = "/usr/bin"


def require_dcmtk(name: str) -> str:
    """Path of a DCMTK tool (``storescu``, ``echoscu``, ``storescp``, ``dsrdump``...).

    Looked up in /usr/bin only: pynetdicom installs Python look-alikes of the same names
    into the virtual environment's ``bin``.
    """
    path = os.path.join(DCMTK_BIN, name)
    if not os.access(path, os.X_OK):
        missing_component(f"DCMTK tool {path}")
    return path


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: Nagle off (see PERFORMANCE.md)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env
