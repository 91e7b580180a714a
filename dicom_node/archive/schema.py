"""The database schema: the node is the archive of record for what it received and decided.

Tables are created and changed only by the Alembic migrations in ``migrations/``; this module
is their metadata. The job of a triage is an ROI annotation: its ``state`` and lease columns
are the queue of record (the broker only wakes workers).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from model.serving.roi import Roi

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class UtcDateTime(TypeDecorator[datetime]):
    """A point in time, stored as naive UTC, returned timezone-aware (UTC) on every backend."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances arrived within the quiet period
    COMPLETE = "complete"  # quiet for the quiet period: ready for triage


class AnnotationState(enum.StrEnum):
    PENDING = "pending"  # waiting for its study to be complete, or for a worker
    PROCESSING = "processing"  # claimed by a worker (lease in claimed_until)
    DONE = "done"  # a result exists
    FAILED = "failed"  # permanent failure; failure_reason says why


class AutoJobState(enum.StrEnum):
    PENDING = "pending"  # waiting for a worker
    PROCESSING = "processing"  # claimed by a worker (lease in claimed_until)
    DONE = "done"  # a result exists (every proposed body classified)
    UNANALYSABLE = "unanalysable"  # nothing could be analysed; unanalysable_reason says why
    FAILED = "failed"  # permanent failure; failure_reason says why


class DeliveryState(enum.StrEnum):
    PENDING = "pending"  # due at next_attempt_at
    SENDING = "sending"  # claimed by a worker (lease in claimed_until)
    DELIVERED = "delivered"
    FAILED = "failed"  # attempts exhausted or permanent refusal; can be retried by hand


def _enum(enum_cls: type[enum.Enum], name: str) -> SqlEnum:
    return SqlEnum(
        enum_cls,
        name=name,
        native_enum=False,
        length=16,
        validate_strings=True,
        values_callable=lambda members: [member.value for member in members],
    )


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[StudyState] = mapped_column(_enum(StudyState, "study_state"))
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    completion_count: Mapped[int] = mapped_column(Integer, default=0)

    series: Mapped[list[Series]] = relationship(back_populates="study")

    __table_args__ = (Index("ix_study_state_last_received", "state", "last_received_at"),)


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))  # relative to the storage root
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())

    series: Mapped[Series] = relationship(back_populates="instances")


class RoiAnnotation(Base):
    """An ROI to judge and where it came from (a reader's by REST, SR or CSV): the unit of
    triage work, its state written only by :mod:`dicom_node.archive.lifecycle`."""

    __tablename__ = "roi_annotation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    slices_x_mm: Mapped[list[float]] = mapped_column(JSON)
    polygon_yz_mm: Mapped[list[list[float]]] = mapped_column(JSON)
    vertebra: Mapped[str | None] = mapped_column(String(16))
    annotator: Mapped[str | None] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(16))  # rest | sr | csv | auto
    # Identity of the source object (SR SOP Instance UID, client key): a re-sent SR is one ROI.
    source_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    state: Mapped[AnnotationState] = mapped_column(_enum(AnnotationState, "annotation_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    enqueued_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    # A body proposed by the localiser (source "auto"): its automatic job and confidence.
    auto_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("auto_job.id", ondelete="CASCADE"), index=True
    )
    confidence: Mapped[float | None] = mapped_column(Float)

    results: Mapped[list[TriageResult]] = relationship(back_populates="annotation")

    __table_args__ = (Index("ix_roi_annotation_state", "state", "claimed_until"),)

    def roi(self) -> Roi:
        """The annotation's ROI (validated when it was stored)."""
        return Roi(
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            slices_x_mm=tuple(self.slices_x_mm),
            polygon_yz_mm=tuple((float(y), float(z)) for y, z in self.polygon_yz_mm),
            vertebra=self.vertebra,
        )


class AutoJob(Base):
    """Automatic triage of one study (one job per study, ever): localise every vertebral body
    of its CT series, classify them all. Its state is written only by
    :mod:`dicom_node.archive.lifecycle`; the bodies become ``roi_annotation`` rows (source
    ``auto``) when the job records its result."""

    __tablename__ = "auto_job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # Written by the worker: the localiser (name and version) and the series it analysed.
    localiser: Mapped[str | None] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(UID)
    state: Mapped[AutoJobState] = mapped_column(_enum(AutoJobState, "auto_job_state"))
    unanalysable_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    enqueued_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_auto_job_state", "state", "claimed_until"),)


class TriageResult(Base):
    """The model's answer for one annotation and one model version (idempotence key).

    The result of an automatic job names the job, and its annotation is the most suspicious
    body (the one the flag is raised on); ``bodies`` then holds every body's answer."""

    __tablename__ = "triage_result"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    annotation_id: Mapped[int] = mapped_column(
        ForeignKey("roi_annotation.id", ondelete="CASCADE"), index=True
    )
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    patient_probability: Mapped[float] = mapped_column(Float)
    slice_x_mm: Mapped[list[float]] = mapped_column(JSON)
    slice_probabilities: Mapped[list[float]] = mapped_column(JSON)
    label: Mapped[str] = mapped_column(String(16))  # malignant | benign
    priority: Mapped[str] = mapped_column(String(16))  # HIGH | ROUTINE
    threshold: Mapped[float] = mapped_column(Float)
    demonstration_model: Mapped[bool] = mapped_column(default=False)
    sr_series_instance_uid: Mapped[str] = mapped_column(UID)
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    # The SR file, relative to the storage root; None while the report is being written (an
    # automatic job records its result and sends its flag first, then writes the report).
    sr_path: Mapped[str | None] = mapped_column(String(512))
    # PNG of what the model saw (the three-channel inputs per slice), relative to the root
    preview_path: Mapped[str | None] = mapped_column(String(512))
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    auto_job_id: Mapped[int | None] = mapped_column(
        ForeignKey("auto_job.id", ondelete="CASCADE"), index=True
    )
    # Automatic jobs: [{annotation_id, vertebra, probability, slice_x_mm, slice_probabilities,
    # confidence}] for every body, most suspicious first.
    bodies: Mapped[list[dict[str, object]] | None] = mapped_column(JSON)
    # The checkpoint file's sha256 (the model's identity beside its name and version).
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    # live: the configured model (flags, delivers); shadow: a candidate run beside it, recorded
    # for comparison only (never flagged, never delivered).
    role: Mapped[str] = mapped_column(String(16), default="live", server_default="live", index=True)
    # On a live result, in shadow mode: why the candidate could not run on the same job
    # ("<name> <version>: <reason>"); the live result stands regardless.
    shadow_failure: Mapped[str | None] = mapped_column(Text)
    # Out-of-domain guard: the input's distance from the model's training inputs, the
    # checkpoint's threshold, and the verdict (None: the checkpoint has no domain description).
    domain_score: Mapped[float | None] = mapped_column(Float)
    domain_threshold: Mapped[float | None] = mapped_column(Float)
    in_domain: Mapped[bool | None] = mapped_column()
    # The review series (worker.derived) delivered with the SR: its Series Instance UID and
    # its files (relative to the storage root), right to left; None when the site sends none.
    review_series_instance_uid: Mapped[str | None] = mapped_column(UID)
    review_paths: Mapped[list[str] | None] = mapped_column(JSON)
    # The key image (Secondary Capture: the review image with the box and the probability
    # burned in) delivered before the SR that references it; None when the site sends none.
    key_image_path: Mapped[str | None] = mapped_column(String(512))

    annotation: Mapped[RoiAnnotation] = relationship(back_populates="results")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="result")

    __table_args__ = (UniqueConstraint("annotation_id", "model_version", name="uq_result_key"),)


