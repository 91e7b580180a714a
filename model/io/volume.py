"""One CT series → a volume in Hounsfield units with its geometry in patient coordinates.

Slices are sorted by their position along the slice normal (ImagePositionPatient · normal),
never by Instance Number. The whole series' geometry is validated from the headers alone
(non-uniform spacing, gantry tilt, mixed orientations, duplicate positions and missing slices
each raise their own :class:`SeriesError`); pixel data is then decoded only for the slices —
and, where the codec allows, only the part of each slice — that a region of interest needs.

Index convention: ``voxels[k, r, c]`` is slice ``k`` (along ``slice_direction``), row ``r``
(along ``column_direction``, DICOM's column cosine) and column ``c`` (along
``row_direction``, DICOM's row cosine). ``spacing`` is ``(slice, row, column)`` in mm, where
row spacing is the distance between rows. ``slice_direction`` is row × column direction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from model.io.headers import (
    DuplicatePositionError,
    EmptySeriesError,
    FrameHeader,
    GantryTiltError,
    InconsistentImageError,
    MissingSliceError,
    MixedOrientationError,
    MixedSeriesError,
    NonUniformSpacingError,
    SeriesError,
    UnreadableSliceError,
    group_paths_by_series,
    read_frame_headers,
    read_headers,
)
from model.io.pixels import FrameRequest, decode_block_sums, decode_frames

__all__ = [
    "DuplicatePositionError",
    "EmptySeriesError",
    "GantryTiltError",
    "InconsistentImageError",
    "MissingSliceError",
    "MixedOrientationError",
    "MixedSeriesError",
    "NonUniformSpacingError",
    "PatientBox",
    "RegionOutsideSeriesError",
    "SeriesError",
    "SeriesGeometry",
    "UnreadableSliceError",
    "Volume",
    "group_paths_by_series",
    "load_series",
    "load_volume",
    "read_headers",
    "read_series_geometry",
]

logger = logging.getLogger(__name__)

_ORIENTATION_TOLERANCE = 1e-4
_DUPLICATE_TOLERANCE_MM = 0.01
_SPACING_TOLERANCE_MM = 0.01
_SPACING_TOLERANCE_FRACTION = 0.02
_TILT_TOLERANCE_MM = 0.02
_TILT_TOLERANCE_SLOPE = 1e-3  # ≈ 0.06°


class RegionOutsideSeriesError(SeriesError):
    """A region asked for lies entirely outside the series."""


@dataclass(frozen=True)
class SeriesGeometry:
    """A validated series: its frames sorted along the normal, and the grid they form."""

    frames: tuple[FrameHeader, ...]
    origin: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]

    def index_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        return _index_to_patient(self, ijk)

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        return _patient_to_index(self, xyz)


@dataclass(frozen=True)
class Volume:
    """A CT volume in HU on a regular grid in patient coordinates (LPS, mm).

    When loaded for an ROI the volume may hold only part of the series;
    ``source_shape`` and ``source_offset`` then say where it lies in the whole series
    (``source_offset`` is the (slice, row, column) index of ``voxels[0, 0, 0]``).
    """

    voxels: np.ndarray
    origin: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    slice_direction: np.ndarray
    spacing: tuple[float, float, float]
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    source_shape: tuple[int, int, int] | None = None
    source_offset: tuple[int, int, int] = field(default=(0, 0, 0))

    @property
    def shape(self) -> tuple[int, int, int]:
        n, rows, columns = self.voxels.shape
        return (int(n), int(rows), int(columns))

    @property
    def is_partial(self) -> bool:
        return self.source_shape is not None and self.source_shape != self.shape

    def index_to_patient(self, ijk: np.ndarray) -> np.ndarray:
        """(…, 3) array of (slice, row, column) indices → (…, 3) LPS positions in mm."""
        return _index_to_patient(self, ijk)

    def patient_to_index(self, xyz: np.ndarray) -> np.ndarray:
        """(…, 3) LPS positions in mm → (…, 3) fractional (slice, row, column) indices."""
        return _patient_to_index(self, xyz)


def _axes(grid: Volume | SeriesGeometry) -> np.ndarray:
    """3×3 matrix whose columns are the patient-space steps of one index along each axis."""
    s, r, c = grid.spacing
    return np.stack(
        [grid.slice_direction * s, grid.column_direction * r, grid.row_direction * c], axis=1
    )


def _index_to_patient(grid: Volume | SeriesGeometry, ijk: np.ndarray) -> np.ndarray:
    ijk = np.asarray(ijk, dtype=np.float64)
    return np.asarray(grid.origin + ijk @ _axes(grid).T)


def _patient_to_index(grid: Volume | SeriesGeometry, xyz: np.ndarray) -> np.ndarray:
    xyz = np.asarray(xyz, dtype=np.float64)
    inverse = np.linalg.inv(_axes(grid))
    return np.asarray((xyz - grid.origin) @ inverse.T)


def _check_same(frames: Sequence[FrameHeader]) -> None:
    first = frames[0]
    series = {f.series_instance_uid for f in frames}
    if len(series) > 1:
        raise MixedSeriesError(
            f"files belong to {len(series)} series ({', '.join(sorted(series))}); "
            "load one series at a time"
        )
    for attribute, label in (
        ("study_instance_uid", "Study Instance UID"),
        ("frame_of_reference_uid", "Frame of Reference UID"),
    ):
        values = {getattr(f, attribute) for f in frames}
        if len(values) > 1:
            raise MixedSeriesError(f"series {first.series_instance_uid}: several {label}s")
    for f in frames:
        if (f.rows, f.columns) != (first.rows, first.columns):
            raise InconsistentImageError(
                f"{f.describe()}: {f.rows}×{f.columns} pixels, "
                f"other slices {first.rows}×{first.columns}"
            )
        if not np.allclose(f.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise InconsistentImageError(
                f"{f.describe()}: Pixel Spacing {list(f.pixel_spacing)}, "
                f"other slices {list(first.pixel_spacing)}"
            )
        if not np.allclose(f.orientation, first.orientation, atol=_ORIENTATION_TOLERANCE):
            raise MixedOrientationError(
                f"{f.describe()}: Image Orientation (Patient) {list(f.orientation)} differs "
                f"from {list(first.orientation)}"
            )
    if min(first.pixel_spacing) <= 0:
        raise InconsistentImageError(
            f"{first.describe()}: Pixel Spacing {list(first.pixel_spacing)} is not positive"
        )
    row, column = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:])
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(column) - 1) > 1e-3
        or abs(float(row @ column)) > 1e-3
    ):
        raise MixedOrientationError(
            f"series {first.series_instance_uid}: Image Orientation (Patient) "
            f"{list(first.orientation)} is not a pair of orthogonal unit vectors"
        )


def _slice_spacing(
    frames: Sequence[FrameHeader], distances: np.ndarray, normal: np.ndarray
) -> float:
    """Validate positions along the normal and return the (uniform) slice spacing."""
    first = frames[0]
    if len(frames) == 1:
        thickness = first.spacing_between_slices or first.slice_thickness
        if not thickness or thickness <= 0:
            raise NonUniformSpacingError(
                f"{first.describe()}: a single slice without Slice Thickness or Spacing "
                "Between Slices has no slice spacing"
            )
        return float(thickness)
    steps = np.diff(distances)
    for i, step in enumerate(steps):
        if step < _DUPLICATE_TOLERANCE_MM:
            raise DuplicatePositionError(
                f"{frames[i].describe()} and {frames[i + 1].describe()} lie at the same "
                f"position along the slice normal ({distances[i]:.3f} mm)"
            )
    origin = np.asarray(first.position)
    for f, distance in zip(frames, distances, strict=True):
        offset = np.asarray(f.position) - origin
        lateral = float(np.linalg.norm(offset - (offset @ normal) * normal))
        along = abs(float(distance - distances[0]))
        if lateral > _TILT_TOLERANCE_MM + _TILT_TOLERANCE_SLOPE * along:
            angle = float(np.degrees(np.arctan2(lateral, along)))
            raise GantryTiltError(
                f"series {first.series_instance_uid}: slice positions are not along the slice "
                f"normal ({f.describe()} is {lateral:.2f} mm off it, a tilt of about "
                f"{angle:.1f}°); gantry-tilted series are not supported"
            )
    spacing = float(np.median(steps))
    tolerance = max(_SPACING_TOLERANCE_MM, _SPACING_TOLERANCE_FRACTION * spacing)
    for i, step in enumerate(steps):
        if abs(step - spacing) <= tolerance:
            continue
        ratio = step / spacing
        missing = round(ratio) - 1
        if missing >= 1 and abs(step - round(ratio) * spacing) <= tolerance * round(ratio):
            raise MissingSliceError(
                f"series {first.series_instance_uid}: {missing} slice(s) missing between "
                f"{distances[i]:.2f} mm and {distances[i + 1]:.2f} mm along the normal "
                f"(spacing {spacing:.3f} mm)"
            )
        raise NonUniformSpacingError(
            f"series {first.series_instance_uid}: slice spacing {step:.3f} mm between "
            f"{distances[i]:.2f} mm and {distances[i + 1]:.2f} mm along the normal, "
            f"elsewhere {spacing:.3f} mm"
        )
    return spacing


def validate_geometry(frames: Sequence[FrameHeader]) -> SeriesGeometry:
    """Sort frames along the slice normal and validate the grid they form."""
    if not frames:
        raise EmptySeriesError("no image slices to load")
    _check_same(frames)
    first = frames[0]
    row = np.asarray(first.orientation[:3], dtype=np.float64)
    column = np.asarray(first.orientation[3:], dtype=np.float64)
    row /= np.linalg.norm(row)
    column /= np.linalg.norm(column)
    normal = np.cross(row, column)
    distances = np.array([np.asarray(f.position) @ normal for f in frames])
    order = np.argsort(distances, kind="stable")
    sorted_frames = tuple(frames[i] for i in order)
    sorted_distances = distances[order]
    slice_spacing = _slice_spacing(sorted_frames, sorted_distances, normal)
    row_spacing, column_spacing = first.pixel_spacing
    return SeriesGeometry(
        frames=sorted_frames,
        origin=np.asarray(sorted_frames[0].position, dtype=np.float64),
        row_direction=row,
        column_direction=column,
        slice_direction=normal,
        spacing=(slice_spacing, float(row_spacing), float(column_spacing)),
        shape=(len(sorted_frames), first.rows, first.columns),
    )


def read_series_geometry(
    paths: Sequence[Path], datasets: Sequence[Dataset] | None = None
) -> SeriesGeometry:
    """The validated geometry of one series from the headers of all its files (read here,
    or ``datasets``: the headers already read, in ``paths``' order)."""
    return validate_geometry(read_frame_headers(paths, datasets))


@dataclass(frozen=True)
class PatientBox:
    """An axis-aligned box in patient coordinates (LPS, mm): the part of a series to decode."""

    x_mm: tuple[float, float]
    y_mm: tuple[float, float]
    z_mm: tuple[float, float]

    def describe(self) -> str:
        return ", ".join(
            f"{axis} {low:.1f}..{high:.1f} mm"
            for axis, (low, high) in zip("xyz", (self.x_mm, self.y_mm, self.z_mm), strict=True)
        )


def region_index_bounds(
    geometry: SeriesGeometry, region: PatientBox
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Inclusive (start, stop) index ranges per axis of the voxels ``region`` needs: those
    inside it and those around it (for interpolation), clipped to the series."""
    corners = np.array([[x, y, z] for x in region.x_mm for y in region.y_mm for z in region.z_mm])
    indices = geometry.patient_to_index(corners)
    low = np.floor(indices.min(axis=0) - 1e-6).astype(int)
    high = np.ceil(indices.max(axis=0) + 1e-6).astype(int)
    bounds = []
    for axis in range(3):
        size = geometry.shape[axis]
        start, stop = max(int(low[axis]), 0), min(int(high[axis]), size - 1)
        if start > stop:
            raise RegionOutsideSeriesError(
                f"region ({region.describe()}) lies entirely outside series "
                f"{geometry.frames[0].series_instance_uid}"
            )
        bounds.append((start, stop))
    return (bounds[0], bounds[1], bounds[2])


def load_series(
    paths: Sequence[Path], *, region: PatientBox | None = None, workers: int | None = None
) -> Volume:
    """Read the headers of one CT series (classic CT or Enhanced CT multi-frame), validate its
    geometry and load it as a :class:`Volume` (see :func:`load_volume`)."""
    return load_volume(read_series_geometry(paths), region=region, workers=workers)


def _volume_of(
    geometry: SeriesGeometry,
    voxels: np.ndarray,
    *,
    first_index: Sequence[float] | np.ndarray,
    scale: tuple[int, int, int],
    frames: Sequence[FrameHeader],
    source_shape: tuple[int, int, int] | None = None,
    source_offset: tuple[int, int, int] = (0, 0, 0),
) -> Volume:
    """``voxels`` as a :class:`Volume` of ``geometry``'s series: its first sample at the
    (fractional) series index ``first_index``, ``scale`` source voxels per sample along each
    axis, decoded from ``frames``."""
    first = geometry.frames[0]
    s, r, c = geometry.spacing
    return Volume(
        voxels=voxels,
        origin=geometry.index_to_patient(np.asarray(first_index, dtype=np.float64)),
        row_direction=geometry.row_direction,
        column_direction=geometry.column_direction,
        slice_direction=geometry.slice_direction,
        spacing=(s * scale[0], r * scale[1], c * scale[2]),
        series_instance_uid=first.series_instance_uid,
        study_instance_uid=first.study_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        sop_instance_uids=tuple(frame.sop_instance_uid for frame in frames),
        source_shape=source_shape,
        source_offset=source_offset,
    )


def _overview(
    geometry: SeriesGeometry, reduce: int, slice_step: int, workers: int | None
) -> Volume:
    if not 0 <= reduce <= 5:
        raise ValueError(f"reduce: expected 0..5, got {reduce}")
    if slice_step < 1:
        raise ValueError(f"slice_step: expected 1 or more, got {slice_step}")
    _, rows, columns = geometry.shape
    frames = geometry.frames[::slice_step]
    requests = [
        FrameRequest(header=frame, rows=(0, rows), columns=(0, columns), reduce=reduce)
        for frame in frames
    ]
    voxels = decode_frames(requests, workers=workers)
    step = 1 << reduce
    centre = (step - 1) / 2.0  # a reduced sample stands for its block (both decode paths)
    return _volume_of(
        geometry,
        voxels,
        first_index=(0.0, centre, centre),
        scale=(slice_step, step, step),
        frames=frames,
    )


def load_binned(
    geometry: SeriesGeometry,
    bins: tuple[int, int, int],
    start: tuple[int, int, int] = (0, 0, 0),
) -> Volume:
    """The series averaged over blocks of ``bins`` (slices, rows, columns), the first block
    at index ``start``; what is left of an axis beyond its last whole block is dropped.

    A coarse overview of the whole series without holding it at full resolution: each slice
    is read (uncompressed ones straight from the file, :func:`model.io.pixels.read_native_rows`)
    and summed into its block at once, so the memory is the overview's. A sample stands at
    the centre of its block; ``sop_instance_uids`` names every slice that went into it."""
    counts = [
        (size - first) // step
        for size, first, step in zip(geometry.shape, start, bins, strict=True)
    ]
    if min(bins) < 1 or min(start) < 0 or min(counts) < 1:
        raise ValueError(f"bins {bins} from {start} do not fit a series of shape {geometry.shape}")
    (k0, r0, c0), (kb, rb, cb) = start, bins
    output = np.zeros(counts, dtype=np.float64)
    frames = geometry.frames[k0 : k0 + counts[0] * kb]
    for index, frame in enumerate(frames):
        request = FrameRequest(
            header=frame,
            rows=(r0, r0 + counts[1] * rb),
            columns=(c0, c0 + counts[2] * cb),
        )
        output[index // kb] += decode_block_sums(request, (rb, cb))
    voxels = (output / (kb * rb * cb)).astype(np.float32)
    centre = np.array(start, dtype=np.float64) + (np.array(bins, dtype=np.float64) - 1.0) / 2.0
    return _volume_of(geometry, voxels, first_index=centre, scale=bins, frames=frames)


def load_volume(
    geometry: SeriesGeometry,
    *,
    region: PatientBox | None = None,
    workers: int | None = None,
    reduce: int = 0,
    slice_step: int = 1,
) -> Volume:
    """Decode a validated series as a :class:`Volume` (its headers are not read again).

    With ``region``, only the slices the region crosses are decoded, and of each slice only
    the rows and columns it needs where the codec allows (JPEG 2000): the result is then a
    partial volume. ``workers`` bounds the threads used to decode compressed slices (default:
    the CPU count).

    ``reduce`` > 0 gives an overview of the whole series at 1/2^reduce resolution in plane
    (every slice kept): JPEG 2000 decodes it directly, several times faster than the whole
    image; other codecs decode whole frames and average 2^reduce × 2^reduce blocks. Spacing
    and origin are those of the reduced grid: a sample stands at the centre of its block.
    ``slice_step`` > 1 keeps only every ``slice_step``-th slice of the overview (from the
    first), for a coarse grid that does not need every thin slice.
    """
    if reduce or slice_step != 1:
        if region is not None:
            raise ValueError("an overview (reduce > 0) is of the whole series, not of a region")
        return _overview(geometry, reduce, slice_step, workers)
    first = geometry.frames[0]
    n, rows, columns = geometry.shape
    if region is None:
        bounds = ((0, n - 1), (0, rows - 1), (0, columns - 1))
    else:
        bounds = region_index_bounds(geometry, region)
    (k0, k1), (r0, r1), (c0, c1) = bounds
    requests = [
        FrameRequest(header=geometry.frames[k], rows=(r0, r1 + 1), columns=(c0, c1 + 1))
        for k in range(k0, k1 + 1)
    ]
    voxels = decode_frames(requests, workers=workers)
    logger.debug(
        "series %s: decoded %d of %d slices, rows %d-%d, columns %d-%d",
        first.series_instance_uid,
        len(requests),
        n,
        r0,
        r1,
        c0,
        c1,
    )
    offset = (k0, r0, c0)
    return _volume_of(
        geometry,
        voxels,
        first_index=offset,
        scale=(1, 1, 1),
        frames=[r.header for r in requests],
        source_shape=geometry.shape,
        source_offset=offset,
    )
