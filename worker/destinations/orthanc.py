"""An Orthanc PACS whose study metadata gets the triage result, for its worklists and viewers.

Orthanc (1.10 has no labels) keeps user metadata per study; the site declares the three
entries in its configuration, with any free indexes from 1024 up::

    "UserMetadata": {"TriagePriority": 1024, "TriageStatus": 1025, "TriageProbability": 1026}

and this destination sets, for the study with the result's Study Instance UID:

- ``TriagePriority``: ``HIGH`` or ``ROUTINE``;
- ``TriageStatus``: ``malignant`` or ``benign`` (the model's label), followed by
  `` (DEMONSTRATION MODEL - NOT FOR CLINICAL USE)`` when a demonstration model made it;
- ``TriageProbability``: the patient probability with four decimals (``0.9132``).

The study is found with ``POST /tools/lookup``; a study Orthanc does not hold (yet: the SR or
the images may still be on their way) is a transient failure. Wrong credentials (401/403) and
undeclared metadata (Orthanc answers 404 "inexistent item") are permanent: they need the
operator.
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from dicom_node.settings import OrthancDestination
from worker.destinations import DeliveryPayload
from worker.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

PRIORITY_METADATA = "TriagePriority"
STATUS_METADATA = "TriageStatus"
PROBABILITY_METADATA = "TriageProbability"
DEMONSTRATION_SUFFIX = " (DEMONSTRATION MODEL - NOT FOR CLINICAL USE)"
INEXISTENT_ITEM = 7  # Orthanc's error code for a metadata name it was not told about


def triage_metadata(payload: DeliveryPayload) -> dict[str, str]:
    """The metadata values this destination writes for ``payload``."""
    status = payload.label + (DEMONSTRATION_SUFFIX if payload.demonstration else "")
    return {
        PRIORITY_METADATA: payload.priority,
        STATUS_METADATA: status,
        PROBABILITY_METADATA: f"{payload.patient_probability:.4f}",
    }


class OrthancMetadataSetter:
    """Sets the triage metadata of a study in one Orthanc."""

    kind = "orthanc"

    def __init__(self, config: OrthancDestination) -> None:
        self.name = config.name
        self.url = config.url.rstrip("/")
        self.config = config

    def send(self, payload: DeliveryPayload) -> None:
        with requests.Session() as session:
            if self.config.username is not None and self.config.password is not None:
                session.auth = (self.config.username, self.config.password)
            study_id = self._study_id(session, payload.study_instance_uid)
            for name, value in self.metadata_for(payload).items():
                response = self._request(
                    session, "PUT", f"/studies/{study_id}/metadata/{name}", data=value
                )
                if response.status_code == 404 and _orthanc_status(response) == INEXISTENT_ITEM:
                    raise PermanentError(
                        f"{self.name}: Orthanc does not know metadata {name!r}; declare it "
                        'under "UserMetadata" in the Orthanc configuration'
                    )
                if response.status_code == 404:
                    raise TransientError(
                        f"{self.name}: study {payload.study_instance_uid} vanished from Orthanc"
                    )
                self._check(response, f"PUT metadata {name}")
        logger.info(
            "%s: Orthanc study metadata set (priority %s) study=%s delivery=%d",
            self.name,
            payload.priority,
            payload.study_instance_uid,
            payload.delivery_id,
        )

    def metadata_for(self, payload: DeliveryPayload) -> dict[str, str]:
        """Metadata name → value to set for ``payload`` (:func:`triage_metadata`)."""
        return triage_metadata(payload)

    def _study_id(self, session: requests.Session, study_instance_uid: str) -> str:
        response = self._request(session, "POST", "/tools/lookup", data=study_instance_uid)
        self._check(response, "lookup")
        try:
            matches: Any = response.json()
        except ValueError as exc:
            raise TransientError(f"{self.name}: unreadable answer to the study lookup") from exc
        study_ids = [
            str(match["ID"])
            for match in matches
            if isinstance(match, dict) and match.get("Type") == "Study" and "ID" in match
        ]
        if not study_ids:
            raise TransientError(
                f"{self.name}: Orthanc does not hold study {study_instance_uid} (yet)"
            )
        return study_ids[0]

    def _request(
        self, session: requests.Session, method: str, path: str, *, data: str
    ) -> requests.Response:
        try:
            return session.request(
                method,
                f"{self.url}{path}",
                data=data.encode("utf-8"),
                timeout=self.config.timeout_s,
                allow_redirects=False,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise TransientError(
                f"{self.name}: Orthanc at {self.url} not reachable: {exc}"
            ) from exc
        except requests.RequestException as exc:
            raise PermanentError(f"{self.name}: request to {self.url} failed: {exc}") from exc

    def _check(self, response: requests.Response, what: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        message = f"{self.name}: Orthanc {what}: HTTP {status} {_brief(response)}"
        if status in (401, 403):
            raise PermanentError(f"{message} (check the user name and password)")
        if status >= 500 or status in (408, 429):
            raise TransientError(message)
        raise PermanentError(message)


def _orthanc_status(response: requests.Response) -> int | None:
    """Orthanc's own error code in an error answer (7: inexistent item, 17: unknown resource)."""
    try:
        body: Any = response.json()
    except ValueError:
        return None
    status = body.get("OrthancStatus") if isinstance(body, dict) else None
    return status if isinstance(status, int) else None


def _brief(response: requests.Response) -> str:
    return " ".join(response.text.split())[:200]
