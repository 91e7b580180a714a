"""A triage finding (an ROI and the model's answer for it) from flat values, for SR tests."""

from __future__ import annotations

from typing import Any

from model.serving.prediction import Prediction
from model.serving.roi import Roi
from worker.sr import TriageFinding

# The SR takes study and series from its evidence; the ROI's own UIDs only need to be valid.
PLACEHOLDER_STUDY_UID = "1.2.826.0.1.3680043.8.498.10"
PLACEHOLDER_SERIES_UID = "1.2.826.0.1.3680043.8.498.11"


def make_finding(
    *,
    polygon_yz_mm: Any,
    slices_x_mm: Any,
    slice_probabilities: Any,
    patient_probability: float,
    label: Any,
    priority: Any,
    threshold: float,
    vertebra: str | None = None,
    study_instance_uid: str = PLACEHOLDER_STUDY_UID,
    series_instance_uid: str = PLACEHOLDER_SERIES_UID,
) -> TriageFinding:
    roi = Roi(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        slices_x_mm=tuple(slices_x_mm),
        polygon_yz_mm=tuple(polygon_yz_mm),
        vertebra=vertebra,
    )
    prediction = Prediction(
        x_mm=roi.slices_x_mm,
        slice_probabilities=tuple(slice_probabilities),
        patient_probability=patient_probability,
        label=label,
        priority=priority,
        threshold=threshold,
    )
    return TriageFinding(roi=roi, prediction=prediction)
