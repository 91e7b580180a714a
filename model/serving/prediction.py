"""The classifier's answer for one ROI (pure values: no network, no torch).

Per-slice probabilities, the ROI's probability (their maximum, as Li et al. take the patient's)
and the call at the site's threshold: malignant / HIGH when the probability is at or above it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Prediction:
    """The classifier's answer for one ROI: a probability per sagittal slice position, the
    ROI's probability (their maximum, as the paper takes it), and the call at the threshold.

    Validated at construction, so every consumer (the SR, the result row, the worklist) can
    rely on it: one probability per slice, all in [0, 1], the maximum as the ROI's, and a
    label and priority that agree with the threshold.
    """

    x_mm: tuple[float, ...]
    slice_probabilities: tuple[float, ...]
    patient_probability: float
    label: Literal["malignant", "benign"]
    priority: Literal["HIGH", "ROUTINE"]
    threshold: float

    def __post_init__(self) -> None:
        if not self.x_mm or len(self.x_mm) != len(self.slice_probabilities):
            raise ValueError("one probability per slice position is required")
        probabilities = (*self.slice_probabilities, self.patient_probability, self.threshold)
        if not all(0.0 <= p <= 1.0 for p in probabilities):
            raise ValueError("probabilities and threshold must lie in [0, 1]")
        if abs(self.patient_probability - max(self.slice_probabilities)) > 1e-6:
            raise ValueError(
                "the patient probability must be the maximum of the slice probabilities"
            )
        malignant = self.patient_probability >= self.threshold
        if self.label != ("malignant" if malignant else "benign"):
            raise ValueError(f"label {self.label!r} contradicts probability and threshold")
        if self.priority != ("HIGH" if malignant else "ROUTINE"):
            raise ValueError(f"priority {self.priority!r} contradicts probability and threshold")


def prediction_from_probabilities(
    x_mm: Sequence[float], probabilities: Sequence[float], threshold: float
) -> Prediction:
    """Per-patient probability = max over slices; malignant / HIGH when ≥ threshold."""
    patient = float(max(probabilities))
    malignant = patient >= threshold
    return Prediction(
        x_mm=tuple(float(x) for x in x_mm),
        slice_probabilities=tuple(float(p) for p in probabilities),
        patient_probability=patient,
        label="malignant" if malignant else "benign",
        priority="HIGH" if malignant else "ROUTINE",
        threshold=float(threshold),
    )
