"""The review series: the sagittal slabs the model looked at, full field of view, as CT images.

For each lateral slice position x a job analysed, one image: the 3 mm sagittal slab centred
at x (the network input's middle channel, :func:`model.serving.preprocess.sagittal_slab`:
same slab, same samples across its thickness, same trilinear interpolation), over the whole
field of view of the series in y and z rather than only the ROI's box. The PACS holds axial
CT; a viewer can draw a 2D region only on an image it displays, so the SR draws the ROI on
these (:mod:`worker.sr_review`) and keeps its 3D polygon in the CT's frame of reference.

The images are CT Image Storage (``docs/conformance-statement.md`` says why), in the original
study and the CT's Frame of Reference, Image Type ``DERIVED\\SECONDARY\\REFORMATTED``, with
Derivation Description and Code (DCM 113072 Multiplanar reformatting) and a Source Image
Sequence naming the CT instances they were sampled from. Geometry (LPS, mm):

- Image Orientation (Patient) ``0\\1\\0\\0\\0\\-1``: along a row toward posterior (+y), down a
  column toward inferior (−z), the usual sagittal display and the network input's layout;
- Image Position (Patient) of the first pixel's centre: (x, smallest y, largest z) of the
  series' extent; square pixels of the series' finest voxel spacing (coarser when the field
  of view would exceed 1024 pixels); Slice Thickness the slab thickness, Slice Location x;
- stored values are HU (signed 16 bit, Rescale Slope 1, Intercept 0); a pixel whose slab
  reaches outside the scanned volume (the corners of a tilted or rotated series) is −1024.

Identity: the series and SOP Instance UIDs derive from (job key, preprocessing, slice
position), never from the model version, so a re-run, a new model with the same
preprocessing, or a shadow candidate names the same images: a PACS gets them once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from model.io.volume import (
    PatientBox,
    SeriesError,
    SeriesGeometry,
    Volume,
    load_volume,
    region_index_bounds,
)
from model.serving.preprocess import PreprocessParams, sagittal_slab
from worker.errors import PermanentError, TransientError
from worker.sr_evidence import frame_of_reference, in_utf8

if TYPE_CHECKING:
    from worker.runtime import WorkerRuntime
    from worker.series import Series

logger = logging.getLogger(__name__)

REVIEW_SERIES_NUMBER = 9902
REVIEW_SERIES_DESCRIPTION = "AI triage review: sagittal 3 mm slabs as analysed"
REVIEW_IMAGE_TYPE = ["DERIVED", "SECONDARY", "REFORMATTED"]
IMAGE_ORIENTATION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows toward +y, columns toward −z
OUTSIDE_HU = -1024.0
MAX_SIDE_PIXELS = 1024
BONE_WINDOW = (400.0, 1800.0)  # centre, width

_UID_NAMESPACE = "spine-triage/review-series/v1"
_MPR = ("113072", "DCM", "Multiplanar reformatting")
_SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")
_PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
_TYPE2 = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    }
)


@dataclass(frozen=True)
class ReviewImage:
    """One sagittal review image: where it lies and how patient (y, z) map to its pixels."""

    dataset: Dataset
    x_mm: float
    top_left_yz_mm: tuple[float, float]  # (y, z) of the first pixel's centre
    pixel_spacing_mm: float
    rows: int
    columns: int

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    def graphic_coordinates(self, points_yz_mm: Sequence[tuple[float, float]]) -> np.ndarray:
        """(column, row) image coordinates of (y, z) points in the image's plane, as SCOORD
        wants them: (0, 0) is the top left corner of the top left pixel (PS3.3 C.18.6.1.1)."""
        yz = np.asarray(points_yz_mm, dtype=np.float64).reshape(-1, 2)
        y0, z0 = self.top_left_yz_mm
        column = (yz[:, 0] - y0) / self.pixel_spacing_mm + 0.5
        row = (z0 - yz[:, 1]) / self.pixel_spacing_mm + 0.5
        return np.stack([column, row], axis=1)


@dataclass(frozen=True)
class ReviewSeries:
    """The review images of one job, ordered from the patient's right to left."""

    series_instance_uid: str
    images: tuple[ReviewImage, ...]

    @property
    def datasets(self) -> list[Dataset]:
        return [image.dataset for image in self.images]

    def image_at(self, x_mm: float) -> ReviewImage:
        """The image of the slice position ``x_mm`` (to 0.01 mm)."""
        for image in self.images:
            if abs(image.x_mm - x_mm) <= 0.01:
                return image
        raise KeyError(f"no review image at x={x_mm:g} mm")


