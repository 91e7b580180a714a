"""A radiologist's ROI arriving as a DICOM Structured Report.

Viewers such as OHIF save an ROI as a TID 1500 "Imaging Measurement Report" (Comprehensive 3D
SR, Comprehensive SR or Enhanced SR). This module turns such a report into the ROI of
``METHOD.md``: the lateral positions x of the sagittal slices and one polygon of (y, z) points,
in patient coordinates (LPS, mm). Everything is parsed with highdicom.

Where the region is found:

- a TID 1410 planar ROI group's "Image Region" (SCOORD or SCOORD3D), or
- a TID 1501 measurement group whose measurements are "inferred from" a SCOORD/SCOORD3D
  polygon (how dcmjs, and so OHIF, stores rectangle and freehand ROIs).

Geometry rules:

- SCOORD3D points are patient coordinates already and are taken as they are.
- SCOORD points are (column, row) pairs on the referenced image, in the DICOM image coordinate
  convention (PS3.3 C.18.6.1.2): (0, 0) is the top left corner of the top left pixel, so the
  centre of that pixel is (0.5, 0.5). They are mapped to patient coordinates through the
  referenced image's Image Position/Orientation (Patient) and Pixel Spacing with highdicom's
  ``ImageToReferenceTransformer``, which applies that half-pixel convention.
- A 2D POLYLINE or a 3D POLYGON/POLYLINE with at least three distinct points is a region (a
  polyline is read as closed). POINT, MULTIPOINT, CIRCLE, ELLIPSE, ELLIPSOID and segmentation
  references are refused with a message.
- The regions, in patient coordinates, become ``slices_x_mm`` and ``polygon_yz_mm`` by the
  rules of :mod:`dicom_node.dicom.sr_geometry`: every polygon in a sagittal plane, slice positions
  the polygons' mean x, several regions combined into one polygon, coordinates rounded.

The CT series the ROI refers to is the referenced image's series (SCOORD) or, for SCOORD3D,
the one CT series among the SR's evidence whose Frame of Reference matches; none or several
is an error. ``resolve_image(sop_instance_uid)`` returns an instance's header from storage.

An ROI drawn on a **reformat** (a SCOORD on an image with Image Type DERIVED and a Source
Image Sequence, such as the node's own sagittal review series, where a reader draws in OHIF):

- the points map through the reformat's geometry, as on any image, so they are the same
  patient coordinates; the CT series is the one of the reformat's source images (in the same
  Frame of Reference; they must be in storage), not the reformat's own series;
- a reformat shows one slab, and the SR cannot say which 3–5 sagittal slices the reader
  meant: when every region lies on the same reformatted image, the slices default to three,
  centred on that image's x and one slab thickness apart (its Slice Thickness, else
  ``DEFAULT_SLAB_MM``): x − t, x, x + t. Regions drawn on several reformatted images give
  their own positions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)

from dicom_node.dicom.sr_geometry import (
    COORDINATE_DECIMALS,
    RoiSrError,
    as_points,
    combined_polygon,
    distinct,
    distinct_sorted,
    polygon_yz,
    require_area,
    sagittal_x,
)
from dicom_node.dicom.vertebrae import vertebra_label
from model.serving.roi import Roi, RoiError

__all__ = ["SR_CLASSES", "ImageResolver", "RoiReport", "RoiSrError", "extract_roi", "is_roi_report"]

logger = logging.getLogger(__name__)

SR_CLASSES: dict[str, type[hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR]] = {
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    EnhancedSRStorage: hd.sr.EnhancedSR,
}

_AREA_GRAPHIC_TYPES_2D = {"POLYLINE", "CIRCLE", "ELLIPSE"}
DEFAULT_SLAB_MM = 3.0  # the method's sagittal slab, when a reformat states no Slice Thickness
REFORMAT_SLICES = 3  # slices of an ROI drawn on one reformatted image: x - t, x, x + t
_AREA_GRAPHIC_TYPES_3D = {"POLYGON", "POLYLINE", "ELLIPSE"}
_READ_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError)


@dataclass(frozen=True)
class RoiReport:
    """A reader's ROI read from a TID 1500 SR: the ROI, who drew it, and the SR it came from."""

    roi: Roi
    annotator: str | None
    sr_sop_instance_uid: str

    def to_json(self) -> dict[str, Any]:
        """The ROI JSON of METHOD.md (plus ``annotator`` when the SR names one)."""
        body = self.roi.to_json()
        if self.annotator is not None:
            body["annotator"] = self.annotator
        return body


