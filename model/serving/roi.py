"""The radiologist's ROI annotation, as ``METHOD.md`` defines it.

An ROI is a polygon in the sagittal plane, given as (y, z) points in DICOM patient coordinates
(LPS, millimetres), plus the lateral positions x (mm) of the sagittal slices that show the
abnormality. The network looks at the smallest *square* containing the polygon's bounding box,
centred on it.

The method uses 3–5 slices per patient; this class accepts 1 to :data:`MAX_SLICES` so that a
site can annotate a small vertebra on fewer slices or a large one on a few more. Validation
happens at construction: once a :class:`Roi` exists, it is usable.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MIN_SLICES = 1
MAX_SLICES = 7
MIN_POLYGON_POINTS = 3
MAX_POLYGON_POINTS = 1024
MAX_VERTEBRA_LENGTH = 16
MAX_UID_LENGTH = 64
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_REQUIRED_KEYS = ("study_instance_uid", "series_instance_uid", "slices_x_mm", "polygon_yz_mm")
_OPTIONAL_KEYS = ("vertebra",)
# A polygon whose points span less than this (mm) in its thinner direction is degenerate.
_MIN_EXTENT_MM = 1e-3
# Slice positions closer than this (mm) are one position.
_DISTINCT_SLICES_MM = 1e-3


class RoiError(ValueError):
    """An ROI annotation is invalid; the message names the offending field(s)."""


@dataclass(frozen=True)
class SquareBox:
    """A square in the sagittal (y, z) plane, in LPS millimetres."""

    center_y: float
    center_z: float
    side: float

    @property
    def y_range(self) -> tuple[float, float]:
        half = self.side / 2.0
        return (self.center_y - half, self.center_y + half)

    @property
    def z_range(self) -> tuple[float, float]:
        half = self.side / 2.0
        return (self.center_z - half, self.center_z + half)


def is_dicom_uid(value: object) -> bool:
    """Whether ``value`` is a syntactically valid DICOM UID (digits and dots, ≤ 64 chars)."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID_PATTERN.match(value) is not None
    )


def _is_real_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_float(value: object, field: str) -> float:
    if not _is_real_number(value):
        raise RoiError(f"{field}: expected a number, got {type(value).__name__}")
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise RoiError(f"{field}: expected a finite number, got {number!r}")
    return number


def _polygon_is_degenerate(points: Sequence[tuple[float, float]]) -> bool:
    """True when all points lie (almost) on one line, or the polygon has no area."""
    ys = [p[0] for p in points]
    zs = [p[1] for p in points]
    if max(ys) - min(ys) < _MIN_EXTENT_MM or max(zs) - min(zs) < _MIN_EXTENT_MM:
        return True
    # Largest distance of any point from the line through the two most distant points.
    first = points[0]
    far = max(points, key=lambda p: (p[0] - first[0]) ** 2 + (p[1] - first[1]) ** 2)
    dy, dz = far[0] - first[0], far[1] - first[1]
    length = math.hypot(dy, dz)
    if length < _MIN_EXTENT_MM:
        return True
    off_line = max(abs((p[0] - first[0]) * dz - (p[1] - first[1]) * dy) / length for p in points)
    if off_line < _MIN_EXTENT_MM:
        return True
    twice_area = sum(
        points[i][0] * points[(i + 1) % len(points)][1]
        - points[(i + 1) % len(points)][0] * points[i][1]
        for i in range(len(points))
    )
    return abs(twice_area) / 2.0 < _MIN_EXTENT_MM**2


def validate_uid(value: object, field: str) -> str:
    """A DICOM UID, or :class:`RoiError` naming ``field``."""
    if not is_dicom_uid(value):
        raise RoiError(f"{field}: not a valid DICOM UID: {value!r}")
    return str(value)


def validate_slices(slices: object) -> tuple[float, ...]:
    """1 to :data:`MAX_SLICES` distinct, finite lateral positions (mm)."""
    if isinstance(slices, str | bytes) or not isinstance(slices, Sequence):
        raise RoiError("slices_x_mm: expected a list of numbers")
    if not MIN_SLICES <= len(slices) <= MAX_SLICES:
        raise RoiError(
            f"slices_x_mm: expected at least {MIN_SLICES} and at most {MAX_SLICES} slice "
            f"positions, got {len(slices)}"
        )
    values = tuple(_finite_float(v, f"slices_x_mm[{i}]") for i, v in enumerate(slices))
    ordered = sorted(values)
    if any(b - a < _DISTINCT_SLICES_MM for a, b in itertools.pairwise(ordered)):
        raise RoiError(f"slices_x_mm: slice positions must be distinct, got {list(values)}")
    return values


