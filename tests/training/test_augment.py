"""Random affine augmentation of the network inputs."""

from __future__ import annotations

import math

import pytest
import torch

from model.training.augment import (
    AugmentParams,
    augment_batch,
    random_affine_matrices,
    zscore_per_sample,
)

IDENTITY = AugmentParams(
    max_translation_fraction=0.0, min_scale=1.0, max_scale=1.0, max_rotation_degrees=0.0
)


def _marker_batch() -> torch.Tensor:
    batch = torch.zeros(1, 3, 64, 64)
    batch[:, :, 20:24, 40:44] = 10.0  # a bright square off-centre
    return zscore_per_sample(batch)


def _centroid(image: torch.Tensor) -> tuple[float, float]:
    weights = (image - image.min()).clamp_min(0)
    rows = torch.arange(image.shape[0], dtype=torch.float32)
    cols = torch.arange(image.shape[1], dtype=torch.float32)
    total = weights.sum()
    return (
        float((weights.sum(1) * rows).sum() / total),
        float((weights.sum(0) * cols).sum() / total),
    )


def test_identity_parameters_leave_the_input_unchanged() -> None:
    batch = _marker_batch()
    out = augment_batch(batch, IDENTITY, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, batch, atol=1e-4)


def test_output_is_z_scored_per_sample_and_keeps_shape() -> None:
    batch = torch.randn(5, 3, 64, 64) * 40 + 100
    out = augment_batch(batch, AugmentParams(), generator=torch.Generator().manual_seed(1))
    assert out.shape == batch.shape and out.dtype == torch.float32
    flat = out.reshape(5, -1)
    assert torch.allclose(flat.mean(1), torch.zeros(5), atol=1e-4)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(5), atol=1e-3)


def test_translation_moves_the_marker_within_the_allowed_range() -> None:
    params = AugmentParams(
        max_translation_fraction=0.1, min_scale=1.0, max_scale=1.0, max_rotation_degrees=0.0
    )
    batch = _marker_batch().repeat(64, 1, 1, 1)
    out = augment_batch(batch, params, generator=torch.Generator().manual_seed(2))
    start = _centroid(batch[0, 1])
    shifts = [
        (abs(_centroid(out[i, 1])[0] - start[0]), abs(_centroid(out[i, 1])[1] - start[1]))
        for i in range(64)
    ]
    limit = 0.1 * 64 + 0.5
    assert all(dr <= limit and dc <= limit for dr, dc in shifts)
    assert max(max(dr, dc) for dr, dc in shifts) > 2.0  # it does move


def test_rotation_about_the_centre_keeps_the_marker_radius() -> None:
    params = AugmentParams(
        max_translation_fraction=0.0, min_scale=1.0, max_scale=1.0, max_rotation_degrees=30.0
    )
    batch = _marker_batch().repeat(32, 1, 1, 1)
    out = augment_batch(batch, params, generator=torch.Generator().manual_seed(3))
    centre = 31.5
    start = _centroid(batch[0, 1])
    radius = math.hypot(start[0] - centre, start[1] - centre)
    angles = []
    for i in range(32):
        row, col = _centroid(out[i, 1])
        assert math.hypot(row - centre, col - centre) == pytest.approx(radius, abs=1.0)
        angles.append(math.atan2(row - centre, col - centre))
    spread = math.degrees(max(angles) - min(angles))
    assert 20.0 < spread <= 61.0


def test_matrices_are_reproducible_by_seed() -> None:
    first = random_affine_matrices(8, AugmentParams(), generator=torch.Generator().manual_seed(9))
    again = random_affine_matrices(8, AugmentParams(), generator=torch.Generator().manual_seed(9))
    other = random_affine_matrices(8, AugmentParams(), generator=torch.Generator().manual_seed(10))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.shape == (8, 2, 3)


def test_invalid_ranges_are_refused() -> None:
    with pytest.raises(ValueError):
        AugmentParams(min_scale=1.2, max_scale=1.1)
    with pytest.raises(ValueError):
        AugmentParams(max_translation_fraction=0.6)
    assert AugmentParams.from_json(AugmentParams().to_json()) == AugmentParams()
