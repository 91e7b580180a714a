"""One :class:`~worker.destinations.Destination` per configured destination setting."""

from __future__ import annotations

from dicom_node.settings import (
    CStoreDestination,
    DestinationSettings,
    FolderDestination,
    Hl7Destination,
    OrthancDestination,
    StowDestination,
    WebhookDestination,
)
from worker.destinations import Destination
from worker.destinations.cstore import CStoreSender
from worker.destinations.folder import FolderCopier
from worker.destinations.hl7 import Hl7OruSender
from worker.destinations.orthanc import OrthancMetadataSetter
from worker.destinations.stow import StowSender
from worker.destinations.webhook import WebhookSender


def make_destination(config: DestinationSettings, *, node_ae_title: str) -> Destination:
    """The sender for ``config``; ``node_ae_title`` is the default calling AE of C-STORE."""
    if isinstance(config, CStoreDestination):
        return CStoreSender(config, node_ae_title=node_ae_title)
    if isinstance(config, StowDestination):
        return StowSender(config)
    if isinstance(config, Hl7Destination):
        return Hl7OruSender(config)
    if isinstance(config, OrthancDestination):
        return OrthancMetadataSetter(config)
    if isinstance(config, WebhookDestination):
        return WebhookSender(config)
    if isinstance(config, FolderDestination):
        return FolderCopier(config)
    raise TypeError(f"unknown destination kind: {type(config).__name__}")
