"""A PACS that receives the result SR by DICOM C-STORE (pynetdicom SCU, optional TLS), with
the review series it draws on and the key image it references (sent first, over the same
association).

The SR's SOP Instance UID is deterministic, so a re-send after a lost response stores the
same instance again (PACS treat it as a duplicate or an update), never a second report.
"""

from __future__ import annotations

import logging

from dicom_node.dicom.scu import StoreError, StorePeer, make_client_ssl_context, store_files
from dicom_node.settings import CStoreDestination
from worker.destinations import DeliveryPayload
from worker.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)


class CStoreSender:
    """Sends the SR file to one C-STORE SCP."""

    kind = "cstore"

    def __init__(self, config: CStoreDestination, *, node_ae_title: str) -> None:
        self.name = config.name
        self.config = config
        ssl_context = None
        if config.tls:
            ssl_context = make_client_ssl_context(
                ca_certificates=config.tls_ca_certificates,
                certificate=config.tls_certificate,
                private_key=config.tls_private_key,
            )
        self.peer = StorePeer(
            ae_title=config.ae_title,
            host=config.host,
            port=config.port,
            calling_ae_title=config.calling_ae_title or node_ae_title,
            ssl_context=ssl_context,
            timeout_s=config.timeout_s,
        )

    def send(self, payload: DeliveryPayload) -> None:
        files = payload.report_files()
        for path in files:
            if not path.is_file():
                raise PermanentError(f"the file {path} does not exist")
        try:  # one association: the review images and the key image first, then the SR
            outcome = store_files(files, self.peer)[-1]
        except StoreError as exc:
            error = TransientError if exc.transient else PermanentError
            raise error(f"{self.name}: {exc}") from exc
        if outcome.sop_instance_uid != payload.sr_sop_instance_uid:
            logger.warning(
                "%s: the SR file holds %s, the result names %s",
                self.name,
                outcome.sop_instance_uid,
                payload.sr_sop_instance_uid,
            )
        logger.info(
            "%s: SR %s stored on %s (status 0x%04X) delivery=%d",
            self.name,
            outcome.sop_instance_uid,
            self.peer.describe(),
            outcome.status,
            payload.delivery_id,
        )