@dataclass(frozen=True)
class _Region:
    """One planar region found in the report, already in patient coordinates."""

    where: str
    points_xyz: tuple[tuple[float, float, float], ...]
    frame_of_reference_uid: str
    series_instance_uid: str | None
    slab_mm: float | None = None  # drawn on a reformat: its slab thickness


ImageResolver = Callable[[str], pydicom.Dataset | None]


def is_roi_report(ds: pydicom.Dataset) -> bool:
    """Whether ``ds`` is an SR whose root is TID 1500 with at least one planar ROI.

    A report whose measurement groups carry "Probability of cancer" (DCM 111047) is an
    algorithm's result (this product's own SR coming back from the PACS, or another CAD's),
    not a request for triage, and is not an ROI report.
    """
    try:
        groups = _roi_groups(_measurement_report(ds))
        is_result = any(
            group.get_measurements(name=codes.DCM.ProbabilityOfCancer) for group in groups
        )
    except RoiSrError as error:
        logger.debug("not an ROI report: %s", error)
        return False
    except _READ_ERRORS as error:
        logger.debug("not an ROI report, unreadable measurement group: %s", error)
        return False
    if is_result:
        logger.debug("SR %s is a triage result, not an ROI report", ds.get("SOPInstanceUID"))
    return bool(groups) and not is_result


def extract_roi(ds: pydicom.Dataset, resolve_image: ImageResolver) -> RoiReport:
    """The ROI held by a TID 1500 SR; raises :class:`RoiSrError` saying why when there is none.

    ``is_roi_report`` is the gate for incoming objects; this function reads the ROI of any
    TID 1500 report with planar ROIs, a triage result included.
    """
    report = _measurement_report(ds)
    try:
        return _roi_of_report(ds, report, resolve_image)
    except RoiSrError:
        raise
    except _READ_ERRORS as error:
        raise RoiSrError(f"the ROI cannot be read: {error}") from error


def _roi_of_report(
    ds: pydicom.Dataset, report: hd.sr.MeasurementReport, resolve_image: ImageResolver
) -> RoiReport:
    groups = _roi_groups(report)
    if not groups:
        raise RoiSrError("the measurement report holds no planar ROI")
    regions = [
        region
        for index, group in enumerate(groups, start=1)
        for region in _group_regions(group, f"measurement group {index}", resolve_image)
    ]
    frames = {region.frame_of_reference_uid for region in regions}
    if len(frames) != 1:
        raise RoiSrError(f"the ROIs lie in {len(frames)} different frames of reference")
    series_uid = _series_instance_uid(ds, regions, frames.pop(), resolve_image)

    slice_positions = distinct_sorted(
        [sagittal_x(region.points_xyz, region.where) for region in regions]
    )
    slabs = {region.slab_mm for region in regions}
    if len(slice_positions) == 1 and len(slabs) == 1 and (slab := slabs.pop()) is not None:
        slice_positions = reformat_slices(slice_positions[0], slab)
    polygons = [polygon_yz(region.points_xyz, region.where) for region in regions]
    try:
        roi = Roi(
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=series_uid,
            slices_x_mm=slice_positions,
            polygon_yz_mm=combined_polygon(polygons),
            vertebra=_vertebra(groups),
        )
    except RoiError as error:
        raise RoiSrError(f"the ROI is not usable: {error}") from error
    return RoiReport(
        roi=roi, annotator=_annotator(report), sr_sop_instance_uid=str(ds.SOPInstanceUID)
    )


def _measurement_report(ds: pydicom.Dataset) -> hd.sr.MeasurementReport:
    sop_class_uid = ds.get("SOPClassUID")
    sr_class = SR_CLASSES.get(sop_class_uid)
    if sr_class is None:
        raise RoiSrError(
            f"SOP class {sop_class_uid} is not a Comprehensive 3D, Comprehensive or Enhanced SR"
        )
    templates = ds.get("ContentTemplateSequence") or []
    if not templates or templates[0].get("TemplateIdentifier") != "1500":
        raise RoiSrError("the SR's root is not TID 1500 (Measurement Report)")
    try:
        document = sr_class.from_dataset(ds)
    except _READ_ERRORS as error:
        raise RoiSrError(f"the measurement report cannot be read: {error}") from error
    content = document.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise RoiSrError("the SR's root is not TID 1500 (Measurement Report)")
    return content


_RoiGroup = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def _roi_groups(report: hd.sr.MeasurementReport) -> list[_RoiGroup]:
    """Planar ROI groups (TID 1410) and measurement groups drawn as an area (TID 1501)."""
    try:
        planar: list[_RoiGroup] = list(report.get_planar_roi_measurement_groups())
        image_groups = report.get_image_measurement_groups()
        drawn = [group for group in image_groups if _drawn_coordinates(group)]
    except _READ_ERRORS as error:
        raise RoiSrError(f"the measurement groups cannot be read: {error}") from error
    return planar + drawn


