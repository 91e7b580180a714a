"""Finding and tracking the spinal canal along z (after Burns, Yao & Summers 2017).

The canal is a tube of soft-tissue density (CSF, cord, fat: about −60…130 HU) enclosed by
bone: the vertebral body in front, the pedicles on either side and the lamina behind. On each
axial plane a voxel is a canal candidate when it is soft tissue and bone lies within a short
reach of it in all four in-plane directions. The candidates of the planes through the
pedicles form short segments; closing the gaps along z (the disc levels, where the ring is
open) joins them into one long, thin tube. The tube that runs longest along z, with a dense
column in front of it, is the canal; its centre line is interpolated over the planes where
the ring is open and smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.serving.localiser.grid import LpsGrid
from model.serving.localiser.morphology import closing, dilate, opening

SOFT_HU = (-60.0, 70.0)
BONE_HU = 200.0
# Bone must lie within this distance (mm) of a canal voxel on its left and on its right.
ENCLOSURE_REACH_MM = 16.0
# In front of a canal voxel (this range of distances, mm) the mean HU is at least this.
FRONT_MM = (4.0, 14.0)
FRONT_MIN_HU = 80.0
# Gaps along z (mm) that the canal may show at the disc levels.
GAP_CLOSING_MM = 22.0
# Cross-section (mm²) of a canal on one plane, and the shortest canal (mm) worth tracking.
CANAL_AREA_MM2 = (25.0, 900.0)
MIN_CANAL_LENGTH_MM = 24.0
# How far in front of the canal (mm) the body column is looked for, and its density.
COLUMN_REACH_MM = 30.0
COLUMN_MIN_HU = 90.0
CENTRE_SMOOTHING_MM = 6.0


@dataclass(frozen=True)
class CanalTrack:
    """The canal's centre line over the planes ``z_indices`` of a :class:`LpsGrid`.

    ``x_mm``/``y_mm``: the canal's centre on each plane; ``anterior_y_mm``: its front edge (the
    back of the vertebral body); ``observed``: whether the plane showed the closed ring (else
    the values are interpolated).
    """

    z_indices: np.ndarray
    x_mm: np.ndarray
    y_mm: np.ndarray
    anterior_y_mm: np.ndarray
    observed: np.ndarray

    @property
    def length(self) -> int:
        return len(self.z_indices)

    def at(self, z_index: float) -> tuple[float, float, float]:
        """(x, y, anterior y) in mm on plane ``z_index`` (clamped to the track)."""
        return (
            float(np.interp(z_index, self.z_indices, self.x_mm)),
            float(np.interp(z_index, self.z_indices, self.y_mm)),
            float(np.interp(z_index, self.z_indices, self.anterior_y_mm)),
        )


def _bone_within(bone: np.ndarray, axis: int, reach: int, forward: bool) -> np.ndarray:
    """Whether bone lies 1…``reach`` voxels from each voxel along ``axis`` (one direction):
    an OR of the bone mask shifted by each step (inside the volume only)."""
    size = bone.shape[axis]
    within = np.zeros(bone.shape, dtype=bool)
    target = [slice(None)] * bone.ndim
    source = [slice(None)] * bone.ndim
    for step in range(1, min(reach, size - 1) + 1):
        near, far = slice(0, size - step), slice(step, size)
        target[axis], source[axis] = (near, far) if forward else (far, near)
        within[tuple(target)] |= bone[tuple(source)]
    return within


def _mean_ahead(hu: np.ndarray, axis: int, near: int, far: int) -> np.ndarray:
    """Mean HU of the voxels ``near``…``far`` steps toward lower indices along ``axis``."""
    counts = np.cumsum(hu, axis=axis, dtype=np.float32)
    size = hu.shape[axis]
    pad_shape = list(hu.shape)
    pad_shape[axis] = far + 1
    padded = np.concatenate([np.zeros(pad_shape, np.float32), counts], axis=axis)
    index = np.arange(size) + far + 1
    upper = np.take(padded, index - near, axis=axis)  # sum up to i - near
    lower = np.take(padded, index - far - 1, axis=axis)  # sum up to i - far - 1
    return np.asarray((upper - lower) / float(far - near + 1))


def candidate_mask(grid: LpsGrid) -> np.ndarray:
    """Canal-density voxels with bone on both sides and a dense column just in front."""
    hu = grid.hu
    soft = (hu > SOFT_HU[0]) & (hu < SOFT_HU[1])
    bone = hu > BONE_HU
    sx, sy, _ = grid.spacing_mm
    reach = max(2, round(ENCLOSURE_REACH_MM / sx))
    enclosed = soft & _bone_within(bone, 2, reach, True) & _bone_within(bone, 2, reach, False)
    near = max(1, round(FRONT_MM[0] / sy))
    far = max(near + 1, round(FRONT_MM[1] / sy))
    enclosed &= _mean_ahead(hu, 1, near, far) > FRONT_MIN_HU
    # Drop specks (noise, marrow): an in-plane opening.
    return opening(enclosed, (1, 2, 2))


def _column_density(grid: LpsGrid, z: int, x_mm: float, anterior_y_mm: float) -> float:
    """Median HU of the strip in front of the canal on plane ``z``."""
    sx, _sy, _ = grid.spacing_mm
    x = round(float(grid.x_index(x_mm)))
    y1 = round(float(grid.y_index(anterior_y_mm)))
    y0 = round(float(grid.y_index(anterior_y_mm - COLUMN_REACH_MM)))
    half = max(1, round(6.0 / sx))
    strip = grid.hu[z, max(y0, 0) : max(y1, 0), max(x - half, 0) : x + half + 1]
    return float(np.median(strip)) if strip.size else -1000.0


def track_canal(grid: LpsGrid) -> CanalTrack | None:
    """The spinal canal's centre line, or None when no canal-like tube is found."""
    candidates = candidate_mask(grid)
    if not candidates.any():
        return None
    sx, sy, sz = grid.spacing_mm
    gap = max(1, round(GAP_CLOSING_MM / sz))
    # Join the segments across the disc levels; the canal may shift a little in-plane there.
    widened = dilate(candidates, (1, 3, 3))
    closed = closing(widened, (gap + 1, 1, 1))
    labels, count = ndimage.label(closed)
    if count == 0:
        return None
    objects = ndimage.find_objects(labels)
    voxel_area = sx * sy
    best: tuple[float, CanalTrack] | None = None
    for index, box in enumerate(objects, start=1):
        if box is None:
            continue
        z_extent = (box[0].stop - box[0].start) * sz
        if z_extent < MIN_CANAL_LENGTH_MM:
            continue
        track = _track_of(grid, (labels[box] == index) & candidates[box], box, voxel_area)
        if track is None:
            continue
        observed = np.flatnonzero(track.observed)
        densities = [
            _column_density(grid, int(track.z_indices[i]), track.x_mm[i], track.anterior_y_mm[i])
            for i in observed
        ]
        if float(np.median(densities)) < COLUMN_MIN_HU:
            continue
        score = track.length * sz * (0.5 + 0.5 * len(observed) / track.length)
        if best is None or score > best[0]:
            best = (score, track)
    return None if best is None else best[1]


