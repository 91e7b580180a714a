"""Each vertebral body between two discs: its extent along z, sagittal outline, lateral extent
and a confidence.

Between two disc levels the body runs from endplate to endplate: the planes where the column's
profile stays above halfway between the discs and the body. On the body's mid-sagittal plane
the bone above a threshold (halfway between the body's density and soft tissue) that contains
the body's centre is the body; its front and back edges row by row make the outline polygon.
The lateral extent is that of the same bone on the axial plane through the body's middle, in
front of the canal. The confidence grows with the contrast of body against disc and with how
regular the body is (height against pitch, how well the outline fills its bounding box).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.serving.localiser.canal import CanalTrack
from model.serving.localiser.column import Column
from model.serving.localiser.grid import LpsGrid

SOFT_TISSUE_HU = 30.0
OUTLINE_HU = (60.0, 200.0)
# A body spans this share of the pitch (mm) between its discs.
BODY_SPAN = (0.45, 1.7)
# Contrast (HU, body minus disc) that earns full confidence.
FULL_CONTRAST_HU = 60.0
# A body that ends at the field of view's edge (taken as a disc there because the profile is
# low) must be at least this much denser than that edge: else the edge cuts a body.
EDGE_MIN_CONTRAST_HU = 15.0


@dataclass(frozen=True)
class BodyFinding:
    """One body in LPS millimetres (see :class:`model.serving.localiser.VertebralBody`)."""

    centre_mm: tuple[float, float, float]
    outline_yz_mm: tuple[tuple[float, float], ...]
    x_range_mm: tuple[float, float]
    z_range_mm: tuple[float, float]
    width_mm: float
    confidence: float


def find_bodies(grid: LpsGrid, canal: CanalTrack, column: Column) -> list[BodyFinding]:
    """The bodies between consecutive discs of ``column``, inferior to superior."""
    sz = grid.spacing_mm[2]
    bodies = []
    for low, high in zip(column.discs[:-1], column.discs[1:], strict=True):
        span = (high - low) * sz
        if not BODY_SPAN[0] * column.pitch_mm <= span <= BODY_SPAN[1] * column.pitch_mm:
            continue
        at_edge = low <= column.z_indices[0] or high >= column.z_indices[-1]
        if at_edge:
            _first, _last, body_hu, disc_hu = _endplates(column, low, high)
            if body_hu - disc_hu < EDGE_MIN_CONTRAST_HU:
                continue
        body = _body_between(grid, canal, column, low, high)
        if body is not None:
            bodies.append(body)
    return bodies


def _endplates(column: Column, low: float, high: float) -> tuple[float, float, float, float]:
    """(first, last) body plane between discs at ``low``/``high``, body and disc HU.

    Each disc is a low band: from its minimum the profile is followed outwards until it
    rises above halfway between the disc and the column's typical body density (the median
    of the profile: bodies fill most of the column). The body runs between the two bands, so
    a lesion or a fracture line inside it does not move its endplates.
    """
    profile = column.profile_hu
    start = round(low - column.z_indices[0])
    stop = round(high - column.z_indices[0])
    level = float(np.median(profile))
    limit = max(1, (stop - start) // 3)
    first = _band_edge(profile, start, +1, level, limit)
    last = _band_edge(profile, stop, -1, level, limit)
    if last < first:
        first, last = start + 1, stop - 1
    disc = float(min(profile[start], profile[stop]))
    body = float(np.median(profile[first : last + 1])) if last >= first else level
    offset = float(column.z_indices[0])
    return offset + first, offset + last, body, disc


def _band_edge(profile: np.ndarray, index: int, step: int, level: float, limit: int) -> int:
    """The first plane past the low band around ``index`` (moving by ``step``)."""
    threshold = (float(profile[index]) + level) / 2.0
    i = index
    for _ in range(limit):
        nxt = i + step
        if not 0 <= nxt < len(profile):
            break
        i = nxt
        if profile[i] >= threshold:
            return i
    return i


def _body_between(
    grid: LpsGrid, canal: CanalTrack, column: Column, low: float, high: float
) -> BodyFinding | None:
    _sx, _sy, sz = grid.spacing_mm
    first, last, body_hu, disc_hu = _endplates(column, low, high)
    z_mid = (first + last) / 2.0
    x_mm, y_mm = column.centre_at(z_mid)
    _, _, front_of_canal = canal.at(z_mid)
    depth = column.depth_mm
    xi = round(float(grid.x_index(x_mm)))
    if not 0 <= xi < grid.shape[2]:
        return None
    z0, z1 = int(np.floor(first)), int(np.ceil(last))
    y0 = max(int(np.floor(float(grid.y_index(y_mm - 0.9 * depth)))), 0)
    y1 = min(int(np.ceil(float(grid.y_index(front_of_canal)))), grid.shape[1] - 1)
    if y1 - y0 < 3 or z1 < z0:
        return None
    slab = grid.hu[z0 : z1 + 1, y0 : y1 + 1, max(xi - 1, 0) : xi + 2].mean(axis=2)
    interior = _interior_hu(grid, z_mid, x_mm, y_mm, depth)
    threshold = float(np.clip((interior + SOFT_TISSUE_HU) / 2.0, *OUTLINE_HU))
    mask = ndimage.binary_fill_holes(ndimage.binary_opening(slab > threshold))
    outline = _outline(grid, mask, z0, y0, float(grid.y_index(y_mm)) - y0)
    if outline is None:
        half = depth / 2.0
        polygon: tuple[tuple[float, float], ...] = (
            (y_mm - half, float(grid.z_mm(first - 0.5))),
            (y_mm + half, float(grid.z_mm(first - 0.5))),
            (y_mm + half, float(grid.z_mm(last + 0.5))),
            (y_mm - half, float(grid.z_mm(last + 0.5))),
        )
        fill = 0.5
    else:
        polygon, fill = outline
    ys = [p[0] for p in polygon]
    outline_depth = max(ys) - min(ys)
    # A lesion or a fragment distorts the outline; the column's centre line does not move.
    regular_depth = 0.85 * depth <= outline_depth <= 1.2 * depth
    y_centre = (max(ys) + min(ys)) / 2.0 if regular_depth else y_mm
    x_range = _lateral_extent(grid, round(z_mid), x_mm, y_centre, front_of_canal, threshold)
    if x_range is None:
        x_range = (x_mm - 0.7 * depth, x_mm + 0.7 * depth)
    height = (last - first + 1.0) * sz
    contrast = float(np.clip((body_hu - disc_hu) / FULL_CONTRAST_HU, 0.0, 1.0))
    ratio = height / column.pitch_mm
    regular = float(np.clip(1.0 - abs(ratio - 0.75) / 0.5, 0.0, 1.0))
    confidence = float(np.clip(0.5 * contrast + 0.25 * regular + 0.25 * fill, 0.0, 1.0))
    zs = [p[1] for p in polygon]
    return BodyFinding(
        centre_mm=((x_range[0] + x_range[1]) / 2.0, y_centre, (min(zs) + max(zs)) / 2.0),
        outline_yz_mm=polygon,
        x_range_mm=x_range,
        z_range_mm=(min(zs), max(zs)),
        width_mm=x_range[1] - x_range[0],
        confidence=round(confidence, 3),
    )


def _interior_hu(grid: LpsGrid, z_mid: float, x_mm: float, y_mm: float, depth: float) -> float:
    sx, sy, sz = grid.spacing_mm
    z = round(z_mid)
    x = round(float(grid.x_index(x_mm)))
    y = round(float(grid.y_index(y_mm)))
    hz, hy, hx = max(0, round(4.0 / sz)), max(1, round(0.2 * depth / sy)), max(1, round(6.0 / sx))
    patch = grid.hu[
        max(z - hz, 0) : z + hz + 1, max(y - hy, 0) : y + hy + 1, max(x - hx, 0) : x + hx + 1
    ]
    return float(np.median(patch)) if patch.size else 150.0


def _outline(
    grid: LpsGrid, mask: np.ndarray, z0: int, y0: int, y_centre: float
) -> tuple[tuple[tuple[float, float], ...], float] | None:
    """The outline polygon (y, z) of the body in ``mask`` (rows z, columns y) and its fill."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    middle_row = mask.shape[0] // 2
    column = int(np.clip(round(y_centre), 0, mask.shape[1] - 1))
    label = int(labels[middle_row, column])
    if label == 0:
        sizes = np.bincount(labels.ravel())[1:]
        label = int(np.argmax(sizes)) + 1
    body = labels == label
    rows = np.flatnonzero(body.any(axis=1))
    if len(rows) < 2:
        return None
    front, back, zs = [], [], []
    for r in rows:
        columns = np.flatnonzero(body[r])
        front.append(float(grid.y_mm(y0 + columns[0] - 0.5)))
        back.append(float(grid.y_mm(y0 + columns[-1] + 0.5)))
        zs.append(float(grid.z_mm(float(z0 + r))))
    half = grid.spacing_mm[2] / 2.0
    zs[0] -= half
    zs[-1] += half
    polygon = [(y, z) for y, z in zip(front, zs, strict=True)]
    polygon += [(y, z) for y, z in zip(reversed(back), reversed(zs), strict=True)]
    area = float(body.sum())
    box = float(len(rows) * (body.any(axis=0).sum()))
    if max(back) - min(front) < 4.0:
        return None
    return tuple(polygon), area / max(box, 1.0)


def _lateral_extent(
    grid: LpsGrid, z: int, x_mm: float, y_mm: float, front_of_canal: float, threshold: float
) -> tuple[float, float] | None:
    """(min x, max x) of the body's bone on plane ``z``, in front of the canal."""
    y1 = min(int(np.floor(float(grid.y_index(front_of_canal)))), grid.shape[1] - 1)
    if not 0 <= z < grid.shape[0] or y1 < 2:
        return None
    plane = grid.hu[z, : y1 + 1, :] > threshold
    plane = ndimage.binary_fill_holes(ndimage.binary_opening(plane))
    labels, _ = ndimage.label(plane)
    x = round(float(grid.x_index(x_mm)))
    y = round(float(grid.y_index(y_mm)))
    if not (0 <= x < plane.shape[1] and 0 <= y < plane.shape[0]) or labels[y, x] == 0:
        return None
    columns = np.flatnonzero((labels == labels[y, x]).any(axis=0))
    return (float(grid.x_mm(columns[0] - 0.5)), float(grid.x_mm(columns[-1] + 0.5)))
