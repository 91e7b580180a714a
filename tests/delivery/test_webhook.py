"""Webhook: a signed JSON POST to a real local HTTP server that checks the signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from dicom_node.settings import WebhookDestination
from tests.delivery.conftest import ResultStudy
from tests.support import free_port
from worker.destinations.webhook import WebhookSender, sign, verify_signature
from worker.errors import PermanentError, TransientError

SECRET = "a shared secret, long and random in production"


@dataclass
class Receiver:
    """What an integration engine does: verify the signature by hand, then record the body."""

    secret: str = SECRET
    statuses: list[int] = field(default_factory=list)  # answers to give, in order (then 204)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)

    def handle(self, body: bytes, headers: dict[str, str]) -> int:
        self.headers.append(headers)
        timestamp = headers.get("X-Spine-Triage-Timestamp", "")
        expected = hmac.new(
            self.secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
        if not fresh or not hmac.compare_digest(
            headers.get("X-Spine-Triage-Signature", ""), f"sha256={expected}"
        ):
            self.refused += 1
            return 401
        status = self.statuses.pop(0) if self.statuses else 204
        if 200 <= status < 300:
            self.accepted.append(json.loads(body))
        return status


@pytest.fixture
def receiver_factory() -> Iterator[Callable[..., tuple[Receiver, str]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(**options: Any) -> tuple[Receiver, str]:
        receiver = Receiver(**options)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = receiver.handle(body, dict(self.headers.items()))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return  # keep the test output quiet

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return receiver, f"http://127.0.0.1:{server.server_address[1]}/triage"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def sender_for(url: str, secret: str = SECRET) -> WebhookSender:
    return WebhookSender(WebhookDestination(name="engine", url=url, secret=secret, timeout_s=5))


def test_signed_result_is_accepted_with_what_an_engine_needs(
    receiver_factory: Callable[..., tuple[Receiver, str]], result_study: ResultStudy
) -> None:
    receiver, url = receiver_factory()
    payload = result_study.payload(delivery_id=12)
    sender_for(url).send(payload)

    assert receiver.refused == 0
    [body] = receiver.accepted
    assert body["study_instance_uid"] == payload.study_instance_uid
    assert body["accession_number"] == payload.accession_number
    assert body["priority"] == "HIGH"
    assert body["label"] == "malignant"
    assert body["patient_probability"] == pytest.approx(payload.patient_probability)
    assert body["model"] == {"name": payload.model_name, "version": payload.model_version}
    assert body["demonstration"] is False
    assert body["sr"]["sop_instance_uid"] == payload.sr_sop_instance_uid
    assert [s["probability"] for s in body["slices"]] == list(payload.slice_probabilities)
    assert body["created_at"] == "2024-03-01T10:15:30+00:00"
    assert "patient_id" not in body and "patient_name" not in body
    text = json.dumps(body)
    assert payload.patient_id not in text and "Synthetic" not in text
    assert receiver.headers[0]["X-Spine-Triage-Delivery"] == "12"


def test_wrong_secret_is_refused_and_permanent(
    receiver_factory: Callable[..., tuple[Receiver, str]], result_study: ResultStudy
) -> None:
    receiver, url = receiver_factory()
    with pytest.raises(PermanentError, match="401"):
        sender_for(url, secret="not the shared one").send(result_study.payload())
    assert receiver.refused == 1 and receiver.accepted == []


def test_server_errors_are_transient_and_client_errors_permanent(
    receiver_factory: Callable[..., tuple[Receiver, str]], result_study: ResultStudy
) -> None:
    receiver, url = receiver_factory(statuses=[500, 503, 429, 400, 404, 200])
    sender = sender_for(url)
    for error in (TransientError, TransientError, TransientError, PermanentError, PermanentError):
        with pytest.raises(error):
            sender.send(result_study.payload())
    sender.send(result_study.payload())
    assert len(receiver.accepted) == 1


def test_receiver_down_is_transient(result_study: ResultStudy) -> None:
    with pytest.raises(TransientError, match="not reachable"):
        sender_for(f"http://127.0.0.1:{free_port()}/triage").send(result_study.payload())


def test_verify_signature_refuses_tampering_and_replay() -> None:
    body = b'{"priority":"HIGH"}'
    now = 1_700_000_000
    timestamp = str(now)
    signature = sign(SECRET, body, timestamp)
    assert verify_signature(SECRET, body, timestamp, signature, now=now + 10)
    assert not verify_signature(SECRET, b'{"priority":"ROUTINE"}', timestamp, signature, now=now)
    assert not verify_signature(SECRET, body, str(now + 1), signature, now=now)
    assert not verify_signature("other", body, timestamp, signature, now=now)
    assert not verify_signature(SECRET, body, timestamp, signature, now=now + 301)  # replay
    assert not verify_signature(SECRET, body, "yesterday", signature, now=now)


def test_empty_secret_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="secret"):
        sender_for("http://127.0.0.1:9/triage", secret="")
