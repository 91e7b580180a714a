"""The key image (Secondary Capture) for viewers without SR support: valid (dciodvfy), the box
drawn where the ROI is, the notice burned into its band, the CT's patient and study in a series
of its own, the same UIDs when built again, and listed in the SR's evidence."""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage

from model.io.volume import read_series_geometry
from model.serving.preprocess import PreprocessParams
from model.synthetic.cases import make_case
from tests.findings import make_finding
from tests.support import require_binary
from worker.derived import ReviewImage, build_review_series, load_review_volume
from worker.key_image import (
    FLAGGED_COLOUR,
    KEY_IMAGE_SERIES_NUMBER,
    KEY_IMAGE_SOP_CLASS,
    ROUTINE_COLOUR,
    KeyFinding,
    build_key_image,
    headline,
    key_image_to_bytes,
)
from worker.sr import AlgorithmInfo, build_triage_sr

PARAMS = PreprocessParams()
ALGORITHM = AlgorithmInfo(
    name="resnet50-li2021", version="1.2.0", device_uid="1.2.826.0.1.3680043.8.498.4711"
)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    case = make_case(tmp_path_factory.mktemp("key"), patient_id="KEY-1", label="malignant", seed=3)
    paths = sorted(case.series_dir.iterdir())
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    geometry = read_series_geometry(paths, headers)
    roi = case.roi
    volume = load_review_volume(geometry, roi.slices_x_mm, PARAMS)
    review = build_review_series(
        headers, geometry, volume, roi.slices_x_mm, PARAMS, job_key="job-key"
    )
    return {"headers": headers, "roi": roi, "image": review.image_at(roi.central_slice_x_mm)}


def _key_image(phantom: dict[str, Any], version: str = "1.2.0", **options: Any) -> pydicom.Dataset:
    roi = phantom["roi"]
    other = tuple((y, z + 40.0) for y, z in roi.polygon_yz_mm)  # a body above it, not flagged
    findings = [
        KeyFinding(roi.polygon_yz_mm, 0.93, True, "L1"),
        KeyFinding(other, 0.12, False, "T12"),
    ]
    sc = build_key_image(
        phantom["headers"][0],
        phantom["image"],
        findings,
        result_line=headline(0.93, "HIGH", "L1"),
        job_key="job-key",
        model_version=version,
        **options,
    )
    return pydicom.dcmread(BytesIO(key_image_to_bytes(sc)))


def _box_px(image: ReviewImage, polygon: Any, band: int, scale: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) pixel indices of a polygon's box in the key image, from the
    review image's own Image Plane attributes (rows toward −z, columns toward +y) and the key
    image's enlargement ``scale``."""
    _, y0, z0 = (float(v) for v in image.dataset.ImagePositionPatient)
    spacing = float(image.dataset.PixelSpacing[0]) / scale
    y0, z0 = y0 - (scale - 1) / 2 * spacing, z0 + (scale - 1) / 2 * spacing
    ys, zs = [y for y, _ in polygon], [z for _, z in polygon]
    left, right = ((y - y0) / spacing for y in (min(ys), max(ys)))
    top, bottom = ((z0 - z) / spacing for z in (max(zs), min(zs)))
    return round(left), round(top) + band, round(right), round(bottom) + band


def _has(pixels: np.ndarray, row: int, column: int, colour: tuple[int, int, int]) -> bool:
    """Whether ``colour`` is within 2 pixels of (row, column)."""
    window = pixels[row - 2 : row + 3, column - 2 : column + 3].astype(int)
    return bool(np.any(np.all(np.abs(window - np.array(colour)) <= 1, axis=-1)))


