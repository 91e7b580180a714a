"""On-the-fly augmentation by random affine transforms (translation, scaling, rotation).

The paper enlarged its training set 20-fold with random affine transforms. Here the transform
is drawn fresh for every sample of every epoch and applied to the precomputed network input
tensors (batch-wise, on the training device) with bilinear resampling; pixels pulled in from
outside the box repeat the border. The augmented tensor is z-scored again, so the network sees
the same input distribution as at inference (METHOD.md: the z-score is the last step).

The paper does not give the ranges; the defaults (±10 % of the box side, scale 0.9-1.1,
±15°) keep the vertebra inside the box and are flags of ``spine-triage train``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random affine; all zero/one disables the corresponding component."""

    max_translation_fraction: float = 0.10  # of the box side, along each axis
    min_scale: float = 0.90
    max_scale: float = 1.10
    max_rotation_degrees: float = 15.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_translation_fraction < 0.5:
            raise ValueError("max_translation_fraction must be in [0, 0.5)")
        if not 0.0 < self.min_scale <= self.max_scale:
            raise ValueError("need 0 < min_scale <= max_scale")
        if not 0.0 <= self.max_rotation_degrees <= 180.0:
            raise ValueError("max_rotation_degrees must be in [0, 180]")

    @property
    def is_identity(self) -> bool:
        return (
            self.max_translation_fraction == 0.0
            and self.min_scale == self.max_scale == 1.0
            and self.max_rotation_degrees == 0.0
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AugmentParams:
        return cls(**data)


def random_affine_matrices(
    count: int,
    params: AugmentParams,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``count`` sampling matrices (count, 2, 3) for :func:`torch.nn.functional.affine_grid`.

    Each maps an output pixel (normalised coordinates, -1..1 across the box) to where it is
    sampled in the input: rotate by θ, zoom by s (s > 1 enlarges the anatomy), shift by t.
    """
    uniform = torch.rand(count, 4, generator=generator, dtype=torch.float64)
    angle = (uniform[:, 0] * 2.0 - 1.0) * math.radians(params.max_rotation_degrees)
    scale = params.min_scale + uniform[:, 1] * (params.max_scale - params.min_scale)
    shift = (uniform[:, 2:] * 2.0 - 1.0) * (2.0 * params.max_translation_fraction)
    cos = torch.cos(angle) / scale
    sin = torch.sin(angle) / scale
    matrices = torch.stack(
        [
            torch.stack([cos, -sin, shift[:, 0]], dim=1),
            torch.stack([sin, cos, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    return matrices.to(device=device, dtype=torch.float32)


def zscore_per_sample(batch: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """One mean and one SD per sample over all its channels and pixels (METHOD.md)."""
    flat = batch.reshape(batch.shape[0], -1)
    mean = flat.mean(dim=1).reshape(-1, 1, 1, 1)
    std = flat.std(dim=1, unbiased=False).reshape(-1, 1, 1, 1)
    return (batch - mean) / std.clamp_min(eps)


def augment_batch(
    batch: torch.Tensor, params: AugmentParams, *, generator: torch.Generator
) -> torch.Tensor:
    """Apply a fresh random affine to each (3, H, W) tensor of ``batch`` and re-z-score."""
    if batch.ndim != 4:
        raise ValueError(f"expected a (N, C, H, W) batch, got shape {tuple(batch.shape)}")
    if params.is_identity:
        return batch.float()
    matrices = random_affine_matrices(
        batch.shape[0], params, generator=generator, device=batch.device
    )
    grid = F.affine_grid(matrices, list(batch.shape), align_corners=False)
    warped = F.grid_sample(
        batch.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return zscore_per_sample(warped)