def _drawn_coordinates(
    group: hd.sr.MeasurementsAndQualitativeEvaluations,
) -> list[hd.sr.CoordinatesForMeasurement | hd.sr.CoordinatesForMeasurement3D]:
    """Area-like coordinates (not points, not two-point lines) under a group's measurements."""
    found = []
    for measurement in group.get_measurements():
        for coordinates in measurement.referenced_coordinates:
            graphic_type = str(coordinates.GraphicType)
            three_d = coordinates.ValueType == "SCOORD3D"
            allowed = _AREA_GRAPHIC_TYPES_3D if three_d else _AREA_GRAPHIC_TYPES_2D
            if graphic_type not in allowed:
                continue
            if graphic_type == "POLYLINE" and len(distinct(coordinates.value)) < 3:
                continue
            found.append(coordinates)
    return found


def _group_regions(group: _RoiGroup, where: str, resolve_image: ImageResolver) -> list[_Region]:
    items: list[Any]
    if isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations):
        if group.reference_type != codes.DCM.ImageRegion:
            raise RoiSrError(
                f"{where}: the ROI is a {group.reference_type.meaning}; "
                "only a polygon drawn as SCOORD or SCOORD3D is supported"
            )
        items = [group.roi]
    else:
        items = _drawn_coordinates(group)
    regions: list[_Region] = []
    for item in items:
        region = _region(item, where, resolve_image)
        if all(region.points_xyz != known.points_xyz for known in regions):
            regions.append(region)
    return regions


def _region(item: Any, where: str, resolve_image: ImageResolver) -> _Region:
    graphic_type = str(item.GraphicType)
    if item.ValueType == "SCOORD3D":
        if graphic_type not in ("POLYGON", "POLYLINE"):
            raise RoiSrError(
                f"{where}: graphic type {graphic_type} is not supported; draw a polygon"
            )
        points = np.asarray(item.value, dtype=float).reshape(-1, 3)
        require_area(points, where)
        return _Region(where, as_points(points), str(item.ReferencedFrameOfReferenceUID), None)
    if graphic_type != "POLYLINE":
        raise RoiSrError(f"{where}: graphic type {graphic_type} is not supported; draw a polygon")
    image_items = hd.sr.utils.find_content_items(item, value_type=hd.sr.ValueTypeValues.IMAGE)
    if not image_items:
        raise RoiSrError(f"{where}: the SCOORD region names no source image")
    reference = image_items[0].ReferencedSOPSequence[0]
    sop_instance_uid = str(reference.ReferencedSOPInstanceUID)
    image = resolve_image(sop_instance_uid)
    if image is None:
        raise RoiSrError(f"{where}: referenced image {sop_instance_uid} is not in storage")
    frame_numbers = reference.get("ReferencedFrameNumber")
    frame_number = _first_frame(frame_numbers) if int(image.get("NumberOfFrames", 1)) > 1 else None
    try:
        transformer = hd.spatial.ImageToReferenceTransformer.for_image(
            image, frame_number=frame_number
        )
        column_row = np.asarray(item.value, dtype=float).reshape(-1, 2)
        points = transformer(column_row)
    except _READ_ERRORS as error:
        raise RoiSrError(
            f"{where}: image {sop_instance_uid} has no usable geometry: {error}"
        ) from error
    require_area(points, where)
    frame_of_reference = image.get("FrameOfReferenceUID")
    if not frame_of_reference:
        raise RoiSrError(f"{where}: image {sop_instance_uid} has no Frame of Reference UID")
    if not is_reformat(image):
        series = str(image.SeriesInstanceUID)
        return _Region(where, as_points(points), str(frame_of_reference), series)
    series = _source_series(image, str(frame_of_reference), where, resolve_image)
    thickness = image.get("SliceThickness")
    slab = float(thickness) if thickness not in (None, "") and float(thickness) > 0 else None
    return _Region(
        where, as_points(points), str(frame_of_reference), series, slab or DEFAULT_SLAB_MM
    )


def is_reformat(image: pydicom.Dataset) -> bool:
    """Whether ``image`` was derived from other images it names (DERIVED + Source Image
    Sequence): a reformat such as the node's sagittal review image."""
    image_type = [str(value).upper() for value in (image.get("ImageType") or [])]
    return (
        bool(image_type) and image_type[0] == "DERIVED" and bool(image.get("SourceImageSequence"))
    )


