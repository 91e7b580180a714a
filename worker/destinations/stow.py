"""A PACS that receives the result SR by DICOMweb STOW-RS (basic or bearer authentication).

The SR is posted into its own study (``/studies/{StudyInstanceUID}``), so a server that checks
the study of what it receives refuses a mismatch instead of filing it elsewhere.
"""

from __future__ import annotations

import logging

from dicom_node.dicom.dicomweb import DicomwebEndpoint, DicomwebError, DicomwebPeer
from dicom_node.settings import StowDestination
from worker.destinations import DeliveryPayload
from worker.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)


class StowSender:
    """Sends the SR file to one STOW-RS service."""

    kind = "stow"

    def __init__(self, config: StowDestination) -> None:
        self.name = config.name
        self.endpoint = DicomwebEndpoint(
            url=config.url,
            username=config.username,
            password=config.password,
            bearer_token=config.bearer_token,
            ca_certificates=config.ca_certificates,
            timeout_s=config.timeout_s,
        )

    def send(self, payload: DeliveryPayload) -> None:
        try:  # the review images and the key image first, then the SR: one request
            contents = [path.read_bytes() for path in payload.report_files()]
        except OSError as exc:
            raise PermanentError(f"{self.name}: cannot read a result file: {exc}") from exc
        try:
            with DicomwebPeer(self.endpoint) as peer:
                outcome = peer.store_instances(
                    contents, study_instance_uid=payload.study_instance_uid
                )
        except DicomwebError as exc:
            error = TransientError if exc.transient else PermanentError
            raise error(f"{self.name}: {exc}") from exc
        stored = outcome.stored_sop_instance_uids
        if stored and payload.sr_sop_instance_uid not in stored:
            raise TransientError(
                f"{self.name}: the STOW-RS answer does not list SR {payload.sr_sop_instance_uid}"
            )
        logger.info(
            "%s: SR %s stored by STOW-RS delivery=%d%s",
            self.name,
            payload.sr_sop_instance_uid,
            payload.delivery_id,
            " (with warnings)" if outcome.warnings else "",
        )
