"""Settings of the node and the workers, from the environment (prefix ``SPINE_TRIAGE_``).

The defaults are the *embedded mode*: SQLite, storage and a local broker under ``./var/``,
nothing to install but Python packages. Production sets a PostgreSQL URL and a Redis broker.

Every field carries a description; ``.env.example`` and the operator guide are generated from
this model (``spine-triage config env-example``), so they cannot drift from it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "SPINE_TRIAGE_"
_AE_TITLE = re.compile(
    r"^[\x20-\x5b\x5d-\x7e]{1,16}$"
)  # default character repertoire, no backslash


def _split_list(value: Any) -> Any:
    """Accept ``A,B,C`` (or a JSON list) for list settings given in the environment."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


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


class Settings(BaseSettings):
    """All settings; see ``.env.example`` for the environment variable of each field."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # --- where things live -------------------------------------------------------------
    var_dir: Path = Field(
        Path("var"),
        description="Folder for embedded-mode state: SQLite database, storage, broker, caches.",
    )
    database_url: str = Field(
        "",
        description=(
            "SQLAlchemy database URL. Empty: SQLite at VAR_DIR/spine-triage.db (embedded mode). "
            "Production: postgresql+psycopg2://user:password@host:5432/dbname."
        ),
    )
    storage_dir: Path | None = Field(
        None,
        description="Root of the DICOM file store (archive of record). Empty: VAR_DIR/storage.",
    )

    # --- DICOM service (SCP) -----------------------------------------------------------
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
    quiet_period_s: float = Field(
        30.0,
        gt=0,
        description=(
            "A study is complete when no instance of it arrived for this long (Orthanc's "
            "StableAge). An instance arriving later re-opens the study."
        ),
    )
    completion_check_interval_s: float = Field(
        1.0, gt=0, description="How often the node looks for studies that became complete (s)."
    )
    min_free_disk_mb: int = Field(
        512,
        ge=0,
        description="Below this much free space in STORAGE_DIR the node answers C-STORE with "
        "0xA700 (out of resources) so the sender retries later.",
    )

    # --- broker and workers ------------------------------------------------------------
    broker_url: str = Field(
        "",
        description=(
            "Celery broker URL. Empty: a local filesystem transport under VAR_DIR/broker "
            "(embedded mode). Production: redis://host:6379/0."
        ),
    )
    broker_visibility_timeout_s: int = Field(
        3600,
        gt=0,
        description="Redis: a task not acknowledged within this time is redelivered. Keep it "
        "above the longest job.",
    )
    job_lease_s: float = Field(
        600.0,
        gt=0,
        description="A worker's claim on an annotation expires after this long; another worker "
        "may then take it over.",
    )
    job_max_attempts: int = Field(
        5, ge=1, description="Attempts of one annotation before it is failed for good."
    )
    sweeper_interval_s: float = Field(
        15.0,
        gt=0,
        description="How often the sweeper re-enqueues ready work whose message was lost and "
        "expired claims (s).",
    )

    # --- model ---------------------------------------------------------------------------
    model_checkpoint: Path | None = Field(
        None,
        description=(
            "Checkpoint the workers serve. Empty: the demonstration model (trained on synthetic "
            "data on first use and cached under VAR_DIR/models; not for clinical use)."
        ),
    )
    threshold: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Patient probability at or above which a study is flagged HIGH. Empty: the "
        "threshold stored in the checkpoint (0.5 unless the site chose another).",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="CPU threads a worker process gives PyTorch for inference (0: PyTorch's "
        "default, one per core). One is fastest beside other work on a small CPU; scale with "
        "worker processes instead.",
    )
    inference_device: str = Field(
        "auto", description="auto (CUDA when present, else CPU), cpu, or cuda[:N]."
    )
    series_selection: CommaList = Field(
        default_factory=lambda: ["Modality=CT"],
        description="Rules a series must meet to be used as the CT of an ROI, KEY=REGEX pairs "
        "matched case-insensitively against DICOM attributes.",
    )

    # --- delivery ------------------------------------------------------------------------
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
    dicomweb_source_url: str = Field(
        "",
        description="DICOMweb base URL of the PACS to retrieve (WADO-RS) a study from when an "
        "annotation names a study the node never received. Empty: no retrieval.",
    )
    dicomweb_source_username: str = Field("", description="Basic auth user for the source.")
    dicomweb_source_password: str = Field("", description="Basic auth password for the source.")
    dicomweb_source_bearer_token: str = Field("", description="Bearer token for the source.")

    # --- HTTP service ------------------------------------------------------------------
    http_host: str = Field("127.0.0.1", description="Address of the REST API and worklist page.")
    http_port: int = Field(8080, ge=1, le=65535, description="Port of the REST API and worklist.")
    api_token: str = Field(
        "",
        description="Bearer token required on every write to the REST API. Empty: a random "
        "token is generated at start and written to VAR_DIR/api-token (embedded mode).",
    )

    @field_validator("allowed_calling_aes", "series_selection", mode="before")
    @classmethod
    def _lists_from_env(cls, value: Any) -> Any:
        return _split_list(value)

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

    @field_validator("destinations")
    @classmethod
    def _unique_destination_names(cls, value: list[Any]) -> list[Any]:
        names = [destination.name for destination in value]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)}")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("TLS needs both TLS_CERTIFICATE and TLS_PRIVATE_KEY")
        return self

    # --- derived values ----------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.var_dir / 'spine-triage.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.var_dir / "storage").resolve()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "spinefs://"

    @property
    def broker_folder(self) -> Path:
        """Folder of the embedded filesystem transport."""
        return (self.var_dir / "broker").resolve()

    @property
    def tls_enabled(self) -> bool:
        return self.tls_certificate is not None

    @property
    def is_embedded(self) -> bool:
        return not self.broker_url


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and ``.env``), with explicit overrides on top."""
    return Settings(**overrides)


