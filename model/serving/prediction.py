"""The classifier's answer for one ROI (pure values: no network, no torch).

Per-slice probabilities, the ROI's probability (their maximum, as Li et al. take the patient's)
and the call at the site's threshold: malignant / HIGH when the probability is at or above it
— unless the out-of-domain guard (:mod:`model.serving.domain`) puts the input outside the
model's training domain: the probability and label are still reported, the priority is then
ROUTINE whatever the probability, and ``in_domain`` says why.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from model.serving.domain import DomainVerdict


@dataclass(frozen=True)
class Prediction:
    """The classifier's answer for one ROI: a probability per sagittal slice position, the
    ROI's probability (their maximum, as the paper takes it), and the call at the threshold.

    Validated at construction, so every consumer (the SR, the result row, the worklist) can
    rely on it: one probability per slice, all in [0, 1], the maximum as the ROI's, and a
    label and priority that agree with the threshold.

    ``domain_score`` / ``domain_threshold`` / ``in_domain``: the out-of-domain guard's ROI score
    (the maximum over the slices), its threshold and the verdict; all None for a checkpoint
    without a domain description. Outside the domain the priority is ROUTINE.
    ``domain_basis``: "roi" when the verdict is this ROI's score against the threshold,
    "series" when the ROI's series as a whole lies outside (:func:`series_outside_domain`),
    whatever this ROI's own score.
    """

    x_mm: tuple[float, ...]
    slice_probabilities: tuple[float, ...]
    patient_probability: float
    label: Literal["malignant", "benign"]
    priority: Literal["HIGH", "ROUTINE"]
    threshold: float
    domain_score: float | None = None
    domain_threshold: float | None = None
    in_domain: bool | None = None
    domain_basis: Literal["roi", "series"] = "roi"

    @property
    def outside_domain(self) -> bool:
        """The input lies outside the model's training domain (never flagged)."""
        return self.in_domain is False

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
        domain = (self.domain_score, self.domain_threshold, self.in_domain)
        if any(value is None for value in domain) and any(value is not None for value in domain):
            raise ValueError("domain score, threshold and verdict are given together or not at all")
        if self.domain_basis == "series":
            if self.in_domain is not False:
                raise ValueError("a series-level domain verdict can only be 'outside'")
        elif (
            self.domain_score is not None
            and self.domain_threshold is not None
            and self.in_domain != (self.domain_score <= self.domain_threshold)
        ):
            raise ValueError("the domain verdict contradicts its score and threshold")
        flagged = malignant and not self.outside_domain
        if self.priority != ("HIGH" if flagged else "ROUTINE"):
            raise ValueError(
                f"priority {self.priority!r} contradicts probability, threshold and domain"
            )


def prediction_from_probabilities(
    x_mm: Sequence[float],
    probabilities: Sequence[float],
    threshold: float,
    *,
    domain: DomainVerdict | None = None,
) -> Prediction:
    """Per-patient probability = max over slices; malignant / HIGH when ≥ threshold and the
    input is not outside the training domain (``domain``: the guard's verdict, if any)."""
    patient = float(max(probabilities))
    malignant = patient >= threshold
    flagged = malignant and (domain is None or domain.in_domain)
    return Prediction(
        x_mm=tuple(float(x) for x in x_mm),
        slice_probabilities=tuple(float(p) for p in probabilities),
        patient_probability=patient,
        label="malignant" if malignant else "benign",
        priority="HIGH" if flagged else "ROUTINE",
        threshold=float(threshold),
        domain_score=None if domain is None else float(domain.score),
        domain_threshold=None if domain is None else float(domain.threshold),
        in_domain=None if domain is None else bool(domain.in_domain),
    )


def suspicion_order(prediction: Prediction) -> tuple[bool, bool, float]:
    """Sort key, most suspicious first: a flagged answer, then answers inside the model's
    training domain by probability, then those outside it (never flagged, shown as such).
    The automatic job's result names the first body in this order and its SR lists the bodies
    in it, so a study is reported "outside the training domain" only when every body is."""
    return (
        prediction.priority != "HIGH",
        prediction.in_domain is False,
        -prediction.patient_probability,
    )


def series_outside_domain(predictions: Sequence[Prediction]) -> bool:
    """Whether a series lies outside the model's training domain as a whole: the median of
    its bodies' domain scores is above the threshold.

    A domain shift (another scanner, reconstruction kernel, dose or anatomy than the training
    data) belongs to the acquisition, so it touches every body of the series; a body's score
    alone has a tail (on the demonstration model about one in twenty of its own held-out
    phantoms' ROIs scores above the threshold, measured), and one body of a shifted series
    can land below it by chance, as on the real CT with some trainings. When most bodies lie
    outside, none of them is trusted (:func:`outside_domain`). False without a guard."""
    scores = [p.domain_score for p in predictions if p.domain_score is not None]
    thresholds = {p.domain_threshold for p in predictions if p.domain_threshold is not None}
    if not scores or len(thresholds) != 1:
        return False
    return statistics.median(scores) > thresholds.pop()


def outside_domain(prediction: Prediction) -> Prediction:
    """The same answer for a body of a series outside the training domain: not flagged,
    reported as outside (its own score kept as measured)."""
    if prediction.in_domain is None:
        raise ValueError("no domain verdict to change: the model has no guard")
    if prediction.in_domain is False:
        return prediction  # outside on its own score already
    return replace(prediction, in_domain=False, priority="ROUTINE", domain_basis="series")