def review_uids(
    job_key: str, params: PreprocessParams, xs_mm: Sequence[float]
) -> tuple[str, list[str]]:
    """(Series Instance UID, SOP Instance UID per slice position) of a job's review series."""
    recipe = json.dumps(params.to_json(), sort_keys=True)
    series_uid = generate_uid(entropy_srcs=[_UID_NAMESPACE, "series", job_key, recipe])
    sop_uids = [
        generate_uid(entropy_srcs=[_UID_NAMESPACE, "instance", job_key, recipe, f"x={x:.2f}"])
        for x in xs_mm
    ]
    return str(series_uid), [str(uid) for uid in sop_uids]


def slice_positions(rois_xs_mm: Sequence[Sequence[float]]) -> list[float]:
    """The distinct slice positions (to 0.01 mm) of one or more ROIs, right to left."""
    distinct: dict[float, float] = {}
    for xs in rois_xs_mm:
        for x in xs:
            distinct.setdefault(round(float(x), 2), float(x))
    return [distinct[key] for key in sorted(distinct)]


def review_extent(geometry: SeriesGeometry) -> PatientBox:
    """The series' bounding box in patient coordinates (voxel centres)."""
    n, rows, columns = geometry.shape
    corners = np.array(
        [[a, b, c] for a in (0, n - 1) for b in (0, rows - 1) for c in (0, columns - 1)],
        dtype=np.float64,
    )
    xyz = geometry.index_to_patient(corners)
    low, high = xyz.min(axis=0), xyz.max(axis=0)
    return PatientBox(
        x_mm=(float(low[0]), float(high[0])),
        y_mm=(float(low[1]), float(high[1])),
        z_mm=(float(low[2]), float(high[2])),
    )


def review_region(
    geometry: SeriesGeometry, xs_mm: Sequence[float], params: PreprocessParams
) -> PatientBox:
    """What the review images need: the slabs' lateral reach around ``xs_mm``, the series'
    whole extent in y and z (a voxel of margin, so edge samples interpolate)."""
    extent = review_extent(geometry)
    margin = max(geometry.spacing)
    reach = params.slab_thickness_mm / 2.0 + margin
    return PatientBox(
        x_mm=(min(xs_mm) - reach, max(xs_mm) + reach),
        y_mm=(extent.y_mm[0] - margin, extent.y_mm[1] + margin),
        z_mm=(extent.z_mm[0] - margin, extent.z_mm[1] + margin),
    )


def load_review_volume(
    geometry: SeriesGeometry,
    xs_mm: Sequence[float],
    params: PreprocessParams,
    *,
    workers: int | None = None,
) -> Volume:
    """The voxels the review images need (:func:`review_region`)."""
    return load_volume(geometry, region=review_region(geometry, xs_mm, params), workers=workers)


def covers(volume: Volume, geometry: SeriesGeometry, region: PatientBox) -> bool:
    """Whether ``volume`` (decoded from ``geometry`` at full resolution, whole or in part)
    holds every voxel ``region`` needs, so nothing has to be decoded again."""
    if volume.spacing != geometry.spacing:
        return False
    bounds = region_index_bounds(geometry, region)
    offset = volume.source_offset
    return all(
        offset[axis] <= low and high <= offset[axis] + volume.shape[axis] - 1
        for axis, (low, high) in enumerate(bounds)
    )


def union(*boxes: PatientBox) -> PatientBox:
    """The smallest box holding every one of ``boxes``."""
    return PatientBox(
        x_mm=(min(b.x_mm[0] for b in boxes), max(b.x_mm[1] for b in boxes)),
        y_mm=(min(b.y_mm[0] for b in boxes), max(b.y_mm[1] for b in boxes)),
        z_mm=(min(b.z_mm[0] for b in boxes), max(b.z_mm[1] for b in boxes)),
    )


