"""ROI annotations over REST: submit a reader's ROI, read annotations with their results.

The body is the ROI JSON of METHOD.md (plus an optional ``annotator``). Its rules are the
ROI's own (:mod:`model.serving.roi`); a bad body is answered 422 with one error per field.
A submission is idempotent on its ``Idempotency-Key`` header. When its study is already
complete, a worker is woken at once; otherwise the study's completion does it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import FastAPI, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import audit
from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction
from dicom_node.archive.schema import Delivery, RoiAnnotation, Study, TriageResult
from dicom_node.broker.wake import TRIAGE, send_marked
from dicom_node.web.access import ApiState, api_state
from dicom_node.web.auth import ANNOTATOR, READER, requires
from model.serving.roi import (
    MAX_POLYGON_POINTS,
    MAX_SLICES,
    MAX_VERTEBRA_LENGTH,
    MIN_POLYGON_POINTS,
    MIN_SLICES,
    Roi,
    RoiError,
    validate_polygon,
    validate_slices,
    validate_uid,
    validate_vertebra,
)

_T = TypeVar("_T")


class RoiIn(BaseModel):
    """An ROI annotation as submitted (REST body, CSV row, SR content)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    study_instance_uid: str = Field(description="Study Instance UID of the CT study")
    series_instance_uid: str = Field(description="Series Instance UID of the CT series")
    slices_x_mm: list[float] = Field(
        min_length=MIN_SLICES,
        max_length=MAX_SLICES,
        description="Lateral positions (patient x, LPS, mm) of the sagittal slices that show "
        "the abnormality (the method uses 3-5)",
    )
    polygon_yz_mm: list[tuple[float, float]] = Field(
        min_length=MIN_POLYGON_POINTS,
        max_length=MAX_POLYGON_POINTS,
        description="The ROI polygon in the sagittal plane: (y, z) points in mm (LPS)",
    )
    vertebra: str | None = Field(
        None, max_length=MAX_VERTEBRA_LENGTH, description="Vertebra label, e.g. L1 (optional)"
    )
    annotator: str | None = Field(
        None, max_length=128, description="Who drew the ROI (optional; never logged)"
    )

    # The rules are the ROI's own (model.serving.roi); pydantic only places each error
    # at its field, so a client learns every problem of its body at once.

    @field_validator("study_instance_uid", "series_instance_uid")
    @classmethod
    def _uid(cls, value: str, info: ValidationInfo) -> str:
        return _checked(validate_uid, value, str(info.field_name))

    @field_validator("slices_x_mm")
    @classmethod
    def _slices(cls, value: list[float]) -> list[float]:
        return list(_checked(validate_slices, value))

    @field_validator("polygon_yz_mm")
    @classmethod
    def _polygon(cls, value: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return list(_checked(validate_polygon, value))

    @field_validator("vertebra")
    @classmethod
    def _vertebra(cls, value: str | None) -> str | None:
        return _checked(validate_vertebra, value)

    def to_roi(self) -> Roi:
        return Roi(
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            slices_x_mm=tuple(self.slices_x_mm),
            polygon_yz_mm=tuple(self.polygon_yz_mm),
            vertebra=self.vertebra,
        )


def _checked(validate: Callable[..., _T], *args: Any) -> _T:
    """A domain validator's result; its :class:`RoiError` as the ``ValueError`` pydantic
    reports at the field (the message without the field name pydantic already gives)."""
    try:
        return validate(*args)
    except RoiError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from exc


def register_annotations(app: FastAPI) -> None:
    @app.post(
        "/annotations",
        status_code=status.HTTP_201_CREATED,
        dependencies=[requires(ANNOTATOR)],
        summary="Submit a radiologist's ROI on the most abnormal vertebra",
    )
    def post_annotation(
        body: RoiIn,
        request: Request,
        response: Response,
        idempotency_key: Annotated[str | None, Header(max_length=100)] = None,
    ) -> dict[str, Any]:
        api = api_state(request)
        key = f"rest:{idempotency_key}" if idempotency_key else None
        roi = body.to_roi()
        now = datetime.now(UTC)
        try:
            with transaction(api.sessions) as session:
                stored = lifecycle.create_annotation(
                    session, roi, source="rest", source_key=key, annotator=body.annotator, now=now
                )
                wake = stored.created and lifecycle.study_is_complete(
                    session, roi.study_instance_uid
                )
                if wake:
                    lifecycle.mark_annotations_enqueued(session, [stored.id], now)
        except SQLAlchemyError as exc:
            raise HTTPException(503, "database unavailable, retry later") from exc
        if wake:
            send_marked(api.sessions, api.send, TRIAGE, [stored.id])
        if not stored.created:
            response.status_code = status.HTTP_200_OK
        return annotation_view(api, stored.id)

    @app.get(
        "/annotations/{annotation_id}",
        dependencies=[requires(READER)],
        summary="An annotation, its state and result",
    )
    def get_annotation(annotation_id: int, request: Request) -> dict[str, Any]:
        view = annotation_view(api_state(request), annotation_id)
        audit.annotation_accessed(request, annotation_id)
        return view

    @app.get("/annotations", dependencies=[requires(READER)], summary="Annotations, newest first")
    def list_annotations(
        request: Request, state: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        api = api_state(request)
        with api.sessions() as session:
            query = select(RoiAnnotation.id).order_by(RoiAnnotation.id.desc()).limit(limit)
            if state:
                query = query.where(RoiAnnotation.state == state)
            ids = list(session.scalars(query))
        return [annotation_view(api, annotation_id) for annotation_id in ids]


def annotation_view(api: ApiState, annotation_id: int) -> dict[str, Any]:
    with api.sessions() as session:
        annotation = session.get(RoiAnnotation, annotation_id)
        if annotation is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"annotation {annotation_id} not found")
        study_state = session.scalar(
            select(Study.state).where(Study.study_instance_uid == annotation.study_instance_uid)
        )
        results = session.scalars(
            select(TriageResult).where(TriageResult.annotation_id == annotation_id)
        ).all()
        view: dict[str, Any] = {
            "id": annotation.id,
            **annotation.roi().to_json(),
            "source": annotation.source,
            "state": annotation.state.value,
            "attempts": annotation.attempts,
            "failure_reason": annotation.failure_reason,
            "study_state": study_state.value if study_state else "not received",
            "created_at": annotation.created_at.isoformat(),
            "updated_at": annotation.updated_at.isoformat(),
            "results": [],
        }
        for result in results:
            deliveries = session.scalars(
                select(Delivery).where(Delivery.result_id == result.id).order_by(Delivery.id)
            ).all()
            view["results"].append(
                {
                    "id": result.id,
                    "model_name": result.model_name,
                    "model_version": result.model_version,
                    "checkpoint_sha256": result.checkpoint_sha256,
                    "role": result.role,
                    "shadow_failure": result.shadow_failure,
                    "demonstration_model": result.demonstration_model,
                    "patient_probability": result.patient_probability,
                    "slice_x_mm": result.slice_x_mm,
                    "slice_probabilities": result.slice_probabilities,
                    "label": result.label,
                    "priority": result.priority,
                    "threshold": result.threshold,
                    "sr_sop_instance_uid": result.sr_sop_instance_uid,
                    "timings_s": result.timings,
                    "created_at": result.created_at.isoformat(),
                    "deliveries": [
                        {
                            "id": delivery.id,
                            "destination": delivery.destination,
                            "kind": delivery.kind,
                            "state": delivery.state.value,
                            "attempts": delivery.attempts,
                            "last_error": delivery.last_error,
                            "delivered_at": (
                                delivery.delivered_at.isoformat() if delivery.delivered_at else None
                            ),
                        }
                        for delivery in deliveries
                    ],
                }
            )
    return view
