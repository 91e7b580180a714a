"""A CT volume on an LPS-aligned working grid of a few millimetres.

The localiser reasons along the patient's axes (z superior, y posterior, x left), whatever the
acquisition: axial head-first or feet-first, slices in either order, sagittal or coronal. When
the volume's directions are aligned with the patient axes the grid is an axis permutation and
flip of the voxels followed by a block mean (exact, cheap); otherwise it is resampled with
trilinear interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.io.volume import SeriesGeometry, Volume

# Target voxel size (mm) of the working grid; coarser input is kept as it is.
WORKING_SPACING_MM = 2.0
# Directions within this of a patient axis (|cosine|) count as aligned with it.
_ALIGNED_COSINE = 0.9999
AIR_HU = -1000.0


@dataclass(frozen=True)
class LpsGrid:
    """HU voxels ``hu[z, y, x]`` along increasing LPS z, y and x.

    ``origin_mm`` is the LPS position (x, y, z) of ``hu[0, 0, 0]`` and ``spacing_mm`` the
    voxel size (x, y, z) in mm.
    """

    hu: np.ndarray
    origin_mm: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return (int(z), int(y), int(x))

    def x_mm(self, index: float | np.ndarray) -> np.ndarray:
        return np.asarray(self.origin_mm[0] + np.asarray(index) * self.spacing_mm[0])

    def y_mm(self, index: float | np.ndarray) -> np.ndarray:
        return np.asarray(self.origin_mm[1] + np.asarray(index) * self.spacing_mm[1])

    def z_mm(self, index: float | np.ndarray) -> np.ndarray:
        return np.asarray(self.origin_mm[2] + np.asarray(index) * self.spacing_mm[2])

    def x_index(self, mm: float | np.ndarray) -> np.ndarray:
        return np.asarray((np.asarray(mm) - self.origin_mm[0]) / self.spacing_mm[0])

    def y_index(self, mm: float | np.ndarray) -> np.ndarray:
        return np.asarray((np.asarray(mm) - self.origin_mm[1]) / self.spacing_mm[1])

    def z_index(self, mm: float | np.ndarray) -> np.ndarray:
        return np.asarray((np.asarray(mm) - self.origin_mm[2]) / self.spacing_mm[2])


def _axis_steps(volume: Volume | SeriesGeometry) -> np.ndarray:
    """3×3: row v is the LPS step (mm) of one index along volume axis v (slice, row, column)."""
    s, r, c = volume.spacing
    return np.stack(
        [
            np.asarray(volume.slice_direction, dtype=np.float64) * s,
            np.asarray(volume.column_direction, dtype=np.float64) * r,
            np.asarray(volume.row_direction, dtype=np.float64) * c,
        ]
    )


def _aligned_permutation(volume: Volume | SeriesGeometry) -> list[tuple[int, float]] | None:
    """For LPS axes x, y, z: (volume axis, sign) along it, or None when not axis-aligned."""
    directions = [
        np.asarray(volume.slice_direction, dtype=np.float64),
        np.asarray(volume.column_direction, dtype=np.float64),
        np.asarray(volume.row_direction, dtype=np.float64),
    ]
    mapping: dict[int, tuple[int, float]] = {}
    for v, direction in enumerate(directions):
        norm = float(np.linalg.norm(direction))
        if norm == 0.0:
            return None
        unit = direction / norm
        axis = int(np.argmax(np.abs(unit)))
        if abs(unit[axis]) < _ALIGNED_COSINE or axis in mapping:
            return None
        mapping[axis] = (v, float(np.sign(unit[axis])))
    return [mapping[a] for a in range(3)]


def _block_mean(array: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over non-overlapping blocks (the remainder at the far end is dropped)."""
    if factors == (1, 1, 1):
        return np.asarray(array, dtype=np.float32)
    trimmed = array[
        : array.shape[0] // factors[0] * factors[0],
        : array.shape[1] // factors[1] * factors[1],
        : array.shape[2] // factors[2] * factors[2],
    ]
    shape = (
        trimmed.shape[0] // factors[0],
        factors[0],
        trimmed.shape[1] // factors[1],
        factors[1],
        trimmed.shape[2] // factors[2],
        factors[2],
    )
    return np.asarray(trimmed.reshape(shape).mean(axis=(1, 3, 5), dtype=np.float32))


def _factor(spacing: float, target: float, size: int) -> int:
    return int(max(1, min(size, round(target / spacing)))) if spacing < target else 1