def validate_polygon(polygon: object) -> tuple[tuple[float, float], ...]:
    """At least three finite (y, z) points that enclose an area."""
    if isinstance(polygon, str | bytes) or not isinstance(polygon, Sequence):
        raise RoiError("polygon_yz_mm: expected a list of [y, z] points")
    if len(polygon) < MIN_POLYGON_POINTS:
        raise RoiError(
            f"polygon_yz_mm: expected at least {MIN_POLYGON_POINTS} points, got {len(polygon)}"
        )
    if len(polygon) > MAX_POLYGON_POINTS:
        raise RoiError(
            f"polygon_yz_mm: expected at most {MAX_POLYGON_POINTS} points, got {len(polygon)}"
        )
    points: list[tuple[float, float]] = []
    for i, point in enumerate(polygon):
        if isinstance(point, str | bytes) or not isinstance(point, Sequence) or len(point) != 2:
            raise RoiError(f"polygon_yz_mm[{i}]: expected a [y, z] pair, got {point!r}")
        points.append(
            (
                _finite_float(point[0], f"polygon_yz_mm[{i}][0]"),
                _finite_float(point[1], f"polygon_yz_mm[{i}][1]"),
            )
        )
    if _polygon_is_degenerate(points):
        raise RoiError(
            "polygon_yz_mm: degenerate polygon (it needs at least three distinct points that "
            "enclose an area; these enclose no area)"
        )
    return tuple(points)


def validate_vertebra(vertebra: object) -> str | None:
    """``None``, or a non-empty label of at most :data:`MAX_VERTEBRA_LENGTH` characters."""
    if vertebra is None:
        return None
    if not isinstance(vertebra, str) or not vertebra.strip():
        raise RoiError(f"vertebra: expected a non-empty string or null, got {vertebra!r}")
    if len(vertebra.strip()) > MAX_VERTEBRA_LENGTH:
        raise RoiError(f"vertebra: expected at most {MAX_VERTEBRA_LENGTH} characters")
    return vertebra.strip()


@dataclass(frozen=True)
class Roi:
    """An ROI on a vertebra (see ``METHOD.md``): the one ROI type of the project.

    ``slices_x_mm`` are the lateral positions (LPS x, mm) of the sagittal slices to classify,
    1 to :data:`MAX_SLICES` of them, distinct. ``polygon_yz_mm`` is a polygon of at least three
    (y, z) points in the sagittal plane that encloses an area. ``vertebra`` is an optional label
    such as ``"L1"``. Every edge (REST, CSV, DICOM SR, the localiser, training manifests)
    builds it, so the rules above are checked in one place: the validators of this module.
    """

    study_instance_uid: str
    series_instance_uid: str
    slices_x_mm: tuple[float, ...]
    polygon_yz_mm: tuple[tuple[float, float], ...]
    vertebra: str | None = None

    def __post_init__(self) -> None:
        for field in ("study_instance_uid", "series_instance_uid"):
            validate_uid(getattr(self, field), field)
        object.__setattr__(self, "slices_x_mm", validate_slices(self.slices_x_mm))
        object.__setattr__(self, "polygon_yz_mm", validate_polygon(self.polygon_yz_mm))
        object.__setattr__(self, "vertebra", validate_vertebra(self.vertebra))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Roi:
        """Build from the JSON object of ``METHOD.md``; :class:`RoiError` on bad input."""
        if not isinstance(data, Mapping):
            raise RoiError(f"ROI: expected a JSON object, got {type(data).__name__}")
        missing = [key for key in _REQUIRED_KEYS if key not in data]
        if missing:
            raise RoiError(f"missing field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            raise RoiError(f"unknown field(s): {', '.join(unknown)}")
        return cls(
            study_instance_uid=data["study_instance_uid"],
            series_instance_uid=data["series_instance_uid"],
            slices_x_mm=data["slices_x_mm"],
            polygon_yz_mm=data["polygon_yz_mm"],
            vertebra=data.get("vertebra"),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``METHOD.md`` (``from_json(to_json())`` gives an equal ROI)."""
        data: dict[str, Any] = {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "slices_x_mm": list(self.slices_x_mm),
            "polygon_yz_mm": [[y, z] for y, z in self.polygon_yz_mm],
        }
        if self.vertebra is not None:
            data["vertebra"] = self.vertebra
        return data

    @property
    def central_slice_x_mm(self) -> float:
        """The middle slice position (the lower middle one for an even count)."""
        ordered = sorted(self.slices_x_mm)
        return ordered[(len(ordered) - 1) // 2]

    def square_box_yz(self) -> SquareBox:
        """The smallest square containing the polygon's bounding box, centred on it."""
        ys = [p[0] for p in self.polygon_yz_mm]
        zs = [p[1] for p in self.polygon_yz_mm]
        side = max(max(ys) - min(ys), max(zs) - min(zs))
        return SquareBox(
            center_y=(max(ys) + min(ys)) / 2.0,
            center_z=(max(zs) + min(zs)) / 2.0,
            side=side,
        )
