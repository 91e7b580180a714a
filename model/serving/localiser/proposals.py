"""ROI proposals: the paper's ROI (``METHOD.md``) for each localised body."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.serving.localiser.results import Localisation, VertebralBody
from model.serving.roi import MAX_SLICES, MIN_SLICES, Roi

# The slices are spread over this central share of the body's lateral extent.
INNER_FRACTION = 0.6


@dataclass(frozen=True)
class Proposal:
    """An ROI on one localised body and the localiser's confidence in that body (0…1)."""

    roi: Roi
    confidence: float


def slice_positions(body: VertebralBody, slices: int) -> tuple[float, ...]:
    """``slices`` lateral positions (mm) spread evenly over the body's inner part."""
    low, high = body.x_range_mm
    centre, half = (low + high) / 2.0, (high - low) * INNER_FRACTION / 2.0
    half = max(half, 0.5 * (slices - 1))  # keep the positions distinct on a narrow body
    if slices == 1:
        return (round(centre, 2),)
    return tuple(round(float(x), 2) for x in np.linspace(centre - half, centre + half, slices))


def propose_rois(
    localisation: Localisation,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    slices: int = 5,
) -> list[Proposal]:
    """One :class:`Proposal` per body, inferior to superior: the body's sagittal outline as
    the polygon, ``slices`` sagittal positions over the central 60 % of its lateral extent
    and its label as the vertebra. The paper used 3–5 slices."""
    if not MIN_SLICES <= slices <= MAX_SLICES:
        raise ValueError(f"slices: expected {MIN_SLICES}..{MAX_SLICES}, got {slices}")
    proposals = []
    for body in localisation.bodies:
        roi = Roi(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            slices_x_mm=slice_positions(body, slices),
            polygon_yz_mm=body.outline_yz_mm,
            vertebra=body.label,
        )
        proposals.append(Proposal(roi=roi, confidence=body.confidence))
    return proposals
