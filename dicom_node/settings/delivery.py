"""Where results go: the destinations and how deliveries are retried."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dicom_node.settings.base import SettingsGroup


class _Destination(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="Unique name (logs, API)")
    max_attempts: int = Field(20, ge=1, description="Attempts before the delivery is failed")


class CStoreDestination(_Destination):
    """A PACS that receives the SR by DICOM C-STORE."""

    kind: Literal["cstore"] = "cstore"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = None  # default: the node's AE title
    tls: bool = False
    tls_ca_certificates: Path | None = None
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    timeout_s: float = 30.0


class StowDestination(_Destination):
    """A PACS that receives the SR by DICOMweb STOW-RS."""

    kind: Literal["stow"] = "stow"
    url: str  # DICOMweb base URL, e.g. https://pacs/dicom-web
    username: str | None = None
    password: str | None = None
    bearer_token: str | None = None
    ca_certificates: Path | None = None
    timeout_s: float = 30.0


class Hl7Destination(_Destination):
    """A RIS / worklist engine that receives an ORU^R01 over MLLP."""

    kind: Literal["hl7"] = "hl7"
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "SPINE_TRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout_s: float = 30.0


class OrthancDestination(_Destination):
    """An Orthanc PACS whose study metadata gets the triage status, priority and probability."""

    kind: Literal["orthanc"] = "orthanc"
    url: str  # Orthanc REST root, e.g. http://orthanc:8042
    username: str | None = None
    password: str | None = None
    timeout_s: float = 30.0


class WebhookDestination(_Destination):
    """A JSON POST signed with HMAC-SHA256 (header X-Spine-Triage-Signature)."""

    kind: Literal["webhook"] = "webhook"
    url: str
    secret: str = Field(min_length=16, description="shared HMAC secret (at least 16 characters)")
    timeout_s: float = 30.0


class FolderDestination(_Destination):
    """A local folder that receives a copy of every SR (demonstrations, audits)."""

    kind: Literal["folder"] = "folder"
    path: Path


DestinationSettings = Annotated[
    CStoreDestination
    | StowDestination
    | Hl7Destination
    | OrthancDestination
    | WebhookDestination
    | FolderDestination,
    Field(discriminator="kind"),
]


DESTINATION_KINDS: tuple[type[_Destination], ...] = (
    CStoreDestination,
    StowDestination,
    Hl7Destination,
    OrthancDestination,
    WebhookDestination,
    FolderDestination,
)


class DeliverySettings(SettingsGroup):
    """Destinations and retry backoff."""

    destinations: list[DestinationSettings] = Field(
        default_factory=list,
        description=(
            "Where results go, as a JSON list; each item has a unique name and a kind: "
            'cstore {"ae_title","host","port","tls"...}, stow {"url","username","password" or '
            '"bearer_token"}, hl7 {"host","port"}, orthanc {"url","username","password"}, '
            'webhook {"url","secret"}, folder {"path"}. Every result gets one delivery per '
            "destination, retried with backoff until it succeeds or max_attempts is reached."
        ),
    )
    delivery_backoff_s: float = Field(
        5.0, gt=0, description="First retry delay of a failed delivery; doubles per attempt."
    )
    delivery_backoff_max_s: float = Field(
        600.0, gt=0, description="Longest delay between two attempts of a delivery."
    )
    review_series: bool = Field(
        True,
        description="Send with each result SR the review series: per analysed slice position "
        "one sagittal CT image (DERIVED, the 3 mm slab the model saw, full field of view, in "
        "the original study) on which the SR draws the ROI as a 2D region, so that viewers "
        "without 3D SR support (OHIF) show it. About 0.2-0.5 MB per image; false keeps the "
        "PACS to the SR alone (its ROI then only in 3D patient coordinates).",
    )
    key_image: bool = Field(
        True,
        description="Send with each result SR one key image (Secondary Capture, in the "
        "original study, its own series): the sagittal review image with every ROI box and "
        "probability and 'computer-aided triage - not for diagnosis' burned in, for viewers "
        "that show no SR; the SR lists it among its evidence. About 0.3-0.6 MB; false sends "
        "none.",
    )

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, value: list[Any]) -> list[Any]:
        names = [destination.name for destination in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return value
