"""How a series is read for automatic triage: the whole field of view on a grid of about
2 mm for the localiser, then the full-resolution voxels the classifier needs for its ROIs.

The localiser works on a grid of about :data:`OVERVIEW_SPACING_MM`. A JPEG 2000 series is
decoded for it at reduced resolution (OpenJPEG skips the finest wavelet levels, most of the
work) and, where the slices are thinner than the grid, only every k-th slice: both halve the
decoding time or better, and cost the localiser nothing measurable on the phantoms (see
``benchmarks/README.md``). Other codecs cost the same whole or reduced, so they are decoded
whole once, for the localiser and the classifier alike.

The worker's automatic job and ``evaluate --auto`` use the same plan, so what is validated is
what runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from model.io.pixels import JPEG2000_TRANSFER_SYNTAXES
from model.io.volume import PatientBox, SeriesGeometry, Volume, load_volume
from model.serving.preprocess import PreprocessParams, roi_region
from model.serving.roi import Roi

OVERVIEW_SPACING_MM = 2.0  # the localiser's working grid
MAX_REDUCE = 2  # ¼ resolution: 2 mm from 0.5 mm pixels


@dataclass(frozen=True)
class OverviewPlan:
    reduce: int  # in-plane resolution 1/2^reduce
    slice_step: int  # every slice_step-th slice

    @property
    def is_full_resolution(self) -> bool:
        return self.reduce == 0 and self.slice_step == 1


def overview_plan(geometry: SeriesGeometry) -> OverviewPlan:
    """The cheapest reading of ``geometry`` whose grid is still at most about 2 mm."""
    if geometry.frames[0].transfer_syntax_uid not in JPEG2000_TRANSFER_SYNTAXES:
        return OverviewPlan(0, 1)
    slice_mm, *pixel_mm = geometry.spacing
    reduce = math.floor(math.log2(OVERVIEW_SPACING_MM / min(pixel_mm)) + 1e-9)
    step = math.floor(OVERVIEW_SPACING_MM / slice_mm + 1e-9)
    return OverviewPlan(reduce=min(max(reduce, 0), MAX_REDUCE), slice_step=max(step, 1))


def load_overview(geometry: SeriesGeometry, *, workers: int | None = None) -> Volume:
    """The series as the localiser reads it (see :func:`overview_plan`)."""
    plan = overview_plan(geometry)
    return load_volume(geometry, reduce=plan.reduce, slice_step=plan.slice_step, workers=workers)


def load_for_rois(
    geometry: SeriesGeometry,
    overview: Volume,
    rois: Sequence[Roi],
    params: PreprocessParams,
    *,
    also: PatientBox | None = None,
    workers: int | None = None,
) -> Volume:
    """The full-resolution voxels the classifier needs for ``rois`` (and ``also``, a further
    region the caller needs from the same decoding): the overview itself when it is the whole
    series at full resolution, else one region covering every ROI (JPEG 2000 decodes only its
    code-blocks)."""
    if overview.spacing == geometry.spacing and overview.shape == geometry.shape:
        return overview
    if not rois:
        raise ValueError("no ROI to load")
    regions = [roi_region(roi, lateral_reach_mm=params.lateral_reach_mm) for roi in rois]
    if also is not None:
        regions.append(also)
    union = PatientBox(
        x_mm=(min(r.x_mm[0] for r in regions), max(r.x_mm[1] for r in regions)),
        y_mm=(min(r.y_mm[0] for r in regions), max(r.y_mm[1] for r in regions)),
        z_mm=(min(r.z_mm[0] for r in regions), max(r.z_mm[1] for r in regions)),
    )
    return load_volume(geometry, region=union, workers=workers)
