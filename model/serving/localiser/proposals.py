"""ROI proposals: the paper's ROI (``METHOD.md``) for each localised body.

The paper's reader drew the smallest square containing *the whole abnormal area*: a
paravertebral or epidural soft-tissue mass (93 % of the malignant fractures, Table 1) lies
beside the body, outside its outline. The automatic ROI therefore is the body's outline
rectangle widened anteriorly and posteriorly by :data:`AUTOMATIC_MARGIN_MM`; its square box
(``Roi.square_box_yz``) is what the network sees. Training ROIs on normal bodies use the same
rule (:func:`automatic_polygon`), so the classifier sees what the localiser proposes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.serving.localiser.results import Localisation, VertebralBody
from model.serving.roi import MAX_SLICES, MIN_SLICES, Roi

# The slices are spread over this central share of the body's lateral extent.
INNER_FRACTION = 0.6
# Soft tissue kept in front of and behind the body (mm), where a mass would show.
AUTOMATIC_MARGIN_MM = 8.0


def automatic_polygon(
    y_range_mm: tuple[float, float],
    z_range_mm: tuple[float, float],
    *,
    margin_mm: float = AUTOMATIC_MARGIN_MM,
) -> tuple[tuple[float, float], ...]:
    """The automatic ROI's polygon: the body's outline rectangle (anterior–posterior
    ``y_range_mm``, inferior–superior ``z_range_mm``) widened by ``margin_mm`` in y."""
    (y0, y1), (z0, z1) = sorted(y_range_mm), sorted(z_range_mm)
    y0, y1 = y0 - margin_mm, y1 + margin_mm
    corners = ((y0, z1), (y1, z1), (y1, z0), (y0, z0))
    return tuple((round(y, 2), round(z, 2)) for y, z in corners)


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
    margin_mm: float = AUTOMATIC_MARGIN_MM,
) -> list[Proposal]:
    """One :class:`Proposal` per body, inferior to superior: the body's outline rectangle
    widened by ``margin_mm`` in y as the polygon (:func:`automatic_polygon`), ``slices``
    sagittal positions over the central 60 % of its lateral extent and its label as the
    vertebra. The paper used 3–5 slices."""
    if not MIN_SLICES <= slices <= MAX_SLICES:
        raise ValueError(f"slices: expected {MIN_SLICES}..{MAX_SLICES}, got {slices}")
    proposals = []
    for body in localisation.bodies:
        roi = Roi(
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            slices_x_mm=slice_positions(body, slices),
            polygon_yz_mm=automatic_polygon(
                (min(y for y, _ in body.outline_yz_mm), max(y for y, _ in body.outline_yz_mm)),
                (min(z for _, z in body.outline_yz_mm), max(z for _, z in body.outline_yz_mm)),
                margin_mm=margin_mm,
            ),
            vertebra=body.label,
        )
        proposals.append(Proposal(roi=roi, confidence=body.confidence))
    return proposals