def render_env_example() -> str:
    """The text of ``.env.example``: every setting, its default and its meaning."""
    lines = [
        "# spine-triage settings. Every variable is optional; the defaults run embedded mode",
        "# (SQLite, storage and a local broker under ./var/). Generated from",
        "# dicom_node/settings.py by `spine-triage config env-example`; do not edit by hand.",
        "",
    ]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list) and name == "destinations":
            shown = "[]"
        elif isinstance(default, list):
            shown = ",".join(str(item) for item in default)
        elif default is None:
            shown = ""
        elif isinstance(default, bool):
            shown = "true" if default else "false"
        else:
            shown = str(default)
        for text_line in _wrap(field.description or ""):
            lines.append(f"# {text_line}")
        lines.append(f"#{ENV_PREFIX}{name.upper()}={shown}")
        lines.append("")
    return "\n".join(lines)


def _wrap(text: str, width: int = 92) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width) or [""]


DESTINATION_KINDS: tuple[type[_Destination], ...] = (
    CStoreDestination,
    StowDestination,
    Hl7Destination,
    OrthancDestination,
    WebhookDestination,
    FolderDestination,
)


def render_settings_markdown() -> str:
    """The text of ``docs/settings.md``: every setting and every destination field.

    Generated from this model so the operator guide's reference cannot drift from the code;
    a test compares the committed file with this text.
    """
    lines = [
        "# Settings reference",
        "",
        "<!-- Generated from dicom_node/settings.py by render_settings_markdown(); "
        "do not edit by hand. -->",
        "",
        "Every setting is an environment variable with the prefix `SPINE_TRIAGE_` (or a line "
        "of a `.env` file in the working directory of the process). All are optional: the "
        "defaults run the embedded mode (SQLite, storage and a local broker under `VAR_DIR`). "
        "The node and every worker must be given the same values for the settings they share "
        "(database, broker, storage, AE title, destinations, model). `spine-triage config "
        "show` prints the values a process would use (secrets hidden); `spine-triage config "
        "env-example` prints them all as a commented `.env` file.",
        "",
        "| Variable | Type | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        lines.append(
            f"| `{ENV_PREFIX}{name.upper()}` | {_markdown_type(field)} | "
            f"{_markdown_default(name, field)} | {_markdown_cell(field.description or '')} |"
        )
    lines += [
        "",
        "## Destinations",
        "",
        f"`{ENV_PREFIX}DESTINATIONS` is a JSON list of objects; `kind` selects one of the "
        "forms below and `name` must be unique. Every result gets one delivery per "
        "destination. Example:",
        "",
        "```",
        f"{ENV_PREFIX}DESTINATIONS="
        '[{"kind": "cstore", "name": "pacs", "ae_title": "PACS", "host": "pacs.example", '
        '"port": 104}, {"kind": "hl7", "name": "ris", "host": "ris.example", "port": 2575}]',
        "```",
    ]
    for kind_class in DESTINATION_KINDS:
        kind = kind_class.model_fields["kind"].default
        lines += [
            "",
            f"### `{kind}`",
            "",
            _markdown_cell((kind_class.__doc__ or "").strip()),
            "",
            "| Field | Type | Default | Meaning |",
            "|---|---|---|---|",
        ]
        for field_name, field in kind_class.model_fields.items():
            if field_name == "kind":
                continue
            default = "required" if field.is_required() else _markdown_default(field_name, field)
            lines.append(
                f"| `{field_name}` | {_markdown_type(field)} | {default} | "
                f"{_markdown_cell(field.description or _destination_note(kind, field_name))} |"
            )
    lines.append("")
    return "\n".join(lines)


