"""The DICOM service (SCP) and the DICOMweb source studies are retrieved from."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Self

from pydantic import Field, field_validator, model_validator

from dicom_node.settings.base import CommaList, SettingsGroup, split_list

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default repertoire, no backslash


class DicomSettings(SettingsGroup):
    """The node's DICOM service: AE title, address, peers, limits, timeouts, TLS."""

    ae_title: str = Field("SPINE_TRIAGE", description="AE title of the node's DICOM service.")
    dicom_host: str = Field("0.0.0.0", description="Address the DICOM service listens on.")
    dicom_port: int = Field(11112, ge=1, le=65535, description="TCP port of the DICOM service.")
    allowed_calling_aes: CommaList = Field(
        default_factory=list,
        description=(
            "Comma-separated calling AE titles allowed to associate. Empty: any calling AE "
            "(set it in production)."
        ),
    )
    require_called_ae: bool = Field(
        True, description="Reject associations whose called AE title is not AE_TITLE."
    )
    max_associations: int = Field(
        16, ge=1, description="Maximum number of concurrent associations per listener process."
    )
    listener_processes: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Number of DICOM listener processes sharing the port (SO_REUSEPORT). One Python "
            "process is bound by one core; several serve concurrent senders in parallel."
        ),
    )
    max_pdu_size: int = Field(
        0,
        ge=0,
        description="Maximum PDU size the node receives, in bytes (0: unlimited, the fastest).",
    )
    network_timeout_s: float = Field(60.0, gt=0, description="Idle network timeout (s).")
    dicom_poll_interval_ms: float = Field(
        1.0,
        ge=0.05,
        le=10,
        description=(
            "How long an association's network loop sleeps when it finds nothing to do (ms; "
            "pynetdicom's default). Shorter answers sooner but costs CPU: at 0.2 ms a bare "
            "receiver took 30 % less time per instance, the node 5 % less on one association "
            "and 13 % more with four on two cores; each open, idle association costs about "
            "3 % of a core more (benchmarks/README.md)."
        ),
    )
    acse_timeout_s: float = Field(30.0, gt=0, description="Association negotiation timeout (s).")
    dimse_timeout_s: float = Field(60.0, gt=0, description="DIMSE message timeout (s).")
    tls_certificate: Path | None = Field(
        None, description="PEM certificate of the node. With TLS_PRIVATE_KEY, enables DICOM TLS."
    )
    tls_private_key: Path | None = Field(None, description="PEM private key of the node.")
    tls_ca_certificates: Path | None = Field(
        None,
        description="PEM CA bundle; when set, peers must present a certificate it signed.",
    )
    dicomweb_source_url: str = Field(
        "",
        description="DICOMweb base URL of the PACS to retrieve (WADO-RS) a study from when an "
        "annotation names a study the node never received. Empty: no retrieval.",
    )
    dicomweb_source_username: str = Field("", description="Basic auth user for the source.")
    dicomweb_source_password: str = Field("", description="Basic auth password for the source.")
    dicomweb_source_bearer_token: str = Field("", description="Bearer token for the source.")

    @field_validator("allowed_calling_aes", mode="before")
    @classmethod
    def _calling_aes_from_env(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        if not _AE_TITLE.match(value) or not value.strip():
            raise ValueError("an AE title is 1-16 printable characters, no backslash")
        return value.strip()

    @field_validator("allowed_calling_aes")
    @classmethod
    def _valid_calling_aes(cls, value: list[str]) -> list[str]:
        for title in value:
            if not _AE_TITLE.match(title):
                raise ValueError(f"invalid AE title {title!r}")
        return [title.strip() for title in value]

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("TLS needs both TLS_CERTIFICATE and TLS_PRIVATE_KEY")
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certificate is not None