def reformat_slices(x_mm: float, slab_mm: float) -> tuple[float, ...]:
    """The default slices of an ROI drawn on one reformatted image at ``x_mm``."""
    half = REFORMAT_SLICES // 2
    return tuple(
        round(x_mm + (i - half) * slab_mm, COORDINATE_DECIMALS) for i in range(REFORMAT_SLICES)
    )


def _source_series(
    image: pydicom.Dataset, frame_of_reference_uid: str, where: str, resolve_image: ImageResolver
) -> str:
    """The series a reformat was made from: that of its first source image in storage."""
    for item in image.SourceImageSequence:
        source = resolve_image(str(item.ReferencedSOPInstanceUID))
        if source is None:
            continue
        if source.get("FrameOfReferenceUID") != frame_of_reference_uid:
            raise RoiSrError(
                f"{where}: the reformat {image.SOPInstanceUID} and its source images lie in "
                "different frames of reference"
            )
        return str(source.SeriesInstanceUID)
    raise RoiSrError(
        f"{where}: the ROI is drawn on a reformat ({image.SOPInstanceUID}) whose source "
        "images are not in storage"
    )


def _first_frame(frame_numbers: Any) -> int | None:
    if frame_numbers is None:
        return None
    if isinstance(frame_numbers, Iterable) and not isinstance(frame_numbers, str):
        numbers = list(frame_numbers)
        return int(numbers[0]) if numbers else None
    return int(frame_numbers)


def _series_instance_uid(
    ds: pydicom.Dataset,
    regions: Sequence[_Region],
    frame_of_reference_uid: str,
    resolve_image: ImageResolver,
) -> str:
    named = {region.series_instance_uid for region in regions if region.series_instance_uid}
    if len(named) > 1:
        raise RoiSrError(f"the ROIs are drawn on images of {len(named)} different series")
    if named:
        return named.pop()
    return _series_for_frame_of_reference(ds, frame_of_reference_uid, resolve_image)


def _series_for_frame_of_reference(
    ds: pydicom.Dataset, frame_of_reference_uid: str, resolve_image: ImageResolver
) -> str:
    """The one CT series of the SR's evidence in this frame of reference."""
    evidence: dict[str, list[str]] = {}
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in ds.get(keyword) or []:
            for series in study.get("ReferencedSeriesSequence") or []:
                instances = evidence.setdefault(str(series.SeriesInstanceUID), [])
                instances.extend(
                    str(item.ReferencedSOPInstanceUID)
                    for item in series.get("ReferencedSOPSequence") or []
                )
    if not evidence:
        raise RoiSrError("the SR lists no evidence, so the CT series of its 3D ROI is unknown")
    matching: list[str] = []
    unresolved: list[str] = []
    for series_uid, instance_uids in evidence.items():
        header = next(
            (image for uid in instance_uids if (image := resolve_image(uid)) is not None), None
        )
        if header is None:
            unresolved.append(series_uid)
            continue
        if (
            header.get("Modality") == "CT"
            and header.get("FrameOfReferenceUID") == frame_of_reference_uid
        ):
            matching.append(series_uid)
    if len(matching) == 1:
        return matching[0]
    if len(matching) > 1:
        raise RoiSrError(
            f"the 3D ROI's frame of reference matches {len(matching)} CT series of the "
            "evidence; it is ambiguous which one it was drawn on"
        )
    if unresolved:
        raise RoiSrError(
            "no CT series of the evidence matches the ROI's frame of reference; evidence series "
            f"not in storage: {', '.join(unresolved)}"
        )
    raise RoiSrError("no CT series of the evidence matches the ROI's frame of reference")


def _vertebra(groups: Sequence[_RoiGroup]) -> str | None:
    sites = []
    for group in groups:
        sites.extend(group.finding_sites)
        for measurement in group.get_measurements():
            sites.extend(measurement.finding_sites)
    found = [vertebra_label(site.value) for site in sites]
    labels = {label for label in found if label is not None}
    if found and not labels:
        logger.info("finding site of the ROI is not a vertebra this product knows; ignored")
    if len(labels) > 1:
        logger.warning(
            "ROI names %d different vertebrae (%s); none kept", len(labels), sorted(labels)
        )
        return None
    return labels.pop() if labels else None


def _annotator(report: hd.sr.MeasurementReport) -> str | None:
    for context in report.get_observer_contexts(observer_type=codes.DCM.Person):
        attributes = context.observer_identifying_attributes
        if isinstance(attributes, hd.sr.PersonObserverIdentifyingAttributes) and attributes.name:
            return str(attributes.name)
    return None