def build_review_series(
    source_images: Sequence[Dataset],
    geometry: SeriesGeometry,
    volume: Volume,
    xs_mm: Sequence[float],
    params: PreprocessParams,
    *,
    job_key: str,
    manufacturer: str = "spine-triage project",
    software_version: str = "",
) -> ReviewSeries:
    """The review series of a job: one CT image per slice position in ``xs_mm``.

    ``source_images`` are the headers of the CT series (the images' patient, study and
    frame of reference come from it); ``volume`` holds at least what
    :func:`load_review_volume` loads."""
    if not source_images:
        raise ValueError("the review series needs the CT it was reformatted from")
    frame_uid = frame_of_reference(source_images)
    xs = slice_positions([xs_mm])
    extent = review_extent(geometry)
    spacing = float(min(geometry.spacing))
    height = extent.z_mm[1] - extent.z_mm[0]
    width = extent.y_mm[1] - extent.y_mm[0]
    spacing = max(spacing, height / (MAX_SIDE_PIXELS - 1), width / (MAX_SIDE_PIXELS - 1))
    rows = int(np.floor(height / spacing + 1e-6)) + 1
    columns = int(np.floor(width / spacing + 1e-6)) + 1
    y0, z0 = extent.y_mm[0], extent.z_mm[1]
    z, y = np.meshgrid(
        z0 - np.arange(rows) * spacing, y0 + np.arange(columns) * spacing, indexing="ij"
    )
    series_uid, sop_uids = review_uids(job_key, params, xs)
    first = in_utf8(source_images[0])
    sources = _source_references(source_images, geometry, volume)
    images = []
    for number, (x, sop_uid) in enumerate(zip(xs, sop_uids, strict=True), start=1):
        hu = sagittal_slab(volume, x, y, z, params, outside_value=OUTSIDE_HU)
        pixels = np.clip(np.rint(hu), -32768, 32767).astype(np.int16)
        dataset = _ct_image(
            first,
            pixels,
            series_uid=series_uid,
            sop_uid=sop_uid,
            frame_uid=frame_uid,
            instance_number=number,
            position=(x, y0, z0),
            spacing=spacing,
            params=params,
            sources=sources,
            manufacturer=manufacturer,
            software_version=software_version,
        )
        images.append(ReviewImage(dataset, x, (y0, z0), spacing, rows, columns))
    logger.info(
        "built review series %s: %d sagittal image(s) %dx%d at %.2f mm",
        series_uid,
        len(images),
        columns,
        rows,
        spacing,
    )
    return ReviewSeries(series_uid, tuple(images))


@dataclass(frozen=True)
class StoredReview:
    """A job's review series and where its files lie (relative to the storage root)."""

    series: ReviewSeries
    paths: tuple[str, ...]


def write_review_series(
    rt: WorkerRuntime,
    series: Series,
    xs_mm: Sequence[float],
    params: PreprocessParams,
    *,
    job_key: str,
    software_version: str = "",
    volume: Volume | None = None,
) -> StoredReview | None:
    """The review series of a job at the slice positions ``xs_mm``, stored durably; None
    when the site turned it off (``REVIEW_SERIES=false``). Built from ``volume`` (what the job
    decoded) when that holds what the images need, else from the series decoded again."""
    if not rt.settings.review_series:
        return None
    review = make_review_series(
        series, xs_mm, params, job_key=job_key, software_version=software_version, volume=volume
    )
    paths = tuple(
        rt.store.write(
            series.study_instance_uid,
            review.series_instance_uid,
            image.sop_instance_uid,
            image_to_bytes(image.dataset),
        ).relative_path
        for image in review.images
    )
    return StoredReview(review, paths)


