"""Single sign-on: OIDC bearer tokens signed with a locally generated RSA key set, served as
the site's JWKS over loopback HTTP (and read from a file), verified by the real app.

A valid token reaches the routes of the roles its claim maps to; a wrong issuer, a wrong
audience, an expired token, a token signed with another key (under the key's id, or an
unknown one), a token with no mapped role, and tokens that dodge the signature (alg none,
HMAC with the public key) are all refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.signin.conftest import PATIENT_NAME, Node

ISSUER = "https://sso.hospital.test/realms/radiology"
AUDIENCE = "spine-triage"
ROI = {
    "study_instance_uid": "1.2.826.0.1.3680043.8.498.2",
    "series_instance_uid": "1.2.826.0.1.3680043.8.498.3",
    "slices_x_mm": [-3.0, 0.0, 3.0],
    "polygon_yz_mm": [[0, 0], [10, 0], [10, 10], [0, 10]],
}


@dataclass
class IdentityProvider:
    """A key pair, its JWKS (served and on disk), and tokens signed with it."""

    key: rsa.RSAPrivateKey
    kid: str
    jwks_url: str
    jwks_file: Path
    requests: list[str]

    def token(
        self, key: rsa.RSAPrivateKey | None = None, kid: str | None = None, **claims: Any
    ) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "f3c2a1",
            "preferred_username": "dr.house",
            "iat": now,
            "exp": now + 300,
            "realm_access": {"roles": ["radiologist", "offline_access"]},
        }
        body.update(claims)
        body = {name: value for name, value in body.items() if value is not None}
        return jwt.encode(
            body, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid}
        )


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    key = _new_key()
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "site-key-1", "use": "sig", "alg": "RS256"})
    document = json.dumps({"keys": [jwk]}).encode()
    requests: list[str] = []

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    folder = tmp_path_factory.mktemp("jwks")
    (folder / "jwks.json").write_bytes(document)
    try:
        yield IdentityProvider(
            key=key,
            kid="site-key-1",
            jwks_url=f"http://127.0.0.1:{server.server_address[1]}/realms/radiology/certs",
            jwks_file=folder / "jwks.json",
            requests=requests,
        )
    finally:
        server.shutdown()
        server.server_close()


def _oidc(idp: IdentityProvider, jwks_url: str) -> dict[str, Any]:
    return {
        "oidc_issuer": ISSUER,
        "oidc_audience": AUDIENCE,
        "oidc_jwks_url": jwks_url,
        "oidc_roles_claim": "realm_access.roles",
        "oidc_role_map": "radiologist=reader,triage-annotator=annotator,triage-admin=admin",
    }


@pytest.fixture
def sso(idp: IdentityProvider, node_factory: Callable[..., Node]) -> Node:
    return node_factory(**_oidc(idp, idp.jwks_url))


def test_a_valid_token_reads_with_the_roles_its_claim_maps_to(
    sso: Node, idp: IdentityProvider
) -> None:
    served_before = len(idp.requests)
    reader = sso.client(idp.token())
    assert PATIENT_NAME in reader.get("/worklist").text
    assert reader.get("/session").json() == {
        "name": "dr.house",
        "kind": "oidc",
        "roles": ["reader"],
        "csrf_token": None,
        "expires_at": None,
    }
    assert reader.post("/annotations", json=ROI).status_code == 403  # a reader only
    assert len(idp.requests) > served_before  # the key set came from the IdP's URL

    annotator = sso.client(idp.token(realm_access={"roles": ["triage-annotator"]}))
    assert annotator.post("/annotations", json=ROI).status_code == 201
    assert annotator.get("/admin/tokens").status_code == 403
    admin = sso.client(
        idp.token(realm_access={"roles": ["triage-admin"]}, sub="x", preferred_username=None)
    )
    assert admin.get("/admin/tokens").status_code == 200
    assert admin.get("/session").json()["name"] == "x"  # sub when no user name claim


def test_the_key_set_can_be_a_file(
    idp: IdentityProvider, node_factory: Callable[..., Node]
) -> None:
    node = node_factory(**_oidc(idp, idp.jwks_file.as_uri()))
    assert node.client(idp.token()).get("/worklist").status_code == 200
    assert node.client(idp.token(iss="https://other.test")).get("/worklist").status_code == 401


def test_tokens_that_must_not_pass(sso: Node, idp: IdentityProvider) -> None:
    now = int(time.time())
    other_key = _new_key()
    public_pem = idp.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    unsigned = jwt.encode(
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "x",
            "exp": now + 300,
            "realm_access": {"roles": ["radiologist"]},
        },
        key=None,
        algorithm="none",
        headers={"kid": idp.kid},
    )
    refused = {
        "wrong issuer": idp.token(iss="https://evil.test/realms/radiology"),
        "wrong audience": idp.token(aud="another-app"),
        "no audience": idp.token(aud=None),
        "expired": idp.token(iat=now - 600, exp=now - 120),
        "no expiry": idp.token(exp=None),
        "another key under the site's key id": idp.token(key=other_key),
        "an unknown key id": idp.token(key=other_key, kid="attacker-key"),
        "alg none": unsigned,
        "tampered claims": _tamper(idp.token()),
    }
    # The classic confusion attack: HS256 keyed with the public key (PyJWT will not make
    # one, so it is made by hand).
    refused["HMAC with the public key"] = _hs256(
        {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "x",
            "exp": now + 300,
            "realm_access": {"roles": ["radiologist"]},
        },
        public_pem,
        idp.kid,
    )
    for what, token in refused.items():
        answer = sso.client(token).get("/worklist")
        assert answer.status_code == 401, what
        assert PATIENT_NAME not in answer.text
    no_role = sso.client(idp.token(realm_access={"roles": ["offline_access"]})).get("/worklist")
    assert no_role.status_code == 403 and PATIENT_NAME not in no_role.text
    assert sso.client(idp.token(realm_access=None)).get("/worklist").status_code == 403
    # The site's own API token still works beside single sign-on.
    assert sso.client("the-sites-api-token").get("/worklist").status_code == 200


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["realm_access"] = {"roles": ["triage-admin"]}
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{header}.{forged}.{signature}"


def _hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    def part(value: dict[str, Any]) -> str:
        return jwt.utils.base64url_encode(json.dumps(value).encode()).decode()

    signed = f"{part({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}.{part(claims)}"
    signature = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{jwt.utils.base64url_encode(signature).decode()}"