def test_the_key_image_is_valid_secondary_capture_in_the_original_study(
    phantom: dict[str, Any], tmp_path: Path
) -> None:
    ds = _key_image(phantom)
    ct = phantom["headers"][0]
    assert ds.SOPClassUID == SecondaryCaptureImageStorage == KEY_IMAGE_SOP_CLASS
    assert ds.StudyInstanceUID == ct.StudyInstanceUID and ds.PatientID == ct.PatientID
    assert ds.SeriesInstanceUID != ct.SeriesInstanceUID
    assert ds.SeriesNumber == KEY_IMAGE_SERIES_NUMBER
    assert ds.BurnedInAnnotation == "YES"
    assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert "not for diagnosis" in ds.SeriesDescription
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == phantom["image"].sop_instance_uid
    path = tmp_path / "key.dcm"
    path.write_bytes(key_image_to_bytes(ds))
    check = subprocess.run(
        [require_binary("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], check.stderr


def test_the_boxes_are_drawn_where_the_rois_are_and_the_notice_is_burned_in(
    phantom: dict[str, Any],
) -> None:
    ds = _key_image(phantom)
    image: ReviewImage = phantom["image"]
    pixels = ds.pixel_array
    scale = ds.Columns // image.columns  # a narrow review image is enlarged for the text
    band = ds.Rows - image.rows * scale
    assert ds.Columns == image.columns * scale and band > 0
    roi = phantom["roi"]
    left, top, right, bottom = _box_px(image, roi.polygon_yz_mm, band, scale)
    middle_column, middle_row = (left + right) // 2, (top + bottom) // 2
    # the flagged ROI's box in red on all four sides; inside it the CT, grey
    for row, column in (
        (top, middle_column),
        (bottom, middle_column),
        (middle_row, left),
        (middle_row, right),
    ):
        assert _has(pixels, row, column, FLAGGED_COLOUR), (row, column)
    inside = pixels[top + 6 : bottom - 5, left + 6 : right - 5].astype(int)
    assert np.all(inside[..., 0] == inside[..., 1]) and np.all(inside[..., 1] == inside[..., 2])
    # the other body's box in green, 40 mm above
    other = tuple((y, z + 40.0) for y, z in roi.polygon_yz_mm)
    o_left, o_top, o_right, _ = _box_px(image, other, band, scale)
    assert _has(pixels, o_top, (o_left + o_right) // 2, ROUTINE_COLOUR)
    assert not _has(pixels, o_top, (o_left + o_right) // 2, FLAGGED_COLOUR)
    # the band above the image holds the text: white pixels on black, nowhere else coloured
    text = np.all(pixels[:band] >= 200, axis=-1)
    assert text.sum() > 300
    assert np.all(pixels[:band][~text].max(axis=-1) < 255)
    # the image below the band is the review image in the bone window, outside the boxes grey
    below = pixels[band:, : max(0, left - 3)].astype(int)
    assert np.all(below[..., 0] == below[..., 2])


def test_the_key_image_is_the_same_object_when_built_again(phantom: dict[str, Any]) -> None:
    first, again = _key_image(phantom), _key_image(phantom)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.PixelData == again.PixelData
    other_model = _key_image(phantom, version="1.3.0")  # another model's answer, another image
    assert other_model.SOPInstanceUID != first.SOPInstanceUID


def test_the_sr_lists_the_key_image_among_its_evidence(phantom: dict[str, Any]) -> None:
    key = _key_image(phantom)
    roi = phantom["roi"]
    finding = make_finding(
        polygon_yz_mm=roi.polygon_yz_mm,
        slices_x_mm=roi.slices_x_mm,
        slice_probabilities=[0.93] * len(roi.slices_x_mm),
        patient_probability=0.93,
        label="malignant",
        priority="HIGH",
        threshold=0.5,
        study_instance_uid=roi.study_instance_uid,
        series_instance_uid=roi.series_instance_uid,
    )
    sr = build_triage_sr(phantom["headers"], finding, ALGORITHM, annotation_key="k", key_image=key)
    listed = {
        (series.SeriesInstanceUID, item.ReferencedSOPInstanceUID, item.ReferencedSOPClassUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert (key.SeriesInstanceUID, key.SOPInstanceUID, SecondaryCaptureImageStorage) in listed
