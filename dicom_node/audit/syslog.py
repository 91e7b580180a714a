"""Audit messages to the site's audit repository as syslog (IHE ITI-20 Record Audit Event).

* RFC 5424 messages: PRI facility 10 (security/authorization) and severity 5 (notice), so
  ``<85>1``; MSGID ``IHE+RFC-3881`` (ITI-20); the structured data ``[meta sequenceId="N"]``
  carries the event's row id in the audit table, so what the repository holds can be matched
  with the table; MSG is the audit message XML in UTF-8 with its BOM.
* RFC 5426 over UDP (one datagram per message) or RFC 5425 over TLS (octet-counted framing
  ``LEN SP MSG``), TLS 1.2 or later, the repository's certificate checked against the
  configured CA, and a client certificate when configured (ATNA's node authentication).

Python's ``logging.handlers.SysLogHandler`` writes RFC 3164 only, and the RFC 5424 handler on
PyPI (``rfc5424-logging-handler``, last released 2019) sends from the caller's thread through
the logging module. The framing is a few lines; what matters is that sending never blocks the
caller: :class:`SyslogForwarder` takes messages into a bounded queue (a full queue drops the
message and counts it; the audit table still holds it, and the sender reads it again from
there once its queue has run empty) and one background thread sends them, reconnecting with
backoff while the repository is down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

FACILITY_AUTH = 10  # security/authorization messages (ITI-20)
SEVERITY_NOTICE = 5
MSGID = "IHE+RFC-3881"
APP_NAME = "spine-triage"
BOM = b"\xef\xbb\xbf"
MAX_UDP_PAYLOAD = 65_507  # what one IPv4 datagram holds; RFC 5426 asks for 480 at least


def _header_field(value: str, limit: int) -> str:
    """A header field: printable US-ASCII without spaces, ``-`` when empty (RFC 5424 6.2)."""
    cleaned = "".join(ch for ch in value if 33 <= ord(ch) <= 126)[:limit]
    return cleaned or "-"


def _sd_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def format_rfc5424(
    message: str,
    *,
    timestamp: datetime,
    sequence_id: int | None,
    hostname: str | None = None,
    app_name: str = APP_NAME,
    procid: int | None = None,
    severity: int = SEVERITY_NOTICE,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG holding an audit message."""
    pri = FACILITY_AUTH * 8 + severity
    stamp = timestamp.isoformat(timespec="microseconds").replace("+00:00", "Z")
    structured = (
        f'[meta sequenceId="{_sd_value(str(sequence_id))}"]' if sequence_id is not None else "-"
    )
    header = " ".join(
        (
            f"<{pri}>1",
            stamp,
            _header_field(hostname or socket.getfqdn(), 255),
            _header_field(app_name, 48),
            _header_field(str(procid if procid is not None else os.getpid()), 128),
            _header_field(MSGID, 32),
            structured,
        )
    )
    return header.encode("ascii") + b" " + BOM + message.encode("utf-8")


def octet_counted(frame: bytes) -> bytes:
    """RFC 5425 framing: ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(frame)).encode("ascii") + b" " + frame


class Transport(Protocol):
    def send(self, frame: bytes) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SyslogTarget:
    """Where the audit repository listens and how to reach it."""

    host: str
    port: int
    transport: str = "tls"  # tls (RFC 5425) | udp (RFC 5426)
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    timeout_s: float = 5.0

    def open(self) -> Transport:
        if self.transport == "udp":
            return UdpTransport(self.host, self.port)
        return TlsTransport(self)


class UdpTransport:
    """RFC 5426: one message per datagram."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_DGRAM)
        self._address = (host, port)

    def send(self, frame: bytes) -> None:
        if len(frame) > MAX_UDP_PAYLOAD:
            raise ValueError(f"audit message of {len(frame)} bytes is too long for UDP")
        self._socket.sendto(frame, self._address)

    def close(self) -> None:
        self._socket.close()


REFUSAL_WAIT_S = 0.2


