"""ROI → network inputs, exactly as ``METHOD.md`` specifies. Shared by training and serving.

For each lateral slice position x of the ROI, one float32 tensor of shape 3×64×64:

- channel k ∈ {0, 1, 2} is a sagittal slab of ``slab_thickness_mm`` (3 mm) centred at
  x + (k − 1)·``channel_spacing_mm`` (3 mm): channel 0 lies toward the patient's right
  (smaller LPS x), channel 2 toward the left;
- a slab's value is the mean of ``samples_per_slab`` trilinear samples of the volume (HU)
  spread evenly across its thickness (midpoint rule);
- the 64×64 grid spans the ROI's square box with samples at the cell centres: row 0 is the most
  superior (largest z), column 0 the most anterior (smallest y);
- the whole tensor is z-scored (one mean, one SD over all three channels).

Sampling that reaches outside the series (beyond half a voxel past its edge) raises
:class:`RoiOutsideVolumeError` instead of sampling air.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from model.io.volume import (
    MixedSeriesError,
    PatientBox,
    RegionOutsideSeriesError,
    SeriesError,
    SeriesGeometry,
    Volume,
    load_volume,
    read_series_geometry,
)
from model.serving.roi import Roi

__all__ = [
    "PREPROCESSING_METHOD",
    "PreprocessParams",
    "PreprocessParamsError",
    "RoiOutsideVolumeError",
    "build_inputs",
    "load_roi_volume",
    "roi_region",
    "sagittal_slab",
    "sampling_points",
]

PREPROCESSING_METHOD = "li2021-sagittal-slabs"
_AXIS_NAMES = ("slice", "row", "column")


# How far (mm) the sampling slabs reach to either side of an ROI slice position with the
# default preprocessing (channel spacing 3 mm + half a 3 mm slab); see PreprocessParams.
DEFAULT_LATERAL_REACH_MM = 4.5


class PreprocessParamsError(ValueError):
    """Preprocessing parameters are invalid or do not match what this code implements."""


class RoiOutsideVolumeError(SeriesError):
    """The ROI (box, slabs) reaches outside the volume: an error, never a crop of air."""


@dataclass(frozen=True)
class PreprocessParams:
    """The preprocessing a checkpoint was trained with; travels inside the checkpoint."""

    input_size: int = 64
    channels: int = 3
    slab_thickness_mm: float = 3.0
    channel_spacing_mm: float = 3.0
    samples_per_slab: int = 7
    method: str = PREPROCESSING_METHOD

    def __post_init__(self) -> None:
        if self.method != PREPROCESSING_METHOD:
            raise PreprocessParamsError(
                f"method: {self.method!r} is not implemented here ({PREPROCESSING_METHOD!r} is)"
            )
        for name in ("input_size", "channels", "samples_per_slab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PreprocessParamsError(f"{name}: expected a positive integer, got {value!r}")
        if self.channels % 2 != 1:
            raise PreprocessParamsError(f"channels: expected an odd number, got {self.channels}")
        for name in ("slab_thickness_mm", "channel_spacing_mm"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise PreprocessParamsError(f"{name}: expected a positive number, got {value!r}")

    @property
    def lateral_reach_mm(self) -> float:
        """How far (mm) the slabs reach to either side of a slice position."""
        return self.channel_spacing_mm * (self.channels // 2) + self.slab_thickness_mm / 2.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PreprocessParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PreprocessParamsError(
                f"unknown preprocessing parameter(s) {', '.join(unknown)}: this checkpoint was "
                "made by a newer or different preprocessing"
            )
        missing = sorted(known - set(data))
        if missing:
            raise PreprocessParamsError(f"missing preprocessing parameter(s): {', '.join(missing)}")
        return cls(**dict(data))


def roi_region(
    roi: Roi,
    *,
    lateral_reach_mm: float = DEFAULT_LATERAL_REACH_MM,
    margin_mm: float = 0.0,
) -> PatientBox:
    """The region of the series an ROI samples: its square box in (y, z) and its slice
    positions ± the slabs' lateral reach in x, all widened by ``margin_mm``."""
    box = roi.square_box_yz()
    reach = lateral_reach_mm + margin_mm
    return PatientBox(
        x_mm=(min(roi.slices_x_mm) - reach, max(roi.slices_x_mm) + reach),
        y_mm=(box.y_range[0] - margin_mm, box.y_range[1] + margin_mm),
        z_mm=(box.z_range[0] - margin_mm, box.z_range[1] + margin_mm),
    )


