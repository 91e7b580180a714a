"""The ROIs an automatic localiser would propose on a phantom's vertebral bodies.

A localiser finds every vertebral body and proposes on each the paper's ROI: the bounding
rectangle of the body's sagittal outline widened in front and behind by the localiser's
margin (:func:`model.serving.localiser.automatic_polygon`, the one rule serving and training
share; the square box around it is what the network sees) and a few sagittal slices spread
over the inner part of the body's lateral extent. Unlike the reader's ROI
(:func:`model.synthetic.design.design_roi`) the box follows the body, not the lesion: a large
paravertebral mass reaches beyond it (with ``margin_mm=0`` the box is tight on the body and
leaves any mass out). The phantom is the truth, so the outline is known exactly; the jitter
stands for the localiser's error.

:func:`localised_body_rois` gives instead the ROIs the localiser itself proposes on the
written series, each matched to the phantom body it lies on: what an automatic job will
classify, biases of the localiser included (its outline of a phantom body is not the
phantom's), so a model trained on them is trained on what it serves.

Normal bodies are the ones without any fracture feature: not the fractured one, not a
compressed one, and in a malignant case not the fractured one's neighbours either (metastases
spread, and the phantom may put a second lesion there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from model.io.volume import read_series_geometry
from model.serving.localiser import AUTOMATIC_MARGIN_MM, automatic_polygon, localise, propose_rois
from model.serving.overview import load_overview
from model.serving.roi import Roi
from model.synthetic.design import ROI_Z_CLEARANCE_MM
from model.synthetic.phantom import SpinePhantom

BODY_ROI_SLICES = 5
BODY_ROI_JITTER_MM = 2.0
# Share of the body's lateral extent (centred) the slices spread over.
BODY_ROI_LATERAL_FRACTION = 0.6


@dataclass(frozen=True)
class OutlineBox:
    """The bounding rectangle of a body's sagittal outline (LPS mm), from the phantom."""

    y_min: float  # anterior wall
    y_max: float  # posterior wall
    z_min: float  # inferior endplate
    z_max: float  # superior endplate

    def side(self, margin_mm: float = 0.0) -> float:
        """Side of the square box around the rectangle widened by ``margin_mm`` in y."""
        return max(self.y_max - self.y_min + 2.0 * margin_mm, self.z_max - self.z_min)

    @property
    def center_z(self) -> float:
        return (self.z_min + self.z_max) / 2.0


def outline_box(phantom: SpinePhantom, index: int) -> OutlineBox:
    """Body ``index``'s sagittal outline on the midline: endplate to endplate, wall to wall.

    A compressed body keeps its full height at the posterior wall (wedge) or at its rim
    (biconcave), so its rectangle spans ``z_bottom`` to ``z_top``; the body centre follows the
    lordotic curve, so the walls are taken over the body's height.
    """
    vertebra = phantom.vertebrae[index]
    centre_y = phantom.center_y_at(np.linspace(vertebra.z_bottom, vertebra.z_top, 17))
    return OutlineBox(
        y_min=float(np.min(centre_y)) - vertebra.radius_y,
        y_max=float(np.max(centre_y)) + vertebra.radius_y,
        z_min=vertebra.z_bottom,
        z_max=vertebra.z_top,
    )


def body_in_series(
    phantom: SpinePhantom,
    index: int,
    slice_z_mm: Sequence[float],
    *,
    jitter_mm: float = BODY_ROI_JITTER_MM,
    margin_mm: float = AUTOMATIC_MARGIN_MM,
) -> bool:
    """Whether body ``index`` and the square box around its ROI lie inside the series."""
    box = outline_box(phantom, index)
    reach = (box.side(margin_mm) + 2.0 * jitter_mm) / 2.0 + ROI_Z_CLEARANCE_MM
    return (
        box.center_z - reach >= min(slice_z_mm)
        and box.center_z + reach <= max(slice_z_mm)
        and box.z_min >= min(slice_z_mm)
        and box.z_max <= max(slice_z_mm)
    )


def bodies_in_series(
    phantom: SpinePhantom,
    slice_z_mm: Sequence[float],
    *,
    jitter_mm: float = BODY_ROI_JITTER_MM,
    margin_mm: float = AUTOMATIC_MARGIN_MM,
) -> tuple[int, ...]:
    """Indices of the bodies a localiser could propose an ROI on in this series."""
    return tuple(
        i
        for i in range(len(phantom.vertebrae))
        if body_in_series(phantom, i, slice_z_mm, jitter_mm=jitter_mm, margin_mm=margin_mm)
    )


