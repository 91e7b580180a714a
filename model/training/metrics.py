"""Classification metrics as the paper reports them, plus what a site needs to set a threshold.

Labels are 1 for malignant and 0 for benign; a score at or above the threshold is called
malignant (METHOD.md: ``>= 0.5`` is malignant). Every ratio whose denominator is empty (for
example sensitivity in a fold without a malignant patient) is ``None``, never a silent 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

FloatArray = np.ndarray


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts at one threshold; positive = malignant."""

    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int

    @property
    def positives(self) -> int:
        return self.true_positive + self.false_negative

    @property
    def negatives(self) -> int:
        return self.true_negative + self.false_positive

    @property
    def total(self) -> int:
        return self.positives + self.negatives

    @property
    def sensitivity(self) -> float | None:
        return _ratio(self.true_positive, self.positives)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.true_negative, self.negatives)

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.true_positive + self.true_negative, self.total)

    @property
    def positive_predictive_value(self) -> float | None:
        return _ratio(self.true_positive, self.true_positive + self.false_positive)

    @property
    def negative_predictive_value(self) -> float | None:
        return _ratio(self.true_negative, self.true_negative + self.false_negative)


def _ratio(numerator: int, denominator: int) -> float | None:
    return None if denominator == 0 else numerator / denominator


def _as_arrays(
    labels: Sequence[int] | FloatArray, scores: Sequence[float] | FloatArray
) -> tuple[FloatArray, FloatArray]:
    label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if label_array.shape != score_array.shape:
        raise ValueError(f"{label_array.size} labels but {score_array.size} scores")
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError("labels must be 0 (benign) or 1 (malignant)")
    if not np.isfinite(score_array).all():
        raise ValueError("scores must be finite")
    return label_array, score_array


def confusion_matrix(
    labels: Sequence[int] | FloatArray,
    scores: Sequence[float] | FloatArray,
    threshold: float = 0.5,
) -> ConfusionMatrix:
    """Confusion matrix with ``score >= threshold`` called malignant."""
    label_array, score_array = _as_arrays(labels, scores)
    predicted = score_array >= threshold
    actual = label_array == 1
    return ConfusionMatrix(
        true_positive=int(np.sum(predicted & actual)),
        false_negative=int(np.sum(~predicted & actual)),
        true_negative=int(np.sum(~predicted & ~actual)),
        false_positive=int(np.sum(predicted & ~actual)),
    )


