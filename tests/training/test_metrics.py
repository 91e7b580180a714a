"""Metric code against confusion matrices worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.training.metrics import (
    auroc,
    bootstrap_auroc,
    calibration_summary,
    confusion_matrix,
    patient_probabilities,
    roc_curve,
    threshold_for_sensitivity,
)


def test_confusion_matrix_matches_hand_count() -> None:
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    scores = [0.9, 0.5, 0.49, 0.1, 0.7, 0.3, 0.2, 0.6, 0.0, 0.5]
    # threshold 0.5, ">=" is malignant:
    # malignant: 0.9 TP, 0.5 TP (boundary), 0.49 FN, 0.1 FN  -> TP 2, FN 2
    # benign: 0.7 FP, 0.3 TN, 0.2 TN, 0.6 FP, 0.0 TN, 0.5 FP -> FP 3, TN 3
    matrix = confusion_matrix(labels, scores, 0.5)
    assert (matrix.true_positive, matrix.false_negative) == (2, 2)
    assert (matrix.false_positive, matrix.true_negative) == (3, 3)
    assert matrix.sensitivity == pytest.approx(0.5)
    assert matrix.specificity == pytest.approx(0.5)
    assert matrix.accuracy == pytest.approx(0.5)
    assert matrix.positive_predictive_value == pytest.approx(2 / 5)
    assert matrix.negative_predictive_value == pytest.approx(3 / 5)


def test_fold_without_positives_has_no_sensitivity() -> None:
    matrix = confusion_matrix([0, 0, 0], [0.1, 0.7, 0.2])
    assert matrix.positives == 0
    assert matrix.sensitivity is None
    assert matrix.specificity == pytest.approx(2 / 3)
    assert matrix.accuracy == pytest.approx(2 / 3)
    assert auroc([0, 0, 0], [0.1, 0.7, 0.2]) is None
    assert roc_curve([0, 0, 0], [0.1, 0.7, 0.2]) is None
    assert threshold_for_sensitivity([0, 0, 0], [0.1, 0.7, 0.2]) is None
    assert bootstrap_auroc([0, 0, 0], [0.1, 0.7, 0.2]) is None


def test_fold_without_negatives_has_no_specificity() -> None:
    matrix = confusion_matrix([1, 1], [0.9, 0.2])
    assert matrix.specificity is None
    assert matrix.sensitivity == pytest.approx(0.5)
    assert matrix.negative_predictive_value == pytest.approx(0.0)


def test_all_predictions_one_class() -> None:
    labels = [1, 0, 1, 0, 0]
    everything_malignant = confusion_matrix(labels, [0.99] * 5)
    assert everything_malignant.sensitivity == 1.0
    assert everything_malignant.specificity == 0.0
    assert everything_malignant.accuracy == pytest.approx(2 / 5)
    assert everything_malignant.negative_predictive_value is None  # nothing called benign
    everything_benign = confusion_matrix(labels, [0.01] * 5)
    assert everything_benign.sensitivity == 0.0
    assert everything_benign.specificity == 1.0
    assert everything_benign.positive_predictive_value is None  # nothing called malignant
    # identical scores carry no ranking information
    assert auroc(labels, [0.3] * 5) == pytest.approx(0.5)


def test_auroc_counts_pairs_and_ties() -> None:
    labels = [1, 1, 0, 0]
    # pairs (pos, neg): (0.8,0.3) win, (0.8,0.5) win, (0.5,0.3) win, (0.5,0.5) tie -> 3.5/4
    assert auroc(labels, [0.8, 0.5, 0.3, 0.5]) == pytest.approx(3.5 / 4)
    assert auroc(labels, [0.9, 0.8, 0.1, 0.2]) == pytest.approx(1.0)
    assert auroc(labels, [0.1, 0.2, 0.9, 0.8]) == pytest.approx(0.0)


def test_roc_curve_area_equals_auroc() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=200)
    scores = np.round(rng.random(200) * 0.5 + labels * 0.3, 2)  # rounding makes ties
    curve = roc_curve(labels, scores)
    assert curve is not None
    assert (curve.false_positive_rate[0], curve.true_positive_rate[0]) == (0.0, 0.0)
    assert (curve.false_positive_rate[-1], curve.true_positive_rate[-1]) == (1.0, 1.0)
    trapezoid = float(np.trapezoid(curve.true_positive_rate, curve.false_positive_rate))
    assert trapezoid == pytest.approx(auroc(labels, scores))


def test_threshold_for_sensitivity_hand_example() -> None:
    # 10 malignant scores 0.1..1.0, 4 benign scores
    malignant = [round(0.1 * k, 1) for k in range(1, 11)]
    benign = [0.05, 0.15, 0.35, 0.95]
    labels = [1] * 10 + [0] * 4
    scores = malignant + benign
    point = threshold_for_sensitivity(labels, scores, 0.95)
    # 95 % of 10 -> 10 malignant must be caught -> threshold = lowest malignant score 0.1
    assert point is not None
    assert point.threshold == pytest.approx(0.1)
    assert point.sensitivity == 1.0
    assert point.specificity == pytest.approx(1 / 4)  # only 0.05 stays below
    point_80 = threshold_for_sensitivity(labels, scores, 0.8)
    assert point_80 is not None
    assert point_80.threshold == pytest.approx(0.3)  # 8 of 10 at >= 0.3
    assert point_80.sensitivity == pytest.approx(0.8)
    assert point_80.specificity == pytest.approx(2 / 4)  # 0.05, 0.15 below 0.3


def test_bootstrap_interval_brackets_estimate_and_is_reproducible() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([1] * 30 + [0] * 30)
    scores = rng.random(60) + 0.4 * labels
    first = bootstrap_auroc(labels, scores, resamples=300, seed=5)
    again = bootstrap_auroc(labels, scores, resamples=300, seed=5)
    assert first is not None and first == again
    assert first.lower <= first.estimate <= first.upper
    assert first.lower > 0.5 and first.upper < 1.0
    assert first.level == 0.95 and first.seed == 5


def test_bootstrap_by_patient_is_wider_than_by_slice_for_clustered_slices() -> None:
    # five identical slices per patient: resampling slices pretends there are 5x more cases
    rng = np.random.default_rng(1)
    patient_scores = rng.random(20) + 0.3 * (np.arange(20) % 2)
    labels = np.repeat(np.arange(20) % 2, 5)
    scores = np.repeat(patient_scores, 5)
    groups = np.repeat([f"p{i}" for i in range(20)], 5)
    by_slice = bootstrap_auroc(labels, scores, resamples=400, seed=0)
    by_patient = bootstrap_auroc(labels, scores, groups=list(groups), resamples=400, seed=0)
    assert by_slice is not None and by_patient is not None
    assert by_patient.upper - by_patient.lower > 1.5 * (by_slice.upper - by_slice.lower)


def test_calibration_hand_example() -> None:
    labels = [0, 0, 1, 1]
    probabilities = [0.0, 0.2, 0.8, 1.0]
    summary = calibration_summary(labels, probabilities, bins=2)
    # Brier: (0 + 0.04 + 0.04 + 0) / 4
    assert summary.brier_score == pytest.approx(0.02)
    low, high = summary.bins
    assert (low.count, high.count) == (2, 2)
    assert low.mean_probability == pytest.approx(0.1)
    assert low.observed_malignant_fraction == 0.0
    assert high.mean_probability == pytest.approx(0.9)
    assert high.observed_malignant_fraction == 1.0
    assert summary.expected_calibration_error == pytest.approx(0.1)
    empty_bins = calibration_summary([1], [0.55], bins=10).bins
    assert sum(b.count for b in empty_bins) == 1
    assert empty_bins[0].mean_probability is None


def test_patient_probability_is_the_maximum_over_slices() -> None:
    result = patient_probabilities(["a", "a", "b", "a"], [0.2, 0.7, 0.1, 0.4])
    assert result == {"a": 0.7, "b": 0.1}


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="labels"):
        confusion_matrix([2, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="scores"):
        auroc([1, 0], [0.1])
    with pytest.raises(ValueError, match="finite"):
        auroc([1, 0], [math.nan, 0.2])
