"""Patient-level splits: no patient in two folds, nor in both validation and test."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.training.folds import (
    SplitError,
    assign_folds,
    carve_validation,
    make_cross_validation_splits,
)


def _labels(malignant: int, benign: int) -> dict[str, int]:
    labels = {f"M{i:03d}": 1 for i in range(malignant)}
    labels.update({f"B{i:03d}": 0 for i in range(benign)})
    return labels


@settings(max_examples=60, deadline=None)
@given(
    malignant=st.integers(0, 40),
    benign=st.integers(0, 40),
    folds=st.integers(2, 10),
    fraction=st.sampled_from([0.0, 0.1, 0.25]),
    seed=st.integers(0, 2**31),
)
def test_every_patient_in_exactly_one_test_fold_and_never_validated_on_it(
    malignant: int, benign: int, folds: int, fraction: float, seed: int
) -> None:
    labels = _labels(malignant, benign)
    if len(labels) < folds:
        with pytest.raises(SplitError):
            make_cross_validation_splits(labels, folds, validation_fraction=fraction, seed=seed)
        return
    splits = make_cross_validation_splits(labels, folds, validation_fraction=fraction, seed=seed)
    assert [s.fold for s in splits] == list(range(folds))
    test_counts = Counter(p for s in splits for p in s.test)
    assert set(test_counts) == set(labels)
    assert set(test_counts.values()) == {1}
    for split in splits:
        train, validation, test = set(split.train), set(split.validation), set(split.test)
        assert not train & test
        assert not validation & test
        assert not train & validation
        assert train | validation | test == set(labels)
        assert test  # no empty test fold
    # stratified: per label, test-fold counts differ by at most one
    for label in (0, 1):
        per_fold = [sum(labels[p] == label for p in s.test) for s in splits]
        assert max(per_fold) - min(per_fold) <= 1


def test_splits_depend_on_seed_not_on_manifest_order() -> None:
    labels = _labels(15, 12)
    shuffled = dict(reversed(list(labels.items())))
    first = make_cross_validation_splits(labels, 5, validation_fraction=0.2, seed=7)
    second = make_cross_validation_splits(shuffled, 5, validation_fraction=0.2, seed=7)
    other_seed = make_cross_validation_splits(labels, 5, validation_fraction=0.2, seed=8)
    assert first == second
    assert first != other_seed


def test_validation_holds_both_classes_when_it_can() -> None:
    labels = _labels(9, 9)
    train, validation = carve_validation(labels, list(labels), 0.1, seed=0)
    assert {labels[p] for p in validation} == {0, 1}
    assert len(validation) == 2
    assert set(train) | set(validation) == set(labels)


def test_single_patient_of_a_class_stays_in_training() -> None:
    labels = {"M1": 1, "B1": 0, "B2": 0, "B3": 0}
    train, validation = carve_validation(labels, list(labels), 0.5, seed=0)
    assert "M1" in train
    assert all(labels[p] == 0 for p in validation)


def test_ten_folds_of_433_patients_like_the_paper() -> None:
    labels = _labels(296, 137)
    assignment = assign_folds(labels, 10, seed=0)
    sizes = Counter(assignment.values())
    assert sorted(sizes) == list(range(10))
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(SplitError, match="at least 2"):
        assign_folds(_labels(5, 5), 1, seed=0)
    with pytest.raises(SplitError, match="fraction"):
        carve_validation(_labels(5, 5), list(_labels(5, 5)), 1.0, seed=0)
