"""How a series is read for automatic triage: the whole field of view on a grid of about
2 mm for the localiser, then the full-resolution voxels the classifier needs for its ROIs.

The localiser works on a grid of about :data:`OVERVIEW_SPACING_MM`. A JPEG 2000 series is
decoded for it at reduced resolution (OpenJPEG skips the finest wavelet levels, most of the
work) and, where the slices are thinner than the grid, only every k-th slice: both halve the
decoding time or better, and cost the localiser nothing measurable on the phantoms (see
``benchmarks/README.md``). An uncompressed series is read as the block means the localiser
itself would average the whole volume over (:func:`model.serving.localiser.working_bins`),
straight from the files: the localiser gets the grid it computes from the whole volume, and
the whole volume at full resolution (300 MB of float32 for 300 slices of 512²) is never held;
the classifier's regions are read from the files again afterwards, which costs little. Other
codecs cost the same whole or reduced, so they are decoded whole once, for the localiser and
the classifier alike.

The worker's automatic job and ``evaluate --auto`` use the same plan, so what is validated is
what runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from model.io.pixels import DIRECT_TRANSFER_SYNTAXES, JPEG2000_TRANSFER_SYNTAXES
from model.io.volume import PatientBox, SeriesGeometry, Volume, load_binned, load_volume
from model.serving.localiser import MIN_SLICES, working_bins
from model.serving.preprocess import PreprocessParams, roi_region
from model.serving.roi import Roi

OVERVIEW_SPACING_MM = 2.0  # the localiser's working grid
MAX_REDUCE = 2  # ¼ resolution: 2 mm from 0.5 mm pixels


@dataclass(frozen=True)
class OverviewPlan:
    reduce: int = 0  # in-plane resolution 1/2^reduce
    slice_step: int = 1  # every slice_step-th slice
    # Means over blocks of (slices, rows, columns), the first at index bin_start
    # (:func:`model.io.volume.load_binned`); None: not binned.
    bins: tuple[int, int, int] | None = None
    bin_start: tuple[int, int, int] = (0, 0, 0)

    @property
    def is_full_resolution(self) -> bool:
        return self.reduce == 0 and self.slice_step == 1 and self.bins is None


def overview_plan(geometry: SeriesGeometry) -> OverviewPlan:
    """The cheapest reading of ``geometry`` whose grid is still at most about 2 mm."""
    syntax = geometry.frames[0].transfer_syntax_uid
    if syntax in DIRECT_TRANSFER_SYNTAXES:
        return _binned_plan(geometry)
    if syntax not in JPEG2000_TRANSFER_SYNTAXES:
        return OverviewPlan()
    slice_mm, *pixel_mm = geometry.spacing
    reduce = math.floor(math.log2(OVERVIEW_SPACING_MM / min(pixel_mm)) + 1e-9)
    step = math.floor(OVERVIEW_SPACING_MM / slice_mm + 1e-9)
    return OverviewPlan(reduce=min(max(reduce, 0), MAX_REDUCE), slice_step=max(step, 1))


def _binned_plan(geometry: SeriesGeometry) -> OverviewPlan:
    """The localiser's own blocks, when it would average any; whole otherwise, and whole when
    the blocks would leave fewer planes than the localiser needs on some axis (it then judges
    the series on its own slices, as it would from the whole volume)."""
    blocks = working_bins(geometry)
    if blocks is None or blocks[0] == (1, 1, 1):
        return OverviewPlan()
    bins, start = blocks
    counts = [(n - s) // b for n, s, b in zip(geometry.shape, start, bins, strict=True)]
    if min(counts) < MIN_SLICES:
        return OverviewPlan()
    return OverviewPlan(bins=bins, bin_start=start)


def load_overview(geometry: SeriesGeometry, *, workers: int | None = None) -> Volume:
    """The series as the localiser reads it (see :func:`overview_plan`)."""
    plan = overview_plan(geometry)
    if plan.bins is not None:
        return load_binned(geometry, plan.bins, plan.bin_start)
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
