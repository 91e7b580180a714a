"""Rows for worklist tests, written through the real schema (as the node and workers do)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.archive.schema import (
    AnnotationState,
    Delivery,
    DeliveryState,
    RoiAnnotation,
    Study,
    StudyState,
    TriageResult,
)

BASE_TIME = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
_serial = count(1)


def uid(prefix: str = "1.2.826.0.1.3680043.8.498.77") -> str:
    return f"{prefix}.{next(_serial)}"


@dataclass
class Seeder:
    """Adds studies, ROIs, results and deliveries; times are minutes after BASE_TIME."""

    session: Session
    study_uids: list[str] = field(default_factory=list)

    def study(
        self,
        *,
        name: str = "DOE^JANE",
        patient_id: str = "P0001",
        accession: str | None = "A0001",
        study_date: str | None = "20260302",
        state: StudyState = StudyState.COMPLETE,
        minute: float = 0.0,
        study_uid: str | None = None,
    ) -> str:
        study_uid = study_uid or uid()
        at = BASE_TIME + timedelta(minutes=minute)
        self.session.add(
            Study(
                study_instance_uid=study_uid,
                patient_id=patient_id,
                patient_name=name,
                accession_number=accession,
                study_date=study_date,
                study_description="CT SPINE",
                state=state,
                instance_count=120,
                first_received_at=at,
                last_received_at=at + timedelta(seconds=20),
                completed_at=at + timedelta(seconds=50) if state is StudyState.COMPLETE else None,
                completion_count=1 if state is StudyState.COMPLETE else 0,
            )
        )
        self.session.flush()
        self.study_uids.append(study_uid)
        return study_uid

    def annotation(
        self,
        study_uid: str,
        *,
        state: AnnotationState = AnnotationState.PENDING,
        minute: float = 1.0,
        failure_reason: str | None = None,
        slices_x_mm: tuple[float, ...] = (-3.0, 0.0, 3.0),
        vertebra: str | None = "L1",
    ) -> int:
        at = BASE_TIME + timedelta(minutes=minute)
        annotation = RoiAnnotation(
            study_instance_uid=study_uid,
            series_instance_uid=uid("1.2.826.0.1.3680043.8.498.78"),
            slices_x_mm=list(slices_x_mm),
            polygon_yz_mm=[[-10.0, -20.0], [10.0, -20.0], [10.0, 0.0], [-10.0, 0.0]],
            vertebra=vertebra,
            annotator="reader1",
            source="rest",
            state=state,
            attempts=1 if state is not AnnotationState.PENDING else 0,
            failure_reason=failure_reason,
            created_at=at,
            updated_at=at + timedelta(seconds=30),
        )
        self.session.add(annotation)
        self.session.flush()
        return annotation.id

    def result(
        self,
        annotation_id: int,
        probabilities: tuple[float, ...],
        *,
        threshold: float = 0.5,
        model_version: str = "1.0.0",
        demonstration: bool = False,
        preview_path: str | None = None,
        inference_s: float = 0.2,
        minute: float = 2.0,
        slices_x_mm: tuple[float, ...] | None = None,
    ) -> int:
        patient = max(probabilities)
        xs = slices_x_mm or tuple(-3.0 + 3.0 * i for i in range(len(probabilities)))
        result = TriageResult(
            annotation_id=annotation_id,
            model_name="li2021-resnet50",
            model_version=model_version,
            patient_probability=patient,
            slice_x_mm=list(xs),
            slice_probabilities=list(probabilities),
            label="malignant" if patient >= threshold else "benign",
            priority="HIGH" if patient >= threshold else "ROUTINE",
            threshold=threshold,
            demonstration_model=demonstration,
            sr_series_instance_uid=uid("1.2.826.0.1.3680043.8.498.79"),
            sr_sop_instance_uid=uid("1.2.826.0.1.3680043.8.498.80"),
            sr_path="sr.dcm",
            preview_path=preview_path,
            timings={"load_s": 0.1, "inference_s": inference_s},
            created_at=BASE_TIME + timedelta(minutes=minute),
        )
        self.session.add(result)
        self.session.flush()
        return result.id

    def delivery(
        self,
        result_id: int,
        destination: str,
        state: DeliveryState,
        *,
        kind: str = "cstore",
        last_error: str | None = None,
    ) -> int:
        delivery = Delivery(
            result_id=result_id,
            destination=destination,
            kind=kind,
            state=state,
            attempts=1,
            max_attempts=20,
            next_attempt_at=BASE_TIME,
            last_error=last_error,
            delivered_at=BASE_TIME if state is DeliveryState.DELIVERED else None,
            created_at=BASE_TIME,
        )
        self.session.add(delivery)
        self.session.flush()
        return delivery.id

    def done(self, study_uid: str, probabilities: tuple[float, ...], **options: Any) -> int:
        """An annotation of ``study_uid`` that is done, with its result; returns the result id."""
        annotation_id = self.annotation(study_uid, state=AnnotationState.DONE)
        return self.result(annotation_id, probabilities, **options)