_DESTINATION_FIELD_NOTES = {
    "ae_title": "Called AE title of the PACS.",
    "host": "Host name or address of the peer.",
    "port": "TCP port of the peer.",
    "calling_ae_title": "Calling AE title; empty: the node's AE_TITLE.",
    "tls": "Use DICOM TLS (TLS 1.2 or newer; the peer's certificate is verified).",
    "tls_ca_certificates": "PEM CA bundle that signed the peer's certificate "
    "(default: the system's CAs).",
    "tls_certificate": "PEM client certificate, when the peer asks for one.",
    "tls_private_key": "PEM private key of the client certificate.",
    "timeout_s": "Connection and response timeout (s).",
    "username": "HTTP basic auth user.",
    "password": "HTTP basic auth password.",
    "bearer_token": "HTTP bearer token (instead of basic auth).",
    "ca_certificates": "PEM CA bundle for an https URL (default: the system's CAs).",
    "sending_application": "MSH-3 sending application.",
    "sending_facility": "MSH-4 sending facility.",
    "receiving_application": "MSH-5 receiving application.",
    "receiving_facility": "MSH-6 receiving facility.",
    "path": "Folder that receives a copy of every SR.",
}


_DESTINATION_URL_NOTES = {
    "stow": "DICOMweb base URL, e.g. https://pacs.example/dicom-web.",
    "orthanc": "Orthanc REST root, e.g. http://orthanc:8042.",
    "webhook": "URL the signed JSON is posted to.",
}


def _destination_note(kind: str, field_name: str) -> str:
    if field_name == "url":
        return _DESTINATION_URL_NOTES.get(kind, "")
    return _DESTINATION_FIELD_NOTES.get(field_name, "")


def _markdown_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _markdown_default(name: str, field: Any) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None or default == "":
        return "empty"
    if isinstance(default, list):
        return f"`{','.join(str(item) for item in default)}`" if default else "empty"
    if isinstance(default, bool):
        return "`true`" if default else "`false`"
    return f"`{default}`"


def _markdown_type(field: Any) -> str:
    annotation = str(field.annotation)
    for marker, label in (
        ("DestinationSettings", "JSON list"),
        ("Destination", "JSON list"),
        ("list", "list"),
        ("bool", "boolean"),
        ("Path", "path"),
        ("float", "number"),
        ("int", "integer"),
        ("Literal", "text"),
        ("str", "text"),
    ):
        if marker in annotation:
            kind = label
            break
    else:
        kind = annotation
    bounds = []
    for constraint in field.metadata:
        for attribute, symbol in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(constraint, attribute, None)
            if value is not None:
                bounds.append(f"{symbol} {value}")
    return f"{kind} ({', '.join(bounds)})" if bounds else kind
