"""A real rsyslog daemon as the site's audit repository: its own configuration, ports, test
CA and output file in a temporary folder (nothing of the system's), with an RFC 5426 UDP
input and an RFC 5425 TLS input (gtls, client certificates required)."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support import free_port, missing_component, require_binary

GTLS_MODULES = (
    "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so",
    "/usr/lib/aarch64-linux-gnu/rsyslog/lmnsd_gtls.so",
    "/usr/lib/rsyslog/lmnsd_gtls.so",
)
LINE = re.compile(
    rb"^(?P<input>imudp|imtcp) (?P<pri><\d+>)1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) "
    rb"(?P<procid>\S+) (?P<msgid>\S+) \[meta sequenceId=\"(?P<seq>\d+)\"\] "
    rb"\xef\xbb\xbf(?P<msg><AuditMessage>.*</AuditMessage>)$"
)


@dataclass(frozen=True)
class Received:
    transport: str  # imudp | imtcp (TLS)
    pri: str
    msgid: str
    sequence_id: int
    message: str


def _openssl(*args: str) -> None:
    subprocess.run([require_binary("openssl"), *args], check=True, capture_output=True, timeout=60)


def make_test_pki(folder: Path) -> dict[str, Path]:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate it signed."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=spine-triage test audit CA",
    )
    paths = {"ca": ca}
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
        ext = folder / f"{name}.ext"
        ext.write_text(extension + "\n")
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN={'localhost' if name == 'server' else 'spine-triage node'}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            "2",
            "-extfile",
            str(ext),
        )
        paths[f"{name}_cert"], paths[f"{name}_key"] = cert, key
    return paths


class Rsyslog:
    """``rsyslogd -n -f CONF -i PIDFILE`` writing every message it receives to one file."""

    def __init__(self, folder: Path) -> None:
        self.binary = require_binary("rsyslogd")
        if not any(Path(p).exists() for p in GTLS_MODULES):
            missing_component("rsyslog's GnuTLS driver (Debian package rsyslog-gnutls)")
        self.folder = folder
        (folder / "work").mkdir(parents=True, exist_ok=True)
        self.pki = make_test_pki(folder / "pki")
        self.udp_port = _free_udp_port()
        self.tls_port = free_port()
        self.output = folder / "audit.log"
        self.config = folder / "rsyslog.conf"
        self.config.write_text(
            f"""global(workDirectory="{folder / "work"}" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{self.pki["ca"]}"
       defaultNetstreamDriverCertFile="{self.pki["server_cert"]}"
       defaultNetstreamDriverKeyFile="{self.pki["server_key"]}")
module(load="imudp")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="x509/certvalid")
template(name="raw" type="string" string="%inputname% %rawmsg%\\n")
ruleset(name="audit") {{
  action(type="omfile" file="{self.output}" template="raw" flushOnTXEnd="on")
}}
input(type="imudp" address="127.0.0.1" port="{self.udp_port}" ruleset="audit")
input(type="imtcp" address="127.0.0.1" port="{self.tls_port}" ruleset="audit")
"""
        )
        self.log = folder / "rsyslogd.out"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Rsyslog:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "-n", "-f", str(self.config), "-i", str(self.folder / "pid")],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"rsyslogd exited: {self.log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.tls_port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"rsyslogd did not listen: {self.log.read_text()[-3000:]}")

    def received(self) -> list[Received]:
        if not self.output.exists():
            return []
        found = []
        for line in self.output.read_bytes().splitlines():
            match = LINE.match(line)
            assert match is not None, f"not an RFC 5424 audit message: {line[:300]!r}"
            found.append(
                Received(
                    transport=match["input"].decode(),
                    pri=match["pri"].decode(),
                    msgid=match["msgid"].decode(),
                    sequence_id=int(match["seq"]),
                    message=match["msg"].decode("utf-8"),
                )
            )
        return found

    def wait_for(self, count: int, timeout_s: float = 30) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.received()
            if len(found) >= count:
                return found
            time.sleep(0.2)
        return self.received()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
