"""HTTPS without a proxy: the real HTTP service (uvicorn) with a certificate signed by a test
CA made here. The chain verifies against the CA with Python's ssl, plain HTTP is refused on
the port, the session cookie is Secure, and the page signs in and shows the worklist in
headless Chromium, which trusts exactly the service's key (its SPKI pin)."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dicom_node.web.app import HttpServer, start_http
from dicom_node.web.auth import READER
from tests.signin.conftest import PASSWORDS, PATIENT_NAME, Node, make_node
from tests.support import free_port, require_binary
from tests.worklist.browser import PAGE_READY, browser


@dataclass(frozen=True)
class Pki:
    ca_certificate: Path
    certificate: Path
    private_key: Path
    spki_sha256: str  # base64, as Chromium's --ignore-certificate-errors-spki-list takes it


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spine-triage test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def make_pki(folder: Path) -> Pki:
    """A CA and a server certificate it signed for 127.0.0.1 and localhost."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("spine-triage test CA"))
        .issuer_name(_name("spine-triage test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Pki(
        ca_certificate=folder / "ca.pem",
        certificate=folder / "node.pem",
        private_key=folder / "node.key",
        spki_sha256=base64.b64encode(
            hashlib.sha256(
                key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            ).digest()
        ).decode(),
    )
    paths.ca_certificate.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.certificate.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths.private_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths.private_key.chmod(0o600)
    return paths


@dataclass(frozen=True)
class Https:
    node: Node
    server: HttpServer
    pki: Pki

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def verified(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.pki.ca_certificate)


@pytest.fixture
def https(tmp_path: Path) -> Iterator[Https]:
    pki = make_pki(tmp_path)
    nodes = make_node(
        tmp_path,
        f"sqlite:///{tmp_path / 'tls.db'}",
        http_host="127.0.0.1",
        http_port=free_port(),
        http_tls_certificate=pki.certificate,
        http_tls_private_key=pki.private_key,
    )
    node = next(nodes)
    server = start_http(node.settings, node.sessions, None)
    try:
        yield Https(node, server, pki)
    finally:
        server.stop()
        next(nodes, None)


def test_the_certificate_chain_verifies_against_the_test_ca(https: Https) -> None:
    with (
        socket.create_connection(("127.0.0.1", https.server.port), timeout=10) as raw,
        https.verified().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
        issuer = dict(item[0] for item in tls.getpeercert()["issuer"])
        assert subject["commonName"] == "localhost"
        assert issuer["commonName"] == "spine-triage test CA"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # Without the CA the chain does not verify.
    with (
        socket.create_connection(("127.0.0.1", https.server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


def test_plain_http_is_refused_when_tls_is_on(https: Https) -> None:
    plain = f"http://127.0.0.1:{https.server.port}"
    for path in ("/health", "/worklist", "/login"):
        with pytest.raises(httpx.HTTPError):
            httpx.get(plain + path, timeout=10)
    with httpx.Client(base_url=https.url, verify=https.verified(), timeout=10) as client:
        assert client.get("/worklist").status_code == 401


def test_over_https_the_session_cookie_is_secure(https: Https) -> None:
    with httpx.Client(base_url=https.url, verify=https.verified(), timeout=10) as client:
        answer = client.post("/login", data={"username": READER, "password": PASSWORDS[READER]})
        assert answer.status_code == 303
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(answer.headers["set-cookie"])
        morsel = cookie["spine_triage_session"]
        assert morsel["secure"] and morsel["httponly"] and morsel["samesite"] == "strict"
        assert PATIENT_NAME in client.get("/worklist").text


def test_the_page_signs_in_and_shows_the_worklist_over_https_in_chromium(https: Https) -> None:
    require_binary("chromium")
    with browser() as untrusting, pytest.raises(ConnectionError, match="ERR_CERT"):
        untrusting.goto(https.url + "/login")  # not a certificate Chromium trusts by itself
    with browser(f"--ignore-certificate-errors-spki-list={https.pki.spki_sha256}") as page:
        page.sign_in(https.url, READER, PASSWORDS[READER])
        page.wait_for(PAGE_READY, "the worklist page to render")
        assert page.evaluate("location.protocol") == "https:"
        assert page.evaluate("document.cookie") == ""  # HttpOnly: no script reads the session
        dom = page.dom()
        assert dom.by_id("user-name").text == READER
        [body] = dom.by_id("worklist").find_all("tbody")
        assert "WALKER, SECRETA" in body.text
        # Signing out ends the session: the page is sent back to the sign-in form.
        page.evaluate("document.getElementById('sign-out').click(); true")
        page.wait_for("location.pathname === '/login'", "the sign-out to land on the sign-in page")
        page.goto(https.url + "/")
        assert page.evaluate("location.pathname") == "/login"