def auroc(labels: Sequence[int] | FloatArray, scores: Sequence[float] | FloatArray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); None with one class."""
    label_array, score_array = _as_arrays(labels, scores)
    positives = int(label_array.sum())
    negatives = label_array.size - positives
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(score_array)
    rank_sum = float(ranks[label_array == 1].sum())
    u_statistic = rank_sum - positives * (positives + 1) / 2.0
    return u_statistic / (positives * negatives)


@dataclass(frozen=True)
class RocCurve:
    """False- and true-positive rates at every distinct score used as a threshold."""

    false_positive_rate: FloatArray
    true_positive_rate: FloatArray
    thresholds: FloatArray


def roc_curve(
    labels: Sequence[int] | FloatArray, scores: Sequence[float] | FloatArray
) -> RocCurve | None:
    """ROC points from (0, 0) to (1, 1); thresholds in decreasing order (first is +inf)."""
    label_array, score_array = _as_arrays(labels, scores)
    positives = int(label_array.sum())
    negatives = label_array.size - positives
    if positives == 0 or negatives == 0:
        return None
    thresholds = np.unique(score_array)[::-1]
    tpr = [0.0]
    fpr = [0.0]
    for threshold in thresholds:
        called = score_array >= threshold
        tpr.append(float(np.sum(called & (label_array == 1))) / positives)
        fpr.append(float(np.sum(called & (label_array == 0))) / negatives)
    return RocCurve(
        false_positive_rate=np.asarray(fpr),
        true_positive_rate=np.asarray(tpr),
        thresholds=np.concatenate([[np.inf], thresholds]),
    )


@dataclass(frozen=True)
class ConfidenceInterval:
    estimate: float
    lower: float
    upper: float
    level: float
    resamples: int  # resamples that held both classes (the others are skipped)
    seed: int


def bootstrap_auroc(
    labels: Sequence[int] | FloatArray,
    scores: Sequence[float] | FloatArray,
    *,
    groups: Sequence[str] | None = None,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval | None:
    """AUROC with a percentile bootstrap interval.

    With ``groups`` (the patient of each slice) whole patients are resampled, so slices of one
    patient, which are not independent, move together. None when a class is absent.
    """
    label_array, score_array = _as_arrays(labels, scores)
    estimate = auroc(label_array, score_array)
    if estimate is None:
        return None
    if groups is None:
        members = [np.array([i]) for i in range(label_array.size)]
    else:
        group_array = np.asarray(groups)
        if group_array.shape != label_array.shape:
            raise ValueError("one group per score is needed")
        _, inverse = np.unique(group_array, return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(int(inverse.max()) + 1)]
    rng = np.random.default_rng(seed)
    estimates: list[float] = []
    for _ in range(resamples):
        chosen = rng.integers(0, len(members), size=len(members))
        index = np.concatenate([members[c] for c in chosen])
        value = auroc(label_array[index], score_array[index])
        if value is not None:
            estimates.append(value)
    if not estimates:
        return None
    tail = (1.0 - level) / 2.0 * 100.0
    lower, upper = np.percentile(estimates, [tail, 100.0 - tail])
    return ConfidenceInterval(
        estimate=estimate,
        lower=float(lower),
        upper=float(upper),
        level=level,
        resamples=len(estimates),
        seed=seed,
    )


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    sensitivity: float
    specificity: float | None


def threshold_for_sensitivity(
    labels: Sequence[int] | FloatArray,
    scores: Sequence[float] | FloatArray,
    target_sensitivity: float = 0.95,
) -> OperatingPoint | None:
    """The highest threshold whose sensitivity reaches the target, with its specificity.

    The threshold is one of the malignant scores, so ``score >= threshold`` reproduces the
    reported sensitivity exactly. None when there is no malignant case.
    """
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError("target sensitivity must be in (0, 1]")
    label_array, score_array = _as_arrays(labels, scores)
    positive_scores = np.sort(score_array[label_array == 1])[::-1]
    if positive_scores.size == 0:
        return None
    needed = int(np.ceil(target_sensitivity * positive_scores.size - 1e-9))
    threshold = float(positive_scores[max(needed, 1) - 1])
    matrix = confusion_matrix(label_array, score_array, threshold)
    sensitivity = matrix.sensitivity
    assert sensitivity is not None
    return OperatingPoint(
        threshold=threshold, sensitivity=sensitivity, specificity=matrix.specificity
    )


@dataclass(frozen=True)
class CalibrationBin:
    lower: float
    upper: float
    count: int
    mean_probability: float | None
    observed_malignant_fraction: float | None


@dataclass(frozen=True)
class CalibrationSummary:
    brier_score: float
    expected_calibration_error: float
    bins: tuple[CalibrationBin, ...]


def calibration_summary(
    labels: Sequence[int] | FloatArray,
    probabilities: Sequence[float] | FloatArray,
    *,
    bins: int = 10,
) -> CalibrationSummary:
    """Brier score, expected calibration error and a reliability table (equal-width bins)."""
    label_array, probability_array = _as_arrays(labels, probabilities)
    if label_array.size == 0:
        raise ValueError("calibration needs at least one prediction")
    if (probability_array < 0).any() or (probability_array > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, bins + 1)
    # the last bin is closed on the right so that probability 1.0 is counted
    bin_index = np.clip(np.searchsorted(edges, probability_array, side="right") - 1, 0, bins - 1)
    table: list[CalibrationBin] = []
    weighted_gap = 0.0
    for b in range(bins):
        inside = bin_index == b
        count = int(inside.sum())
        mean_probability = float(probability_array[inside].mean()) if count else None
        observed = float(label_array[inside].mean()) if count else None
        if mean_probability is not None and observed is not None:
            weighted_gap += count * abs(mean_probability - observed)
        table.append(
            CalibrationBin(
                lower=float(edges[b]),
                upper=float(edges[b + 1]),
                count=count,
                mean_probability=mean_probability,
                observed_malignant_fraction=observed,
            )
        )
    brier = float(np.mean((probability_array - label_array) ** 2))
    return CalibrationSummary(
        brier_score=brier,
        expected_calibration_error=weighted_gap / label_array.size,
        bins=tuple(table),
    )


def patient_probabilities(
    patient_of_slice: Sequence[str], slice_probabilities: Sequence[float] | FloatArray
) -> dict[str, float]:
    """Per-patient probability = maximum over the patient's slices (METHOD.md)."""
    result: dict[str, float] = {}
    for patient, probability in zip(patient_of_slice, slice_probabilities, strict=True):
        value = float(probability)
        result[patient] = max(result.get(patient, value), value)
    return result
