"""A site's own integration engine that receives each result as a signed JSON POST.

The request::

    POST <url>
    Content-Type: application/json
    X-Spine-Triage-Delivery: <delivery id>       the same on every attempt: de-duplicate on it
    X-Spine-Triage-Timestamp: <unix seconds>     when this attempt was signed
    X-Spine-Triage-Signature: sha256=<hex>       HMAC-SHA256(secret, "<timestamp>." + body)

**Signature scheme.** The signed content is the timestamp header's value, a full stop, and
the exact bytes of the body. A receiver recomputes the HMAC with the shared secret, compares
it in constant time, and refuses a timestamp more than five minutes from its clock: a captured
request cannot be replayed later, and neither the body nor the timestamp can be altered
without the secret. :func:`verify_signature` does all of that and may be copied into a
receiver.

**Body** (keys sorted, UTF-8)::

    {"event": "spine-triage.result", "schema_version": 1,
     "delivery_id": 7, "result_id": 3,
     "study_instance_uid": "1.2...", "accession_number": "A123" or null,
     "patient_probability": 0.91, "label": "malignant" | "benign",
     "priority": "HIGH" | "ROUTINE", "threshold": 0.5,
     "slices": [{"x_mm": -3.0, "probability": 0.42}, ...], "vertebra": "L1" or null,
     "model": {"name": "...", "version": "..."}, "demonstration": false,
     "sr": {"sop_instance_uid": "...", "series_instance_uid": "..."},
     "created_at": "2024-03-01T10:15:30+00:00"}

No patient name or patient id: the Study Instance UID and the accession number are what an
integration engine needs to find the order, and a webhook often crosses into systems with
looser controls, so the message carries no more identifying data than that.

Answers: 2xx accepted; 408, 429, 5xx and no connection or a timeout are transient; any other
status (other 4xx, a redirect) is permanent.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from datetime import UTC
from typing import Any

import requests

from dicom_node.settings import WebhookDestination
from worker.destinations import DeliveryPayload
from worker.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

EVENT = "spine-triage.result"
SCHEMA_VERSION = 1
SIGNATURE_HEADER = "X-Spine-Triage-Signature"
TIMESTAMP_HEADER = "X-Spine-Triage-Timestamp"
DELIVERY_HEADER = "X-Spine-Triage-Delivery"
SIGNATURE_PREFIX = "sha256="
REPLAY_TOLERANCE_S = 300.0


def webhook_body(payload: DeliveryPayload) -> bytes:
    """The JSON body for ``payload`` (identical on every attempt)."""
    created_at = payload.result_created_at
    if created_at.tzinfo is None:
        created_at = created_at.replace(tzinfo=UTC)  # the database keeps UTC
    document: dict[str, Any] = {
        "event": EVENT,
        "schema_version": SCHEMA_VERSION,
        "delivery_id": payload.delivery_id,
        "result_id": payload.result_id,
        "study_instance_uid": payload.study_instance_uid,
        "accession_number": payload.accession_number or None,
        "patient_probability": payload.patient_probability,
        "label": payload.label,
        "priority": payload.priority,
        "threshold": payload.threshold,
        "slices": [
            {"x_mm": x, "probability": probability}
            for x, probability in zip(payload.slice_x_mm, payload.slice_probabilities, strict=True)
        ],
        "vertebra": payload.vertebra,
        "model": {"name": payload.model_name, "version": payload.model_version},
        "demonstration": payload.demonstration,
        "sr": {
            "sop_instance_uid": payload.sr_sop_instance_uid,
            "series_instance_uid": payload.sr_series_instance_uid,
        },
        "created_at": created_at.isoformat(),
    }
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign(secret: str, body: bytes, timestamp: str) -> str:
    """The signature header value: ``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``."""
    digest = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, "sha256")
    return SIGNATURE_PREFIX + digest.hexdigest()


def verify_signature(
    secret: str,
    body: bytes,
    timestamp: str,
    signature: str,
    *,
    tolerance_s: float = REPLAY_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """True when ``signature`` signs ``body`` at ``timestamp`` and the timestamp is fresh."""
    try:
        signed_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - signed_at) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), signature)


class WebhookSender:
    """POSTs the signed JSON of a result to one URL."""

    kind = "webhook"

    def __init__(self, config: WebhookDestination) -> None:
        if not config.secret:
            raise ValueError(f"webhook {config.name}: the secret must not be empty")
        self.name = config.name
        self.config = config

    def send(self, payload: DeliveryPayload) -> None:
        body = webhook_body(payload)
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            DELIVERY_HEADER: str(payload.delivery_id),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: sign(self.config.secret, body, timestamp),
        }
        try:
            response = requests.post(
                self.config.url,
                data=body,
                headers=headers,
                timeout=self.config.timeout_s,
                allow_redirects=False,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(f"{self.name}: webhook not reachable: {exc}") from exc
        except requests.RequestException as exc:
            raise PermanentError(f"{self.name}: webhook request failed: {exc}") from exc
        status = response.status_code
        if 200 <= status < 300:
            logger.info(
                "%s: webhook accepted (HTTP %d) delivery=%d", self.name, status, payload.delivery_id
            )
            return
        message = f"{self.name}: webhook answered HTTP {status} {response.reason}"
        if status >= 500 or status in (408, 429):
            raise TransientError(message)
        raise PermanentError(message)
