"""The vertebral body column in front of the canal, and its partition at the discs.

The bodies lie in front of the canal: the centre line of the column runs half a body depth in
front of the canal's front edge; beyond the canal's ends (where the ring is not seen, as at the
lumbosacral junction) it follows the dense body itself, plane by plane. Along that line the
density is high in the bodies (cancellous bone inside a cortical shell) and lower in the discs,
so a high percentile of a small cross-section perpendicular to the line (tilted in the sagittal
plane with it, so that a tilted disc such as L5/S1 is low across the whole section) is a
profile whose minima are the discs (Burns, Yao & Summers 2017 partition the column at the discs
the same way). The column's pitch (one body plus one
disc) comes from the profile's autocorrelation; minima closer than a good part of the pitch are
not two discs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, signal

from model.serving.localiser.canal import CanalTrack
from model.serving.localiser.grid import LpsGrid
from model.serving.localiser.morphology import closing

# Plausible body depth (mm, front to back) and pitch (mm, body + disc), neck to sacrum.
BODY_DEPTH_MM = (16.0, 60.0)
PITCH_MM = (15.0, 50.0)
PITCH_PER_DEPTH = (0.65, 1.5)
# HU above which a voxel in front of the canal counts as part of the column.
COLUMN_HU = 60.0
# How far beyond the canal's ends (mm) the column is followed.
EXTENSION_MM = 45.0
PROFILE_SMOOTHING_MM = 2.0
# Beyond the canal's ends the centre line follows bone above this HU, by at most this many mm
# per mm along z.
FOLLOW_HU = 100.0
FOLLOW_STEP_PER_MM = 1.0
# The body is looked for this share of its depth either side of the centre, as a dense run of
# this share of its depth.
FOLLOW_REACH = 0.9
FOLLOW_RUN = (0.5, 1.4)
# The centre line's tangent: smoothing (mm) and the largest sagittal tilt of a cross-section.
TANGENT_SMOOTHING_MM = 8.0
MAX_TILT_RAD = math.radians(40.0)
# The profile is this percentile of a cross-section of the column: a disc is low across the
# whole section, a lesion only in part of it.
PROFILE_PERCENTILE = 75.0
# A disc's minimum must be this deep below the bodies around it (share of body − disc HU).
MIN_PROMINENCE_HU = 15.0
# The bodies rise on both sides of a disc's centre within this distance (mm).
DISC_REACH_MM = 7.5
# Minima closer than this share of the pitch are not two discs.
MIN_DISC_SPACING = 0.6
# Costs of the disc chain (weights are contrasts relative to the strongest discs, 0…1).
DISC_COST = 0.15
SPACING_COST = 4.0
MISSED_DISC_COST = 0.8
# A gap of this many pitches between two discs holds one more; beyond the chain's ends the next
# disc lies this many pitches further.
FILL_GAP = (1.65, 2.5)
FILL_END = (0.75, 1.3)


@dataclass(frozen=True)
class Column:
    """The body column plane by plane (``z_indices`` of the grid) and its disc levels."""

    z_indices: np.ndarray
    x_mm: np.ndarray
    y_mm: np.ndarray
    depth_mm: float
    profile_hu: np.ndarray
    pitch_mm: float
    discs: tuple[float, ...]  # z indices (fractional) of the disc minima, ascending
    body_hu: float
    disc_hu: float

    def centre_at(self, z_index: float) -> tuple[float, float]:
        return (
            float(np.interp(z_index, self.z_indices, self.x_mm)),
            float(np.interp(z_index, self.z_indices, self.y_mm)),
        )


def _body_depth(grid: LpsGrid, canal: CanalTrack) -> float:
    """Median front-to-back depth (mm) of the dense run in front of the canal."""
    sy = grid.spacing_mm[1]
    depths = []
    steps = int(BODY_DEPTH_MM[1] / sy) + 2
    for i in np.flatnonzero(canal.observed):
        z = int(canal.z_indices[i])
        x = round(float(grid.x_index(canal.x_mm[i])))
        y = float(grid.y_index(canal.anterior_y_mm[i]))
        if not 0 <= x < grid.shape[2]:
            continue
        ys = np.round(y - 0.5 - np.arange(steps)).astype(int)
        ys = ys[(ys >= 0) & (ys < grid.shape[1])]
        x0, x1 = max(x - 1, 0), min(x + 2, grid.shape[2])
        line = grid.hu[z, ys, x0:x1].mean(axis=1)
        dense = line > COLUMN_HU
        if len(dense) < 3 or not dense[:3].any():
            continue
        start = int(np.argmax(dense))
        run = np.flatnonzero(~dense[start:])
        length = int(run[0]) if len(run) else len(dense) - start
        depths.append((start + length) * sy)
    if not depths:
        return 30.0
    return float(np.clip(np.median(depths), *BODY_DEPTH_MM))


def _followed_beyond(
    grid: LpsGrid,
    z_indices: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    inside: np.ndarray,
    depth: float,
) -> np.ndarray:
    """``ys`` with the planes beyond the canal's ends (``~inside``) following the body bone.

    Past the canal's ends the column is not straight: the lumbosacral curve takes L5 and the
    sacrum backwards. From each end outwards the centre moves, plane by plane, to the centre
    of the dense bone around the previous plane's centre (a step of at most a few mm).
    """
    sx, _sy, sz = grid.spacing_mm
    ys = ys.copy()
    half_x = max(1, round(0.3 * depth / sx))
    reach = FOLLOW_REACH * depth
    step = FOLLOW_STEP_PER_MM * sz
    observed = np.flatnonzero(inside)
    if not len(observed):
        return ys
    for direction, start in ((-1, int(observed[0])), (1, int(observed[-1]))):
        y = float(ys[start])
        i = start + direction
        while 0 <= i < len(z_indices):
            centre = _body_centre(grid, int(z_indices[i]), float(xs[i]), y, reach, half_x, depth)
            if centre is not None:
                y += float(np.clip(centre - y, -step, step))
            ys[i] = y
            i += direction
    return ys


def _body_centre(
    grid: LpsGrid, z: int, x_mm: float, y_mm: float, reach: float, half_x: int, depth: float
) -> float | None:
    """Middle (y, mm) of the dense run nearest ``y_mm`` on plane ``z``, when it is body-sized."""
    x = round(float(grid.x_index(x_mm)))
    y0 = max(round(float(grid.y_index(y_mm - reach))), 0)
    y1 = min(round(float(grid.y_index(y_mm + reach))) + 1, grid.shape[1])
    if y1 - y0 < 3 or not 0 <= x < grid.shape[2]:
        return None
    line = grid.hu[z, y0:y1, max(x - half_x, 0) : x + half_x + 1].mean(axis=1)
    dense = closing(line > FOLLOW_HU, (3,))
    runs, count = ndimage.label(dense)
    if count == 0:
        return None
    here = float(grid.y_index(y_mm)) - y0
    best, best_distance = None, np.inf
    sy = grid.spacing_mm[1]
    for label in range(1, count + 1):
        rows = np.flatnonzero(runs == label)
        length = (rows[-1] - rows[0] + 1) * sy
        if not FOLLOW_RUN[0] * depth <= length <= FOLLOW_RUN[1] * depth:
            continue
        middle = (rows[0] + rows[-1]) / 2.0
        if abs(middle - here) < best_distance:
            best, best_distance = middle, abs(middle - here)
    return None if best is None else float(grid.y_mm(y0 + best))


def _tilted_profile(
    grid: LpsGrid, z_indices: np.ndarray, xs: np.ndarray, ys: np.ndarray, depth: float
) -> np.ndarray:
    """The column's profile on cross-sections perpendicular to its centre line (sagittal tilt):
    a disc between tilted endplates is then low across the whole section."""
    sx, sy, sz = grid.spacing_mm
    z_mm = grid.z_mm(z_indices.astype(np.float64))
    smooth = max(1.0, TANGENT_SMOOTHING_MM / sz)
    line = ndimage.gaussian_filter1d(ys, smooth, mode="nearest")
    slope = np.gradient(line, z_mm) if len(line) > 1 else np.zeros_like(line)
    angle = np.clip(np.arctan(slope), -MAX_TILT_RAD, MAX_TILT_RAD)
    half_x = max(1, round(0.45 * depth / sx))
    half_y = max(1, round(0.35 * depth / sy))
    # Voxel offsets from the centre voxel: an untilted section is the plane's own voxels.
    u = np.arange(-half_y, half_y + 1, dtype=np.float64)
    v = np.arange(-half_x, half_x + 1, dtype=np.float64)
    uu, vv = np.meshgrid(u, v, indexing="ij")
    # Sagittal normal of the section: per voxel of u, (dy, dz) = (cos a, -sin a) · sy mm.
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    yc = np.round(grid.y_index(ys))[:, None, None]
    xc = np.round(grid.x_index(xs))[:, None, None]
    coords = np.stack(
        np.broadcast_arrays(
            z_indices[:, None, None] - uu[None] * sin * (sy / sz),
            yc + uu[None] * cos,
            xc + vv[None],
        )
    ).astype(np.float64)
    coords = np.round(coords)
    values = ndimage.map_coordinates(grid.hu, coords.reshape(3, -1), order=0, cval=np.nan)
    values = values.reshape(len(z_indices), -1)
    inside = (
        (coords[0] >= 0)
        & (coords[0] <= grid.shape[0] - 1)
        & (coords[1] >= 0)
        & (coords[1] <= grid.shape[1] - 1)
        & (coords[2] >= 0)
        & (coords[2] <= grid.shape[2] - 1)
    ).reshape(len(z_indices), -1)
    values = np.where(inside, values, np.nan)
    profile = np.full(len(z_indices), np.nan)
    for i in range(len(z_indices)):
        row = values[i][np.isfinite(values[i])]
        if row.size:
            profile[i] = float(np.percentile(row, PROFILE_PERCENTILE))
    return profile


def follow_column(grid: LpsGrid, canal: CanalTrack) -> Column:
    """The column in front of ``canal``: its centre line, density profile and discs."""
    sz = grid.spacing_mm[2]
    depth = _body_depth(grid, canal)
    extension = round(EXTENSION_MM / sz)
    first = max(int(canal.z_indices[0]) - extension, 0)
    last = min(int(canal.z_indices[-1]) + extension, grid.shape[0] - 1)
    z_indices = np.arange(first, last + 1)
    xs = np.interp(z_indices, canal.z_indices, canal.x_mm)
    ys = np.interp(z_indices, canal.z_indices, canal.anterior_y_mm) - depth / 2.0
    inside = (z_indices >= canal.z_indices[0]) & (z_indices <= canal.z_indices[-1])
    ys = _followed_beyond(grid, z_indices, ys, xs, inside, depth)
    profile = _tilted_profile(grid, z_indices, xs, ys, depth)
    valid = np.isfinite(profile)
    if not valid.any():
        profile[:] = -1000.0
    else:
        profile = np.interp(z_indices, z_indices[valid], profile[valid])
    smooth = ndimage.gaussian_filter1d(profile, PROFILE_SMOOTHING_MM / sz, mode="nearest")
    discs, pitch, body_hu, disc_hu = _discs(smooth, sz, depth)
    return Column(
        z_indices=z_indices,
        x_mm=xs,
        y_mm=ys,
        depth_mm=depth,
        profile_hu=smooth,
        pitch_mm=pitch,
        discs=tuple(float(z_indices[0] + d) for d in discs),
        body_hu=body_hu,
        disc_hu=disc_hu,
    )


def _local_contrast(profile: np.ndarray, index: int, reach: int) -> float:
    """How far the profile rises within ``reach`` on *both* sides of ``index`` (HU)."""
    left = profile[max(index - reach, 0) : index + 1]
    right = profile[index : index + reach + 1]
    return float(min(left.max(), right.max()) - profile[index])


def _chain(positions: np.ndarray, weights: np.ndarray, pitch: float) -> tuple[float, list[int]]:
    """The best chain of minima for one pitch (in samples): dynamic programming.

    Each minimum taken adds its weight less :data:`DISC_COST`; each step between two taken
    minima costs :data:`SPACING_COST` times its squared relative deviation from the pitch,
    and a step of about two pitches (a disc missed) costs :data:`MISSED_DISC_COST` more.
    """
    count = len(positions)
    value = np.empty(count)
    previous = np.full(count, -1)
    for i in range(count):
        value[i] = weights[i] - DISC_COST
        for j in range(i):
            ratio = (positions[i] - positions[j]) / pitch
            if MIN_DISC_SPACING <= ratio <= 1.5:
                penalty = SPACING_COST * (ratio - 1.0) ** 2
            elif 1.5 < ratio <= 2.4:
                penalty = SPACING_COST * (ratio / 2.0 - 1.0) ** 2 + MISSED_DISC_COST
            else:
                continue
            candidate = value[j] - penalty + weights[i] - DISC_COST
            if candidate > value[i]:
                value[i], previous[i] = candidate, j
    if count == 0:
        return 0.0, []
    end = int(np.argmax(value))
    chain = [end]
    while previous[chain[-1]] >= 0:
        chain.append(int(previous[chain[-1]]))
    return float(value[end]), sorted(chain)


def _fill_in(found: list[float], minima: np.ndarray, pitch: float) -> list[float]:
    """``found`` with the weaker minima the pitch calls for: one in the middle of a gap of
    about two pitches (a disc the chain skipped) and, beyond either end, one about a pitch
    further while there is one (discs without bright endplates beside them are weak)."""
    candidates = [float(m) for m in minima]
    result = list(found)
    for low, high in itertools.pairwise(found):
        if not FILL_GAP[0] <= (high - low) / pitch <= FILL_GAP[1]:
            continue
        inner = [m for m in candidates if 0.3 <= (m - low) / (high - low) <= 0.7]
        if inner:
            result.append(min(inner, key=lambda m: abs(m - (low + high) / 2.0)))
    result.sort()
    for direction in (-1.0, 1.0):
        while True:
            end = result[0] if direction < 0 else result[-1]
            beyond = [
                m for m in candidates if FILL_END[0] <= direction * (m - end) / pitch <= FILL_END[1]
            ]
            if not beyond:
                break
            nearest = min(beyond, key=lambda m: abs(abs(m - end) - pitch))
            if direction < 0:
                result.insert(0, nearest)
            else:
                result.append(nearest)
    return result


def _discs(
    profile: np.ndarray, spacing: float, depth_mm: float
) -> tuple[list[float], float, float, float]:
    """Disc levels (indices into ``profile``), the pitch (mm), typical body and disc HU.

    Candidates are the profile's minima, weighted by how far the profile rises on *both*
    sides within :data:`DISC_REACH_MM` (a disc is thin between two endplates; a lytic lesion
    inside a body is taller). The discs are the chain of candidates that best fits a regular
    pitch, pitch and chain chosen together.
    """
    high = float(np.percentile(profile, 75))
    low = float(np.percentile(profile, 5))
    reach = max(1, math.ceil(DISC_REACH_MM / spacing - 0.2))
    minima = np.asarray(signal.find_peaks(-profile)[0], dtype=int)  # plateaus included
    minima = minima[(minima > 0) & (minima < len(profile) - 1)]
    contrast = np.array([_local_contrast(profile, int(m), reach) for m in minima])
    keep = contrast >= MIN_PROMINENCE_HU
    minima, contrast = minima[keep], contrast[keep]
    found: list[float] = []
    pitch = 30.0
    if len(minima):
        weights = np.clip(contrast / float(np.percentile(contrast, 90)), 0.0, 1.0)
        best: tuple[float, float, list[int]] | None = None
        low_pitch = max(PITCH_MM[0], PITCH_PER_DEPTH[0] * depth_mm)
        high_pitch = max(low_pitch, min(PITCH_MM[1], PITCH_PER_DEPTH[1] * depth_mm))
        for pitch_mm in np.arange(low_pitch, high_pitch + 0.1, 1.0):
            total, chain = _chain(minima.astype(float), weights, float(pitch_mm) / spacing)
            if best is None or total > best[0]:
                best = (total, float(pitch_mm), chain)
        assert best is not None
        _, pitch, chain = best
        found = [float(minima[i]) for i in chain]
        if len(found) >= 2:
            pitch = float(np.median(np.diff(found))) * spacing
            found = _fill_in(found, minima, pitch / spacing)
            pitch = float(np.median(np.diff(found))) * spacing
    disc_hu = float(np.median([profile[int(m)] for m in found])) if found else low
    # The field of view may end inside a disc: its edge then counts as a disc level.
    threshold = (high + disc_hu) / 2.0
    gap = MIN_DISC_SPACING * pitch / spacing
    if profile[0] < threshold and (not found or found[0] >= gap):
        found.insert(0, 0.0)
    end = float(len(profile) - 1)
    if profile[-1] < threshold and (not found or end - found[-1] >= gap):
        found.append(end)
    return found, pitch, high, disc_hu
