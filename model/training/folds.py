"""Patient-level, label-stratified splits: cross-validation folds and validation carve-outs.

Splits are made over patients, never slices, so no patient's slices are on both sides of a
split. They depend only on the set of (patient, label) pairs and the seed, not on the order of
the manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


class SplitError(ValueError):
    """The cohort cannot be split as asked (too few patients for the folds, ...)."""


@dataclass(frozen=True)
class FoldSplit:
    """One cross-validation fold: whom to train on, validate on (early stopping), test on."""

    fold: int
    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]


def _by_label(labels: Mapping[str, int]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for patient in sorted(labels):
        groups.setdefault(int(labels[patient]), []).append(patient)
    return groups


def assign_folds(labels: Mapping[str, int], folds: int, seed: int) -> dict[str, int]:
    """Map each patient to one test fold (0-based), stratified by label.

    Within each label the patients are shuffled (seeded) and dealt round robin; the dealing
    continues across labels so fold sizes differ by at most one.
    """
    if folds < 2:
        raise SplitError(f"cross-validation needs at least 2 folds, not {folds}")
    if len(labels) < folds:
        raise SplitError(f"{len(labels)} patients cannot fill {folds} test folds")
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    position = 0
    for label in sorted(_by_label(labels)):
        patients = _by_label(labels)[label]
        order = rng.permutation(len(patients))
        for index in order:
            assignment[patients[int(index)]] = position % folds
            position += 1
    return assignment


def carve_validation(
    labels: Mapping[str, int], patients: Sequence[str], fraction: float, seed: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split ``patients`` into (train, validation), label-stratified.

    Each label present with at least two patients gives ``round(fraction * n)`` patients (at
    least one) to validation, so validation loss sees both classes whenever it can. A label
    with a single patient keeps it for training. ``fraction`` 0 gives no validation set.
    """
    if not 0.0 <= fraction < 1.0:
        raise SplitError(f"validation fraction must be in [0, 1), not {fraction}")
    subset = {patient: labels[patient] for patient in patients}
    if fraction == 0.0:
        return tuple(sorted(subset)), ()
    rng = np.random.default_rng(seed)
    validation: list[str] = []
    for label in sorted(_by_label(subset)):
        group = _by_label(subset)[label]
        if len(group) < 2:
            continue
        count = min(max(1, round(fraction * len(group))), len(group) - 1)
        chosen = rng.choice(len(group), size=count, replace=False)
        validation.extend(group[int(i)] for i in chosen)
    train = tuple(sorted(set(subset) - set(validation)))
    return train, tuple(sorted(validation))


def make_cross_validation_splits(
    labels: Mapping[str, int],
    folds: int,
    *,
    validation_fraction: float,
    seed: int,
) -> list[FoldSplit]:
    """The k folds: test = one fold; validation carved from the other k-1 (seed + fold)."""
    assignment = assign_folds(labels, folds, seed)
    splits: list[FoldSplit] = []
    for fold in range(folds):
        test = tuple(sorted(p for p, f in assignment.items() if f == fold))
        rest = [p for p, f in assignment.items() if f != fold]
        train, validation = carve_validation(labels, rest, validation_fraction, seed + 1 + fold)
        splits.append(FoldSplit(fold=fold, train=train, validation=validation, test=test))
    return splits