def normal_bodies(
    phantom: SpinePhantom,
    slice_z_mm: Sequence[float],
    *,
    jitter_mm: float = BODY_ROI_JITTER_MM,
    margin_mm: float = AUTOMATIC_MARGIN_MM,
) -> tuple[int, ...]:
    """Bodies inside the series with no fracture feature (see the module docstring)."""
    excluded = {phantom.abnormal_index}
    if phantom.label == "malignant":
        excluded |= {phantom.abnormal_index - 1, phantom.abnormal_index + 1}
    for lesion in phantom.lesions:
        excluded |= {
            i for i, v in enumerate(phantom.vertebrae) if v.z_bottom <= lesion.center[2] <= v.z_top
        }
    for i, v in enumerate(phantom.vertebrae):
        if v.wedge_fraction > 0.0 or v.biconcave_fraction > 0.0:
            excluded.add(i)
    excluded |= {line.vertebra for line in phantom.fracture_lines}
    excluded |= {broken.vertebra for broken in phantom.cortical_breaks}
    inside = bodies_in_series(phantom, slice_z_mm, jitter_mm=jitter_mm, margin_mm=margin_mm)
    return tuple(i for i in inside if i not in excluded)


def body_roi(
    phantom: SpinePhantom,
    index: int,
    rng: np.random.Generator,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    slice_z_mm: Sequence[float],
    slices: int = BODY_ROI_SLICES,
    jitter_mm: float = BODY_ROI_JITTER_MM,
    lateral_fraction: float = BODY_ROI_LATERAL_FRACTION,
    margin_mm: float = AUTOMATIC_MARGIN_MM,
) -> Roi:
    """The ROI an automatic localiser would propose on body ``index`` of the phantom.

    Polygon: the body's outline rectangle, each edge moved by up to ``jitter_mm`` either way,
    then widened by ``margin_mm`` in front and behind (the localiser's rule).
    Slices: ``slices`` positions spread evenly over the centred ``lateral_fraction`` (±5 %)
    of the body's lateral extent, their centre off the midline by up to ``jitter_mm``.
    :class:`ValueError` when the body is not inside the series (``slice_z_mm``).
    """
    if not 0 <= index < len(phantom.vertebrae):
        raise ValueError(f"index: the phantom has {len(phantom.vertebrae)} bodies, not {index + 1}")
    if not 1 <= slices <= 7 or not 0.0 < lateral_fraction <= 1.0 or jitter_mm < 0.0:
        raise ValueError("slices must be 1-7, lateral_fraction in (0, 1], jitter_mm >= 0")
    if margin_mm < 0.0:
        raise ValueError(f"margin_mm: expected 0 or more, got {margin_mm}")
    if not body_in_series(phantom, index, slice_z_mm, jitter_mm=jitter_mm, margin_mm=margin_mm):
        raise ValueError(
            f"body {index} ({phantom.vertebrae[index].name}) is not inside the series' "
            f"z range {min(slice_z_mm):.1f}..{max(slice_z_mm):.1f} mm"
        )
    vertebra = phantom.vertebrae[index]
    box = outline_box(phantom, index)

    def jitter() -> float:
        return float(rng.uniform(-jitter_mm, jitter_mm))

    polygon = automatic_polygon(
        (box.y_min + jitter(), box.y_max + jitter()),
        (box.z_min + jitter(), box.z_max + jitter()),
        margin_mm=margin_mm,
    )
    spread = vertebra.radius_x * lateral_fraction * float(rng.uniform(0.95, 1.05))
    centre_x = phantom.spine_x + jitter()
    offsets = np.linspace(-spread, spread, slices) if slices > 1 else np.zeros(1)
    return Roi(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        slices_x_mm=tuple(round(centre_x + float(dx), 2) for dx in offsets),
        polygon_yz_mm=polygon,
        vertebra=vertebra.name,
    )


def localised_body_rois(
    series_dir: Path,
    phantom: SpinePhantom,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    slices: int = BODY_ROI_SLICES,
    margin_mm: float = AUTOMATIC_MARGIN_MM,
) -> dict[int, Roi]:
    """The ROIs the automatic localiser proposes on the series in ``series_dir``, read as an
    automatic job reads it, keyed by the index of the phantom body each one's centre lies in
    (between the body's endplates); where two fall in one body, the more confident one. A
    body the localiser missed has no entry."""
    files = sorted(p for p in Path(series_dir).rglob("*") if p.is_file())
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    overview = load_overview(read_series_geometry(files, headers))
    proposals = propose_rois(
        localise(overview),
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        slices=slices,
        margin_mm=margin_mm,
    )
    found: dict[int, tuple[float, Roi]] = {}
    for proposal in proposals:
        zs = [z for _, z in proposal.roi.polygon_yz_mm]
        centre = (min(zs) + max(zs)) / 2.0
        for index, vertebra in enumerate(phantom.vertebrae):
            if vertebra.z_bottom <= centre <= vertebra.z_top:
                if index not in found or proposal.confidence > found[index][0]:
                    found[index] = (proposal.confidence, proposal.roi)
                break
    return {index: roi for index, (_, roi) in sorted(found.items())}