def _refused_after_handshake(tls: ssl.SSLSocket) -> None:
    """Raise when the repository refuses us right after the handshake.

    Under TLS 1.3 a server checks the client certificate after the client has finished its
    handshake: a refused certificate shows only as an alert on the next read, and writes
    until then "succeed" into the void. A syslog server never sends data, so a short read
    that times out means the connection stands."""
    timeout = tls.gettimeout()
    tls.settimeout(REFUSAL_WAIT_S)
    try:
        data = tls.recv(1)
    except (TimeoutError, ssl.SSLWantReadError):
        return
    finally:
        tls.settimeout(timeout)
    if not data:
        raise ConnectionResetError("the audit repository closed the TLS connection")
    raise ConnectionError("the audit repository sent data on a syslog connection")


class TlsTransport:
    """RFC 5425: one TLS connection, octet-counted frames, opened on first use."""

    def __init__(self, target: SyslogTarget) -> None:
        self._target = target
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(target.ca_certificates) if target.ca_certificates else None,
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if target.certificate is not None:
            context.load_cert_chain(
                target.certificate, target.private_key if target.private_key else None
            )
        self._context = context
        self._socket: ssl.SSLSocket | None = None

    def _connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection(
            (self._target.host, self._target.port), timeout=self._target.timeout_s
        )
        try:
            tls = self._context.wrap_socket(raw, server_hostname=self._target.host)
            _refused_after_handshake(tls)
            return tls
        except BaseException:
            raw.close()
            raise

    def send(self, frame: bytes) -> None:
        if self._socket is None:
            self._socket = self._connect()
        try:
            self._socket.sendall(octet_counted(frame))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._socket is not None:
            try:
                with contextlib.suppress(OSError, ValueError):
                    self._socket.unwrap()  # close_notify: the repository sees a clean end
                self._socket.close()
            finally:
                self._socket = None


@dataclass
class ForwarderStats:
    sent: int = 0
    dropped: int = 0  # the queue was full: in the audit table, sent later by ``refill``
    resent: int = 0  # dropped messages queued again from the audit table
    failures: int = 0  # send attempts that failed (each retried)


_STOP = object()


Refill = Callable[[int], list[bytes]]
"""Gives back up to N messages that were dropped earlier (read again from the audit table)."""


class SyslogForwarder:
    """A bounded queue and one sender thread: :meth:`submit` never blocks.

    With ``refill``, the sender thread asks for dropped messages again whenever its queue runs
    empty, so what a full queue dropped is sent once the repository is back."""

    def __init__(
        self,
        target: SyslogTarget,
        *,
        queue_size: int = 10_000,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        refill: Refill | None = None,
    ) -> None:
        self.target = target
        self.stats = ForwarderStats()
        self.refill = refill
        self._queue_size = queue_size
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def submit(self, frame: bytes) -> bool:
        """Queue one RFC 5424 message; False (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1
            return False
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        transport: Transport | None = None
        delay = self._retry_initial_s
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._refill()
                continue
            if item is _STOP:
                break
            assert isinstance(item, bytes)
            while True:
                try:
                    if transport is None:
                        transport = self.target.open()
                    transport.send(item)
                except (OSError, ValueError) as exc:
                    with self._lock:
                        self.stats.failures += 1
                    if transport is not None:
                        transport.close()
                        transport = None
                    if isinstance(exc, ValueError):  # a message no transport can carry
                        log.error("audit message not sent: %s", exc)
                        break
                    log.warning(
                        "audit repository %s:%d unreachable (%s); retrying in %.1f s",
                        self.target.host,
                        self.target.port,
                        type(exc).__name__,
                        delay,
                    )
                    if self._stopping.wait(delay):
                        return  # stopping: what is left stays in the audit table
                    delay = min(delay * 2, self._retry_max_s)
                    continue
                with self._lock:
                    self.stats.sent += 1
                delay = self._retry_initial_s
                break
        if transport is not None:
            transport.close()

    def _refill(self) -> None:
        if self.refill is None or self._stopping.is_set():
            return
        try:
            frames = self.refill(max(1, self._queue_size // 2))
        except Exception as exc:  # the table unreadable now: try again later
            log.warning("audit: dropped messages not read again (%s)", type(exc).__name__)
            return
        for frame in frames:
            try:
                self._queue.put_nowait(frame)
            except queue.Full:
                break
            with self._lock:
                self.stats.resent += 1

    def stop(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout_s``), then stop the thread."""
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=max(0.0, timeout_s))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        self._thread.join(1.0)
