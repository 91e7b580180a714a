"""Vertebra labels, given only when the count has an anchor: the sacrum.

Below the lowest disc of the column the sacrum is wide: its alae spread far beyond a lumbar
body on either side. When the bone in front of the canal (moved backwards with the column's
curve), on several planes just below that disc, is much wider than the bodies above, the disc
is L5/S1, the body above it L5, and the bodies above are counted upwards (L4 … L1, T12 …) as
long as no disc is missing between them. Without the anchor every label is None: a count from
an arbitrary top or bottom is not a label.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from model.serving.localiser.bodies import BodyFinding
from model.serving.localiser.canal import CanalTrack
from model.serving.localiser.column import Column
from model.serving.localiser.grid import LpsGrid
from model.serving.localiser.morphology import closing

VERTEBRA_LABELS = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "S1",
)
SACRUM_BONE_HU = 150.0
# The sacrum is at least this many times as wide as the bodies above it.
SACRUM_WIDTH_RATIO = 1.8
# Planes below the L5/S1 disc where the sacrum is looked for (share of the pitch).
SACRUM_REACH = (0.25, 0.8)
# The alae are tall: wide bone on at least this many of those planes (one wide plane may be a
# process or the field of view's edge).
SACRUM_MIN_PLANES = 2
# Neighbouring bodies further apart than this (share of the pitch) break the count.
MAX_GAP = 1.5


def sacrum_below(
    grid: LpsGrid, canal: CanalTrack, column: Column, bodies: list[BodyFinding]
) -> bool:
    """Whether the lowest disc of ``column`` sits on a sacrum."""
    if not bodies or len(column.discs) < 2:
        return False
    disc = column.discs[0]
    if disc <= column.z_indices[0] + 0.5:  # the field of view ends in that disc
        return False
    sz = grid.spacing_mm[2]
    width = float(np.median([b.width_mm for b in bodies]))
    planes = {
        round(disc - offset * column.pitch_mm / sz)
        for offset in np.arange(SACRUM_REACH[0], SACRUM_REACH[1], 0.1)
    }
    wide = [
        z
        for z in sorted(planes)
        if 0 <= z < grid.shape[0]
        and _bone_width(grid, canal, column, z) >= SACRUM_WIDTH_RATIO * width
    ]
    return len(wide) >= SACRUM_MIN_PLANES


def _bone_width(grid: LpsGrid, canal: CanalTrack, column: Column, z: int) -> float:
    """Lateral width (mm) of the bone around the column's centre on plane ``z``."""
    x_mm, y_mm = column.centre_at(float(z))
    # The back of the body: the canal's front edge, moved with the column beyond the canal's
    # ends (the column curves backwards into the sacrum).
    _, _, front = canal.at(float(z))
    end = float(np.clip(z, canal.z_indices[0], canal.z_indices[-1]))
    front += y_mm - column.centre_at(end)[1]
    y0 = max(round(float(grid.y_index(y_mm - column.depth_mm))), 0)
    y1 = min(round(float(grid.y_index(front - 0.15 * column.depth_mm))), grid.shape[1] - 1)
    if y1 <= y0:
        return 0.0
    plane = grid.hu[z, y0 : y1 + 1, :] > SACRUM_BONE_HU
    plane = closing(plane, (3, 3))
    labels, _ = ndimage.label(plane)
    x = round(float(grid.x_index(x_mm)))
    y = round(float(grid.y_index(y_mm))) - y0
    if not (0 <= x < plane.shape[1] and 0 <= y < plane.shape[0]):
        return 0.0
    window = labels[max(y - 2, 0) : y + 3, max(x - 2, 0) : x + 3]
    hits = window[window > 0]
    if hits.size == 0:
        return 0.0
    columns = np.flatnonzero((labels == np.bincount(hits).argmax()).any(axis=0))
    return float(len(columns) * grid.spacing_mm[0])


def assign_labels(
    bodies: list[BodyFinding], pitch_mm: float, anchored_on_sacrum: bool
) -> list[str | None]:
    """Labels of ``bodies`` (inferior to superior): L5 upwards when anchored, else None."""
    labels: list[str | None] = [None] * len(bodies)
    if not anchored_on_sacrum or not bodies:
        return labels
    position = VERTEBRA_LABELS.index("L5")
    for i, body in enumerate(bodies):
        if i > 0:
            gap = body.centre_mm[2] - bodies[i - 1].centre_mm[2]
            if gap > MAX_GAP * pitch_mm:
                break
        if position < 0:
            break
        labels[i] = VERTEBRA_LABELS[position]
        position -= 1
    return labels
