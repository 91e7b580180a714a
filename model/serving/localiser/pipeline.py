"""The localiser top to bottom: checks, working grid, canal, column, bodies, labels."""

from __future__ import annotations

import logging

import numpy as np

from model.io.volume import Volume
from model.serving.localiser.bodies import find_bodies
from model.serving.localiser.canal import track_canal
from model.serving.localiser.column import follow_column
from model.serving.localiser.grid import LpsGrid, to_lps_grid
from model.serving.localiser.labels import assign_labels, sacrum_below
from model.serving.localiser.results import Localisation, VertebralBody

logger = logging.getLogger(__name__)

MIN_SLICES = 10
TISSUE_HU = -500.0
MIN_TISSUE_FRACTION = 0.01
METAL_HU = 2500.0
# Metal (cm³) in the region of the spine that makes it unanalysable.
MAX_METAL_CM3 = 0.5
NO_SPINE = "no spine in the field of view"
CUT_BODIES = "the field of view cuts every vertebral body"
METAL = "metal over the spine"


def _slices_along_z(volume: Volume) -> int:
    """How many source planes the volume has along the patient's z axis."""
    steps = np.stack(
        [
            np.asarray(volume.slice_direction, dtype=np.float64),
            np.asarray(volume.column_direction, dtype=np.float64),
            np.asarray(volume.row_direction, dtype=np.float64),
        ]
    )
    axis = int(np.argmax(np.abs(steps[:, 2])))
    return int(volume.voxels.shape[axis])


def _metal_cm3(grid: LpsGrid, region: tuple[slice, slice, slice] | None = None) -> float:
    hu = grid.hu if region is None else grid.hu[region]
    voxel_cm3 = float(np.prod(grid.spacing_mm)) / 1000.0
    return float(np.count_nonzero(hu > METAL_HU)) * voxel_cm3


def _unanalysable(reason: str) -> Localisation:
    logger.info("localiser: %s", reason)
    return Localisation(bodies=(), unanalysable=reason)


def localise(volume: Volume) -> Localisation:
    """The vertebral bodies of ``volume`` (HU, any orientation, LPS geometry)."""
    if volume.voxels.ndim != 3 or min(volume.voxels.shape) < 1:
        return _unanalysable(f"not a 3-D volume (shape {tuple(volume.voxels.shape)})")
    planes = _slices_along_z(volume)
    if planes < MIN_SLICES:
        return _unanalysable(f"too few slices ({planes}) for localisation")
    if not np.isfinite(volume.voxels).all():
        return _unanalysable("the volume holds values that are not numbers")
    grid = to_lps_grid(volume)
    if float(np.mean(grid.hu > TISSUE_HU)) < MIN_TISSUE_FRACTION:
        return _unanalysable(NO_SPINE)
    canal = track_canal(grid)
    if canal is None:
        return _unanalysable(METAL if _metal_cm3(grid) > MAX_METAL_CM3 else NO_SPINE)
    if (
        _metal_cm3(grid, _spine_region(grid, canal.x_mm, canal.y_mm, canal.z_indices))
        > MAX_METAL_CM3
    ):
        return _unanalysable(METAL)
    column = follow_column(grid, canal)
    found = find_bodies(grid, canal, column)
    if not found:
        return _unanalysable(CUT_BODIES)
    anchored = sacrum_below(grid, canal, column, found) and _sits_on_lowest_disc(
        grid, column.discs[0], found[0].z_range_mm[0], column.pitch_mm
    )
    labels = assign_labels(found, column.pitch_mm, anchored)
    bodies = tuple(
        VertebralBody(
            centre_mm=tuple(round(v, 2) for v in body.centre_mm),  # type: ignore[arg-type]
            outline_yz_mm=tuple((round(y, 2), round(z, 2)) for y, z in body.outline_yz_mm),
            x_range_mm=(round(body.x_range_mm[0], 2), round(body.x_range_mm[1], 2)),
            label=label,
            confidence=body.confidence,
        )
        for body, label in zip(found, labels, strict=True)
    )
    logger.debug("localiser: %d bodies, pitch %.1f mm", len(bodies), column.pitch_mm)
    return Localisation(bodies=bodies, unanalysable=None)


def _sits_on_lowest_disc(grid: LpsGrid, disc: float, bottom_mm: float, pitch_mm: float) -> bool:
    return abs(bottom_mm - float(grid.z_mm(disc))) < 0.4 * pitch_mm


def _spine_region(
    grid: LpsGrid, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray
) -> tuple[slice, slice, slice]:
    """Planes of the canal track, 40 mm either side of it, 80 mm in front to 40 mm behind."""
    _sx, _sy, _ = grid.spacing_mm
    x0 = int(max(float(grid.x_index(float(xs.min()) - 40.0)), 0))
    x1 = int(min(float(grid.x_index(float(xs.max()) + 40.0)) + 1, grid.shape[2]))
    y0 = int(max(float(grid.y_index(float(ys.min()) - 80.0)), 0))
    y1 = int(min(float(grid.y_index(float(ys.max()) + 40.0)) + 1, grid.shape[1]))
    return (slice(int(zs[0]), int(zs[-1]) + 1), slice(y0, y1), slice(x0, x1))