class Delivery(Base):
    """One result to one destination (PACS, HL7, Orthanc, webhook): the outbox."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(
        ForeignKey("triage_result.id", ondelete="CASCADE"), index=True
    )
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState, "delivery_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[datetime] = mapped_column(UtcDateTime())
    claimed_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    enqueued_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())

    result: Mapped[TriageResult] = relationship(back_populates="deliveries")

    __table_args__ = (
        UniqueConstraint("result_id", "destination", name="uq_delivery_key"),
        Index("ix_delivery_due", "state", "next_attempt_at"),
    )


class AuditEvent(Base):
    """One audit event after DICOM PS3.15 Annex A.5 (IHE ATNA): append-only.

    Written by :mod:`dicom_node.audit` only, never updated or deleted (on SQLite and
    PostgreSQL a trigger refuses both); ``message`` is the DICOM audit message XML exactly as
    sent to the site's audit repository. The audit trail is the one place PHI-bearing access
    records live: ``patient_id`` is here so the security officer can ask "who saw this
    patient's study", never in application logs."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_time: Mapped[datetime] = mapped_column(UtcDateTime(), index=True)
    # our name for the event: user-authentication, instances-transferred, ...
    event_type: Mapped[str] = mapped_column(String(32), index=True)
    event_id_code: Mapped[str] = mapped_column(String(16))  # DCM code, e.g. 110104
    event_action: Mapped[str] = mapped_column(String(1))  # C R U D E
    outcome: Mapped[int] = mapped_column(Integer)  # 0 4 8 12
    user_id: Mapped[str | None] = mapped_column(String(256), index=True)
    client_address: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    source_id: Mapped[str] = mapped_column(String(64))  # the audit source: node or worker
    message: Mapped[str] = mapped_column(Text)


class WebUser(Base):
    """A person who signs in to the HTTP service (worklist page, API), with a role set.

    Written by :mod:`dicom_node.web.auth.accounts` only. ``password_hash`` is an Argon2id
    hash (PHC string); ``roles`` a comma-separated subset of reader, annotator, admin."""

    __tablename__ = "web_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    roles: Mapped[str] = mapped_column(String(64))
    disabled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    password_changed_at: Mapped[datetime] = mapped_column(UtcDateTime())


class WebSession(Base):
    """A signed-in browser: the cookie's sha256 (the cookie itself is never stored), its
    CSRF token, and when it ends (idle or absolute expiry, logout, the user disabled)."""

    __tablename__ = "web_session"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    session_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("web_user.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    last_seen_at: Mapped[datetime] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())


class ApiToken(Base):
    """A client's bearer token (the PACS integration, a script): only its sha256 is kept.

    ``roles`` as for :class:`WebUser`; a revoked token (``revoked_at`` set) is refused at
    once; ``last_used_at`` is recorded on use (at most once a minute)."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    roles: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