def load_roi_volume(
    series: Sequence[Path] | SeriesGeometry,
    roi: Roi,
    *,
    lateral_reach_mm: float = DEFAULT_LATERAL_REACH_MM,
    margin_mm: float = 0.0,
    workers: int | None = None,
) -> Volume:
    """The part of a series an ROI needs (:func:`roi_region`), decoded; the whole series'
    geometry is validated first (from ``series``' headers, or the geometry already read)."""
    geometry = series if isinstance(series, SeriesGeometry) else read_series_geometry(series)
    first = geometry.frames[0]
    if roi.series_instance_uid != first.series_instance_uid:
        raise MixedSeriesError(
            f"ROI names series {roi.series_instance_uid}, files are series "
            f"{first.series_instance_uid}"
        )
    region = roi_region(roi, lateral_reach_mm=lateral_reach_mm, margin_mm=margin_mm)
    try:
        return load_volume(geometry, region=region, workers=workers)
    except RegionOutsideSeriesError as exc:
        box = roi.square_box_yz()
        raise RoiOutsideVolumeError(
            f"ROI (box centre y={box.center_y:.1f}, z={box.center_z:.1f} mm, slices x="
            f"{list(roi.slices_x_mm)} mm) lies entirely outside series "
            f"{first.series_instance_uid}"
        ) from exc


def _grid_offsets(params: PreprocessParams, side: float) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dz) offsets from the box centre of the 64×64 cell centres, each (size, size)."""
    n = params.input_size
    centres = (np.arange(n, dtype=np.float64) + 0.5) / n * side - side / 2.0
    dz, dy = np.meshgrid(-centres, centres, indexing="ij")  # row → z downward, column → y
    return dy, dz


def sampling_points(
    roi: Roi, params: PreprocessParams, transform: np.ndarray | None = None
) -> np.ndarray:
    """LPS positions (mm) sampled for an ROI: shape (slices, channels, samples, size, size, 3)."""
    x, y, z = _sampling_parts(roi, params, transform)
    size = params.input_size
    points = np.empty((*x.shape, size, size, 3), dtype=np.float64)
    points[..., 0] = x[..., None, None]
    points[..., 1] = y
    points[..., 2] = z
    return points


def _sampling_parts(
    roi: Roi, params: PreprocessParams, transform: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`sampling_points` as its separable parts: x (mm) over (slices, channels,
    samples), y and z (mm) over the (size, size) grid."""
    box = roi.square_box_yz()
    dy, dz = _grid_offsets(params, box.side)
    if transform is not None:
        matrix = np.asarray(transform, dtype=np.float64)
        if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
            raise ValueError("transform: expected a finite 3×3 affine matrix in the (y, z) plane")
        homogeneous = np.stack([dy, dz, np.ones_like(dy)], axis=-1) @ matrix.T
        dy, dz = homogeneous[..., 0], homogeneous[..., 1]
    half = params.channels // 2
    channel_offsets = (np.arange(params.channels) - half) * params.channel_spacing_mm
    slab_offsets = _slab_offsets(params)
    xs = np.asarray(roi.slices_x_mm, dtype=np.float64)
    x = xs[:, None, None] + channel_offsets[None, :, None] + slab_offsets[None, None, :]
    return x, box.center_y + dy, box.center_z + dz


def _slab_offsets(params: PreprocessParams) -> np.ndarray:
    """Lateral offsets (mm) of a slab's samples from its centre (midpoint rule)."""
    s = params.samples_per_slab
    return ((np.arange(s) + 0.5) / s - 0.5) * params.slab_thickness_mm


def sagittal_slab(
    volume: Volume,
    x_mm: float,
    y_mm: np.ndarray,
    z_mm: np.ndarray,
    params: PreprocessParams | None = None,
    *,
    outside_value: float = -1024.0,
) -> np.ndarray:
    """The sagittal slab centred at ``x_mm`` (the middle channel of :func:`build_inputs` at
    that slice position, before z-scoring), sampled at the (y, z) positions ``y_mm``,
    ``z_mm`` (arrays of one shape) and returned in HU (float32, that shape).

    Same slab, same samples across its thickness, same trilinear interpolation as the network
    inputs, so a review image made from it shows what the model saw. A position whose slab
    reaches outside the volume (more than half a voxel past its edge) gets ``outside_value``.
    """
    params = params or PreprocessParams()
    y = np.asarray(y_mm, dtype=np.float64)
    z = np.asarray(z_mm, dtype=np.float64)
    if y.shape != z.shape:
        raise ValueError("y_mm and z_mm must have one shape")
    offsets = _slab_offsets(params)
    points = np.empty((len(offsets), *y.shape, 3), dtype=np.float64)
    points[..., 0] = (x_mm + offsets).reshape((-1,) + (1,) * y.ndim)
    points[..., 1] = y
    points[..., 2] = z
    indices = volume.patient_to_index(points)
    limits = np.array(volume.shape, dtype=np.float64) - 0.5
    inside = np.all((indices >= -0.5 - 1e-6) & (indices <= limits + 1e-6), axis=-1).all(axis=0)
    slab = _trilinear(volume.voxels, indices).mean(axis=0, dtype=np.float64)
    return np.where(inside, slab, outside_value).astype(np.float32)