def working_bins(
    geometry: SeriesGeometry, spacing_mm: float = WORKING_SPACING_MM
) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """The blocks :func:`to_lps_grid` averages the whole series of ``geometry`` over, in the
    series' own axes (slice, row, column): their size and the index of the first block (the
    remainder an axis drops lies at its far end along the patient axis, so at the start of a
    volume axis that runs against it). None for an oblique series (it is resampled instead).

    An overview read as these block means (:func:`model.io.volume.load_binned`) gives the
    localiser the grid it would compute from the whole volume, without holding the whole
    volume: :func:`to_lps_grid` then averages nothing more."""
    permutation = _aligned_permutation(geometry)
    if permutation is None:
        return None
    steps = _axis_steps(geometry)
    bins, start = [1, 1, 1], [0, 0, 0]
    for lps_axis, (v, sign) in enumerate(permutation):
        size = geometry.shape[v]
        bins[v] = _factor(abs(float(steps[v][lps_axis])), spacing_mm, size)
        start[v] = size % bins[v] if sign < 0 else 0
    return (bins[0], bins[1], bins[2]), (start[0], start[1], start[2])


def to_lps_grid(volume: Volume, spacing_mm: float = WORKING_SPACING_MM) -> LpsGrid:
    """``volume`` on an LPS-aligned grid of about ``spacing_mm`` (never finer than given)."""
    steps = _axis_steps(volume)
    permutation = _aligned_permutation(volume)
    voxels = np.asarray(volume.voxels)
    if permutation is None:
        return _resampled(volume, steps, spacing_mm)
    # Array axes (z, y, x) ← volume axes; flip where the volume runs against the LPS axis.
    order = [permutation[a][0] for a in (2, 1, 0)]
    array = np.transpose(voxels, order)
    first_index = np.zeros(3)
    flips: list[int] = []
    for array_axis, lps_axis in enumerate((2, 1, 0)):
        v, sign = permutation[lps_axis]
        if sign < 0:
            flips.append(array_axis)
            first_index[v] = voxels.shape[v] - 1
    if flips:
        array = np.flip(array, axis=tuple(flips))
    base = volume.index_to_patient(first_index)
    spacing = [abs(float(steps[permutation[a][0]][a])) for a in range(3)]  # x, y, z
    factors_xyz = [_factor(spacing[a], spacing_mm, array.shape[2 - a]) for a in range(3)]
    factors = (factors_xyz[2], factors_xyz[1], factors_xyz[0])
    hu = _block_mean(array, factors)
    origin = tuple(float(base[a] + (factors_xyz[a] - 1) / 2.0 * spacing[a]) for a in range(3))
    return LpsGrid(
        hu=np.ascontiguousarray(hu),
        origin_mm=(origin[0], origin[1], origin[2]),
        spacing_mm=(
            spacing[0] * factors_xyz[0],
            spacing[1] * factors_xyz[1],
            spacing[2] * factors_xyz[2],
        ),
    )


def _resampled(volume: Volume, steps: np.ndarray, spacing_mm: float) -> LpsGrid:
    """Trilinear resampling of an oblique volume onto the LPS box that holds it."""
    shape = np.asarray(volume.voxels.shape, dtype=np.float64)
    corners = np.array(
        [[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]
    )
    positions = volume.index_to_patient(corners)
    low, high = positions.min(axis=0), positions.max(axis=0)
    finest = float(min(volume.spacing))
    step = max(spacing_mm, finest)
    size = np.maximum(np.floor((high - low) / step).astype(int) + 1, 1)  # x, y, z
    # Index (slice, row, column) of grid voxel (z, y, x): inverse of the volume's axes.
    inverse = np.linalg.inv(steps.T)  # LPS offset → volume index
    grid_to_lps = np.diag([step, step, step])[::-1]  # (z, y, x) index → (x, y, z) offset
    matrix = inverse @ grid_to_lps
    offset = inverse @ (low - np.asarray(volume.origin, dtype=np.float64))
    voxels = np.asarray(volume.voxels, dtype=np.float32)
    factor = max(1, int(step // finest))
    if factor > 1:  # average before sampling, so that the samples do not alias
        voxels = ndimage.uniform_filter(voxels, size=factor, mode="nearest")
    hu = ndimage.affine_transform(
        voxels,
        matrix,
        offset=offset,
        output_shape=(int(size[2]), int(size[1]), int(size[0])),
        order=1,
        mode="constant",
        cval=AIR_HU,
    )
    return LpsGrid(
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        origin_mm=(float(low[0]), float(low[1]), float(low[2])),
        spacing_mm=(step, step, step),
    )