def make_review_series(
    series: Series,
    xs_mm: Sequence[float],
    params: PreprocessParams,
    *,
    job_key: str,
    software_version: str = "",
    volume: Volume | None = None,
) -> ReviewSeries:
    """The review series of a job at ``xs_mm``, built in memory from ``volume`` (what the job
    decoded) when that holds what the images need, else from the series decoded again."""
    try:
        needed = review_region(series.geometry, xs_mm, params)
        if volume is None or not covers(volume, series.geometry, needed):
            volume = load_volume(series.geometry, region=needed)
    except SeriesError as exc:
        raise PermanentError(f"review series: {type(exc).__name__}: {exc}") from exc
    except FileNotFoundError as exc:
        raise TransientError(f"stored file missing: {exc.filename}") from exc
    return build_review_series(
        list(series.headers),
        series.geometry,
        volume,
        xs_mm,
        params,
        job_key=job_key,
        software_version=software_version,
    )


def image_to_bytes(dataset: Dataset) -> bytes:
    """A review image encoded as a DICOM file (preamble, file meta, data set)."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def _source_references(
    source_images: Sequence[Dataset], geometry: SeriesGeometry, volume: Volume
) -> list[tuple[str, str, int | None]]:
    """(SOP Class UID, SOP Instance UID, frame number or None) of the CT slices (frames) the
    volume was sampled from, in the volume's slice order."""
    classes = {str(image.SOPInstanceUID): str(image.SOPClassUID) for image in source_images}
    start = volume.source_offset[0]
    references: list[tuple[str, str, int | None]] = []
    for frame in geometry.frames[start : start + volume.shape[0]]:
        uid = frame.sop_instance_uid
        number = None if frame.frame_index is None else frame.frame_index + 1
        references.append((classes.get(uid, str(CTImageStorage)), uid, number))
    return references


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def _ct_image(
    source: Dataset,
    pixels: np.ndarray,
    *,
    series_uid: str,
    sop_uid: str,
    frame_uid: str,
    instance_number: int,
    position: tuple[float, float, float],
    spacing: float,
    params: PreprocessParams,
    sources: Sequence[tuple[str, str, int | None]],
    manufacturer: str,
    software_version: str,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = source.get("SpecificCharacterSet", "ISO_IR 100")
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    for keyword in _PATIENT_STUDY_KEYWORDS:  # Patient, General Study: the CT's
        if keyword in source:
            setattr(ds, keyword, source.data_element(keyword).value)  # type: ignore[union-attr]
        elif keyword in _TYPE2:
            setattr(ds, keyword, None)
    # General Series, Frame of Reference, General Equipment
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = REVIEW_SERIES_NUMBER
    ds.SeriesDescription = REVIEW_SERIES_DESCRIPTION
    ds.PatientPosition = source.get("PatientPosition", None)
    if "BodyPartExamined" in source:
        ds.BodyPartExamined = source.BodyPartExamined
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", None)
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "spine-triage"
    if software_version:
        ds.SoftwareVersions = software_version
    # General Image
    ds.InstanceNumber = instance_number
    ds.ImageType = REVIEW_IMAGE_TYPE
    ds.DerivationDescription = (
        f"Sagittal multiplanar reformat: mean of {params.samples_per_slab} trilinear samples "
        f"across a {params.slab_thickness_mm:g} mm slab centred at x={position[0]:.2f} mm, "
        "as the triage model's input; computer-aided triage, not for diagnosis"
    )
    ds.DerivationCodeSequence = DicomSequence([_code_item(_MPR)])
    items = []
    for sop_class, sop_instance, frame in sources:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        if frame is not None:
            item.ReferencedFrameNumber = frame
        item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(_SOURCE_FOR_PROCESSING)])
        items.append(item)
    ds.SourceImageSequence = DicomSequence(items)
    ds.BurnedInAnnotation = "NO"
    # Image Plane
    ds.ImageOrientationPatient = [f"{v:g}" for v in IMAGE_ORIENTATION]
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.SliceThickness = _ds(params.slab_thickness_mm)
    ds.SliceLocation = _ds(position[0])
    # Image Pixel, CT Image, VOI LUT
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.KVP = source.get("KVP", None)
    ds.AcquisitionNumber = None
    ds.WindowCenter = _ds(BONE_WINDOW[0])
    ds.WindowWidth = _ds(BONE_WINDOW[1])
    ds.WindowCenterWidthExplanation = "BONE"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.10g}"[:16]