def _track_of(
    grid: LpsGrid, mask: np.ndarray, box: tuple[slice, ...], voxel_area: float
) -> CanalTrack | None:
    """Centre line of one candidate tube (``mask`` within ``box``), or None if implausible."""
    z0, y0, x0 = box[0].start, box[1].start, box[2].start
    planes = mask.shape[0]
    xs = np.full(planes, np.nan)
    ys = np.full(planes, np.nan)
    fronts = np.full(planes, np.nan)
    for k in range(planes):
        plane = mask[k]
        if not plane.any():
            continue
        blobs, count = ndimage.label(plane)
        if count > 1:  # the canal is the largest blob of the plane
            sizes = np.bincount(blobs.ravel())[1:]
            plane = blobs == int(np.argmax(sizes)) + 1
        area = float(plane.sum()) * voxel_area
        if not CANAL_AREA_MM2[0] <= area <= CANAL_AREA_MM2[1]:
            continue
        rows, columns = np.nonzero(plane)
        xc, yc = float(columns.mean()), float(rows.mean())
        near = np.abs(columns - xc) <= max(1.0, 3.0 / grid.spacing_mm[0])
        if not near.any():
            near = np.ones_like(columns, dtype=bool)
        xs[k] = float(grid.x_mm(x0 + xc))
        ys[k] = float(grid.y_mm(y0 + yc))
        fronts[k] = float(grid.y_mm(y0 + rows[near].min() - 0.5))
    observed = np.isfinite(xs)
    if observed.sum() < 2:
        return None
    first, last = np.flatnonzero(observed)[[0, -1]]
    keep = slice(int(first), int(last) + 1)
    xs, ys, fronts, observed = xs[keep], ys[keep], fronts[keep], observed[keep]
    positions = np.arange(len(xs))
    smooth = max(0.5, CENTRE_SMOOTHING_MM / grid.spacing_mm[2])
    filled = []
    for values in (xs, ys, fronts):
        line = np.interp(positions, positions[observed], values[observed])
        line = ndimage.median_filter(line, size=3, mode="nearest")
        filled.append(ndimage.gaussian_filter1d(line, smooth, mode="nearest"))
    return CanalTrack(
        z_indices=positions + z0 + int(first),
        x_mm=filled[0],
        y_mm=filled[1],
        anterior_y_mm=filled[2],
        observed=observed,
    )
