"""Reading the headers of a CT series: one :class:`FrameHeader` per image frame.

Classic CT Image Storage gives one frame per file; Enhanced (and Legacy Converted Enhanced)
CT gives one per frame of a multi-frame file, its geometry taken from the per-frame or shared
functional groups. Only headers are read here (``stop_before_pixels``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

logger = logging.getLogger(__name__)


class SeriesError(ValueError):
    """A series cannot be turned into a volume; subclasses name the problem."""


class EmptySeriesError(SeriesError):
    """No image slices were given."""


class MixedSeriesError(SeriesError):
    """The files belong to several series (or studies, or frames of reference)."""


class UnreadableSliceError(SeriesError):
    """A file is not DICOM, lacks the image geometry, or its pixel data cannot be decoded."""


class InconsistentImageError(SeriesError):
    """Slices of one series differ in size or pixel spacing."""


class MixedOrientationError(SeriesError):
    """Slices of one series have different (or invalid) Image Orientation (Patient)."""


class DuplicatePositionError(SeriesError):
    """Two slices lie at the same position along the slice normal."""


class GantryTiltError(SeriesError):
    """Slice positions do not lie along the slice normal (tilted gantry)."""


class NonUniformSpacingError(SeriesError):
    """The distance between neighbouring slices varies."""


class MissingSliceError(SeriesError):
    """A gap of a whole number of slice spacings: slices are missing from the series."""


@dataclass(frozen=True)
class FrameHeader:
    """What the loader needs to know about one image frame, from the headers only."""

    path: Path
    frame_index: int | None  # 0-based frame of a multi-frame file; None for single-frame
    number_of_frames: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    transfer_syntax_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    pixel_representation: int
    bits_stored: int
    rescale_slope: float
    rescale_intercept: float
    slice_thickness: float | None
    spacing_between_slices: float | None

    def describe(self) -> str:
        """A short name for messages: the file name, and the frame of a multi-frame file."""
        if self.frame_index is None:
            return f"file {self.path.name}"
        return f"file {self.path.name} frame {self.frame_index + 1}"


def _read_header(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise UnreadableSliceError(f"file {path.name}: not a readable DICOM file ({exc})") from exc


def _floats(value: Any, count: int, what: str, where: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise UnreadableSliceError(f"{where}: invalid {what} {value!r}") from exc
    if len(numbers) != count:
        raise UnreadableSliceError(f"{where}: {what} has {len(numbers)} values, expected {count}")
    return numbers


_TEXT_VRS = frozenset({"UI", "DS", "IS"})


def _value(dataset: Dataset, keyword: str) -> Any:
    """An attribute's value. UI, DS and IS values are read straight from the raw bytes (always
    ASCII): converting them through pydicom costs as much as reading the file."""
    tag = tag_for_keyword(keyword)
    element = dataset.get_item(tag) if tag is not None else None
    if element is None:
        return None
    if isinstance(element, RawDataElement):
        vr = element.VR or dictionary_VR(tag)
        if vr in _TEXT_VRS:
            raw = element.value or b""
            text = raw.decode("ascii", "replace").strip(" \0")
            if vr == "UI" or "\\" not in text:
                return text
            return [part.strip() for part in text.split("\\")]
    return dataset.get(keyword)


def _optional_float(dataset: Dataset, keyword: str) -> float | None:
    value = _value(dataset, keyword)
    if value is None or value == "":
        return None
    return float(value)


def _functional_item(
    per_frame: Dataset | None, shared: Dataset | None, sequence: str
) -> Dataset | None:
    for group in (per_frame, shared):
        if group is not None and sequence in group and len(group[sequence].value) > 0:
            item: Dataset = group[sequence].value[0]
            return item
    return None


def _require(dataset: Dataset, keyword: str, where: str) -> Any:
    value = _value(dataset, keyword)
    if value is None or value == "":
        raise UnreadableSliceError(f"{where}: missing {keyword}")
    return value


def _common(dataset: Dataset, path: Path) -> dict[str, Any]:
    where = f"file {path.name}"
    uids = {
        keyword: str(_require(dataset, keyword, where))
        for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID")
    }
    for keyword in ("Rows", "Columns"):
        _require(dataset, keyword, where)
    meta = getattr(dataset, "file_meta", None)
    transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    return {
        "path": path,
        "sop_instance_uid": uids["SOPInstanceUID"],
        "series_instance_uid": uids["SeriesInstanceUID"],
        "study_instance_uid": uids["StudyInstanceUID"],
        "frame_of_reference_uid": str(_value(dataset, "FrameOfReferenceUID") or ""),
        "transfer_syntax_uid": transfer_syntax,
        "rows": int(dataset.Rows),
        "columns": int(dataset.Columns),
        "pixel_representation": int(dataset.get("PixelRepresentation", 0) or 0),
        "bits_stored": int(dataset.get("BitsStored", 16) or 16),
        "slice_thickness": _optional_float(dataset, "SliceThickness"),
        "spacing_between_slices": _optional_float(dataset, "SpacingBetweenSlices"),
    }


def _single_frame(dataset: Dataset, path: Path) -> FrameHeader:
    where = f"file {path.name}"
    return FrameHeader(
        frame_index=None,
        number_of_frames=1,
        position=_floats(_require(dataset, "ImagePositionPatient", where), 3, "position", where),  # type: ignore[arg-type]
        orientation=_floats(  # type: ignore[arg-type]
            _require(dataset, "ImageOrientationPatient", where), 6, "orientation", where
        ),
        pixel_spacing=_floats(_require(dataset, "PixelSpacing", where), 2, "spacing", where),  # type: ignore[arg-type]
        rescale_slope=_optional_float(dataset, "RescaleSlope") or 1.0,
        rescale_intercept=_optional_float(dataset, "RescaleIntercept") or 0.0,
        **_common(dataset, path),
    )


def _multi_frame(dataset: Dataset, path: Path) -> list[FrameHeader]:
    count = int(dataset.NumberOfFrames)
    shared_sequence = dataset.get("SharedFunctionalGroupsSequence")
    shared = shared_sequence[0] if shared_sequence else None
    per_frame_sequence = dataset.get("PerFrameFunctionalGroupsSequence")
    if per_frame_sequence is None or len(per_frame_sequence) != count:
        raise UnreadableSliceError(
            f"file {path.name}: multi-frame image without one Per-frame Functional Groups "
            f"item per frame ({count} frames)"
        )
    common = _common(dataset, path)
    frames = []
    for index, per_frame in enumerate(per_frame_sequence):
        where = f"file {path.name} frame {index + 1}"
        position = _functional_item(per_frame, shared, "PlanePositionSequence")
        orientation = _functional_item(per_frame, shared, "PlaneOrientationSequence")
        measures = _functional_item(per_frame, shared, "PixelMeasuresSequence")
        transform = _functional_item(per_frame, shared, "PixelValueTransformationSequence")
        if position is None or orientation is None or measures is None:
            raise UnreadableSliceError(f"{where}: missing plane position/orientation/measures")
        thickness = measures.get("SliceThickness")
        between = measures.get("SpacingBetweenSlices")
        frames.append(
            FrameHeader(
                frame_index=index,
                number_of_frames=count,
                position=_floats(  # type: ignore[arg-type]
                    _require(position, "ImagePositionPatient", where), 3, "position", where
                ),
                orientation=_floats(  # type: ignore[arg-type]
                    _require(orientation, "ImageOrientationPatient", where), 6, "orientation", where
                ),
                pixel_spacing=_floats(  # type: ignore[arg-type]
                    _require(measures, "PixelSpacing", where), 2, "spacing", where
                ),
                rescale_slope=float(transform.get("RescaleSlope", 1.0)) if transform else 1.0,
                rescale_intercept=float(transform.get("RescaleIntercept", 0.0))
                if transform
                else 0.0,
                **{
                    **common,
                    "slice_thickness": float(thickness) if thickness else None,
                    "spacing_between_slices": float(between) if between else None,
                },
            )
        )
    return frames


def frame_headers_of(dataset: Dataset, path: Path) -> list[FrameHeader]:
    """The frame headers of one already-read dataset."""
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1 or "PerFrameFunctionalGroupsSequence" in (
        dataset
    ):
        return _multi_frame(dataset, path)
    return [_single_frame(dataset, path)]


def read_headers(paths: Sequence[Path]) -> list[Dataset]:
    """The header (everything before the pixel data) of each file, in the order given;
    :class:`UnreadableSliceError` on a file that is not readable DICOM."""
    if not paths:
        raise EmptySeriesError("no files given")
    return [_read_header(Path(path)) for path in paths]


def read_frame_headers(
    paths: Sequence[Path], datasets: Sequence[Dataset] | None = None
) -> list[FrameHeader]:
    """Frame headers of all files (unsorted); :class:`UnreadableSliceError` on a bad file.

    ``datasets``: the files' headers, already read (:func:`read_headers`), in ``paths``' order.
    """
    if not paths:
        raise EmptySeriesError("no files given")
    if datasets is None:
        datasets = read_headers(paths)
    if len(datasets) != len(paths):
        raise ValueError("one header per file is required")
    frames: list[FrameHeader] = []
    for path, dataset in zip(paths, datasets, strict=True):
        frames.extend(frame_headers_of(dataset, Path(path)))
    if not frames:
        raise EmptySeriesError("the files hold no image frames")
    return frames


def group_paths_by_series(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Group DICOM files by Series Instance UID; files that are not DICOM are skipped."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        try:
            dataset = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]
            )
        except (InvalidDicomError, OSError, EOFError, ValueError):
            logger.debug("skipping %s: not a readable DICOM file", path)
            continue
        uid = dataset.get("SeriesInstanceUID")
        if uid:
            groups.setdefault(str(uid), []).append(Path(path))
    return groups