def _check_inside(volume: Volume, indices: np.ndarray) -> None:
    shape = volume.shape
    source_shape = volume.source_shape or shape
    offset = volume.source_offset
    low = [float(indices[..., axis].min()) for axis in range(3)]
    high = [float(indices[..., axis].max()) for axis in range(3)]
    for axis in range(3):
        at_start = offset[axis] == 0
        at_end = offset[axis] + shape[axis] == source_shape[axis]
        lowest = -0.5 if at_start else 0.0
        highest = shape[axis] - 0.5 if at_end else shape[axis] - 1.0
        if low[axis] >= lowest - 1e-6 and high[axis] <= highest + 1e-6:
            continue
        if (low[axis] < lowest and at_start) or (high[axis] > highest and at_end):
            source_corners = _source_corners(volume)
            extent = ", ".join(
                f"{name} {lo:.1f}..{hi:.1f} mm"
                for name, lo, hi in zip(
                    "xyz", source_corners.min(axis=0), source_corners.max(axis=0), strict=True
                )
            )
            raise RoiOutsideVolumeError(
                f"the ROI's sampling region reaches outside the series along its "
                f"{_AXIS_NAMES[axis]} axis (the series covers {extent}); an ROI must lie "
                "inside the volume"
            )
        raise RoiOutsideVolumeError(
            f"the ROI's sampling region reaches outside the loaded part of the series along "
            f"its {_AXIS_NAMES[axis]} axis: load the series with a larger margin_mm"
        )


def _source_corners(volume: Volume) -> np.ndarray:
    source_shape = volume.source_shape or volume.shape
    offset = np.array(volume.source_offset, dtype=np.float64)
    corners = np.array(
        [
            [a, b, c]
            for a in (0, source_shape[0] - 1)
            for b in (0, source_shape[1] - 1)
            for c in (0, source_shape[2] - 1)
        ],
        dtype=np.float64,
    )
    return volume.index_to_patient(corners - offset)


def _trilinear(voxels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Trilinear interpolation at fractional (slice, row, column) indices, edges clamped
    (an index past the edge takes the edge voxel's value). float32, computed in float64 by
    scipy's ``map_coordinates`` (order 1, no spline prefilter)."""
    coordinates = np.moveaxis(np.asarray(indices, dtype=np.float64).reshape(-1, 3), 1, 0)
    values = ndimage.map_coordinates(
        np.asarray(voxels, dtype=np.float32), coordinates, order=1, mode="nearest", prefilter=False
    )
    return values.reshape(indices.shape[:-1])


def _sampling_indices(
    volume: Volume, parts: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> np.ndarray:
    """``volume.patient_to_index`` of :func:`sampling_points`, from its parts (x over
    (slices, channels, samples), y and z over (size, size)): the map is affine, so it is
    applied to each part once and the results added (the same indices, without a 3×3
    product per sample)."""
    x, y, z = parts
    lateral = np.zeros((*x.shape, 1, 1, 3))
    lateral[..., 0] = x[..., None, None]
    plane = np.zeros((1, 1, 1, *y.shape, 3))
    plane[..., 1] = y
    plane[..., 2] = z
    at_origin = volume.patient_to_index(np.zeros(3))
    return volume.patient_to_index(lateral) + (volume.patient_to_index(plane) - at_origin)


def build_inputs(
    volume: Volume,
    roi: Roi,
    params: PreprocessParams | None = None,
    *,
    transform: np.ndarray | None = None,
) -> np.ndarray:
    """Network inputs for an ROI: float32 array of shape (slices, channels, size, size).

    ``transform`` is an optional 3×3 affine in the sagittal (y, z) plane, acting on offsets
    from the box centre in mm (homogeneous ``[dy, dz, 1]``): each grid point is sampled where
    the transform sends it. Training augmentation uses it for scaling, rotation and
    translation; serving passes none.
    """
    params = params or PreprocessParams()
    indices = _sampling_indices(volume, _sampling_parts(roi, params, transform))
    _check_inside(volume, indices)
    samples = _trilinear(volume.voxels, indices)  # (slices, channels, samples, size, size)
    slabs = samples.mean(axis=2, dtype=np.float64)
    mean = slabs.mean(axis=(1, 2, 3), keepdims=True)
    sd = slabs.std(axis=(1, 2, 3), keepdims=True)
    normalised = (slabs - mean) / np.maximum(sd, 1e-6)
    return np.ascontiguousarray(normalised, dtype=np.float32)
