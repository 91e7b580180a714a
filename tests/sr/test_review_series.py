"""The review series (the sagittal slabs the model saw, full field of view) and the SR drawn on
it: geometry on every phantom orientation, deterministic UIDs, dciodvfy, highdicom read-back."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from scipy import ndimage

from model.io.volume import SeriesGeometry, Volume, load_volume, read_series_geometry
from model.serving.preprocess import PreprocessParams, build_inputs
from model.serving.roi import Roi
from model.synthetic.cases import make_case
from tests.findings import make_finding
from tests.phantom_variants import VARIANTS
from tests.support import require_binary
from worker.derived import (
    IMAGE_ORIENTATION,
    REVIEW_IMAGE_TYPE,
    ReviewSeries,
    build_review_series,
    image_to_bytes,
    load_review_volume,
    review_uids,
)
from worker.sr import AlgorithmInfo, build_triage_sr, sr_to_bytes
from worker.sr_automatic import LocaliserInfo, build_automatic_sr

PARAMS = PreprocessParams()
ALGORITHM = AlgorithmInfo(
    name="resnet50-li2021", version="1.2.0", device_uid="1.2.826.0.1.3680043.8.498.4711"
)
# dciodvfy knows only AXIAL and LOCALIZER for a CT image's Image Type value 3 (Defined Terms);
# REFORMATTED is what scanners write on their own reformats.
KNOWN_WARNING = (
    "Warning - Unrecognized defined term <REFORMATTED> for value 3 of attribute <Image Type>"
)


def _phantom(
    tmp: Path, name: str, seed: int = 1, **options: Any
) -> tuple[list[pydicom.Dataset], SeriesGeometry, Roi]:
    case = make_case(tmp, patient_id=name, label="malignant", seed=seed, **options)
    paths = sorted(case.series_dir.iterdir())
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    return headers, read_series_geometry(paths, headers), case.roi


def _review(
    headers: list[pydicom.Dataset], geometry: SeriesGeometry, roi: Roi, key: str = "job-1"
) -> ReviewSeries:
    volume = load_review_volume(geometry, roi.slices_x_mm, PARAMS)
    return build_review_series(headers, geometry, volume, roi.slices_x_mm, PARAMS, job_key=key)


def _image_to_patient(ds: pydicom.Dataset, column: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Pixel centre (column, row) → LPS, from the image's own Image Plane attributes only."""
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    position = np.array(ds.ImagePositionPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    along_row, along_column = orientation[:3], orientation[3:]
    return (
        position
        + np.multiply.outer(column * column_spacing, along_row)
        + np.multiply.outer(row * row_spacing, along_column)
    )


def _slab_in_source(volume: Volume, xyz: np.ndarray) -> np.ndarray:
    """The 3 mm slab's mean at patient points, sampled independently (scipy, order 1)."""
    s = PARAMS.samples_per_slab
    offsets = ((np.arange(s) + 0.5) / s - 0.5) * PARAMS.slab_thickness_mm
    values = []
    for dx in offsets:
        points = xyz + np.array([dx, 0.0, 0.0])
        ijk = volume.patient_to_index(points)
        values.append(
            ndimage.map_coordinates(volume.voxels, ijk.reshape(-1, 3).T, order=1, mode="nearest")
        )
    return np.mean(values, axis=0).reshape(xyz.shape[:-1])


def _check_geometry(headers: list[pydicom.Dataset], geometry: SeriesGeometry, roi: Roi) -> None:
    review = _review(headers, geometry, roi)
    source = load_volume(geometry)
    assert [image.x_mm for image in review.images] == sorted(roi.slices_x_mm)
    for image in review.images:
        ds = pydicom.dcmread(BytesIO(image_to_bytes(image.dataset)))
        assert ds.FrameOfReferenceUID == headers[0].FrameOfReferenceUID
        assert ds.StudyInstanceUID == headers[0].StudyInstanceUID
        assert ds.SeriesInstanceUID == review.series_instance_uid != headers[0].SeriesInstanceUID
        assert tuple(float(v) for v in ds.ImageOrientationPatient) == IMAGE_ORIENTATION
        # The ROI's points (and its box centre) at this slice position: where the SR's SCOORD
        # puts them on the image maps back, through the image's own geometry, to the same point.
        box = roi.square_box_yz()
        yz = np.array([*roi.polygon_yz_mm, (box.center_y, box.center_z)], dtype=float)
        graphic = image.graphic_coordinates(yz)  # (column, row), pixel corner at (0, 0)
        xyz = _image_to_patient(ds, graphic[:, 0] - 0.5, graphic[:, 1] - 0.5)
        expected = np.column_stack([np.full(len(yz), image.x_mm), yz])
        np.testing.assert_allclose(xyz, expected, atol=1e-4)
        # The pixels there are the source volume's slab at those patient points.
        pixels = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        columns = np.arange(0, ds.Columns, 7)
        rows = np.arange(0, ds.Rows, 5)
        grid_c, grid_r = np.meshgrid(columns, rows)
        points = _image_to_patient(ds, grid_c.astype(float), grid_r.astype(float))
        np.testing.assert_allclose(
            pixels[grid_r, grid_c], _slab_in_source(source, points), atol=0.51
        )
        # The field of view is the series' whole extent in y and z, not the ROI's box.
        assert ds.Rows * float(ds.PixelSpacing[0]) >= 0.99 * np.ptp(_corners(geometry)[:, 2])
        assert ds.Columns * float(ds.PixelSpacing[1]) >= 0.99 * np.ptp(_corners(geometry)[:, 1])


def _corners(geometry: SeriesGeometry) -> np.ndarray:
    n, r, c = geometry.shape
    ijk = np.array([[a, b, d] for a in (0, n - 1) for b in (0, r - 1) for d in (0, c - 1)], float)
    return geometry.index_to_patient(ijk)


@pytest.mark.parametrize(
    "options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items())
)
def test_roi_points_map_to_the_same_patient_coordinates_on_every_variant(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    headers, geometry, roi = _phantom(tmp_path, "GEO", **options)
    _check_geometry(headers, geometry, roi)


@pytest.mark.parametrize("order", [(2, 0, 1), (1, 2, 0)], ids=["sagittal", "coronal"])
def test_sagittal_and_coronal_acquisitions_map_the_same(
    tmp_path: Path, order: tuple[int, int, int]
) -> None:
    """The same phantom stored along other axes (a sagittal or coronal acquisition)."""
    headers, geometry, roi = _phantom(tmp_path, "ORI")
    steps = [
        (geometry.slice_direction, geometry.spacing[0]),
        (geometry.column_direction, geometry.spacing[1]),
        (geometry.row_direction, geometry.spacing[2]),
    ]
    (n, sn), (c, sc), (r, sr) = (steps[a] for a in order)
    shape = tuple(geometry.shape[a] for a in order)
    reoriented = replace(
        geometry,
        slice_direction=np.asarray(n),
        column_direction=np.asarray(c),
        row_direction=np.asarray(r),
        spacing=(sn, sc, sr),
        shape=shape,  # type: ignore[arg-type]
    )
    axial = load_volume(geometry)
    voxels = np.ascontiguousarray(np.transpose(axial.voxels, order))
    volume = replace(
        axial,
        voxels=voxels,
        slice_direction=np.asarray(n),
        column_direction=np.asarray(c),
        row_direction=np.asarray(r),
        spacing=(sn, sc, sr),
        source_shape=None,
    )
    from_axial = build_review_series(headers, geometry, axial, roi.slices_x_mm, PARAMS, job_key="j")
    turned = build_review_series(headers, reoriented, volume, roi.slices_x_mm, PARAMS, job_key="j")
    for a, b in zip(from_axial.images, turned.images, strict=True):
        assert a.top_left_yz_mm == pytest.approx(b.top_left_yz_mm)
        np.testing.assert_allclose(a.dataset.pixel_array, b.dataset.pixel_array, atol=1)


def test_review_image_is_the_model_input_middle_channel(tmp_path: Path) -> None:
    """At the box's grid, the image's values give the network input's middle channel."""
    headers, geometry, roi = _phantom(tmp_path, "NET")
    volume = load_review_volume(geometry, roi.slices_x_mm, PARAMS)
    review = build_review_series(headers, geometry, volume, roi.slices_x_mm, PARAMS, job_key="n")
    inputs = build_inputs(volume, roi, PARAMS)  # z-scored over 3 channels: compare by shape
    image = review.image_at(roi.slices_x_mm[1])
    box = roi.square_box_yz()
    graphic = image.graphic_coordinates(
        [(box.y_range[0], box.z_range[1]), (box.y_range[1], box.z_range[0])]
    )
    c0, r0 = np.floor(graphic[0]).astype(int)
    c1, r1 = np.ceil(graphic[1]).astype(int)
    crop = image.dataset.pixel_array[r0:r1, c0:c1].astype(float)
    middle = inputs[1, 1]
    resized = ndimage.zoom(crop, (64 / crop.shape[0], 64 / crop.shape[1]), order=1)
    correlation = np.corrcoef(resized.ravel(), middle.ravel())[0, 1]
    assert correlation > 0.95, correlation


def test_uids_are_the_same_on_a_rerun_and_differ_per_job(tmp_path: Path) -> None:
    headers, geometry, roi = _phantom(tmp_path, "UID")
    first = _review(headers, geometry, roi, key="job-1")
    again = _review(headers, geometry, roi, key="job-1")
    other = _review(headers, geometry, roi, key="job-2")
    assert first.series_instance_uid == again.series_instance_uid
    assert [i.sop_instance_uid for i in first.images] == [i.sop_instance_uid for i in again.images]
    assert [image_to_bytes(i.dataset) for i in first.images] == [
        image_to_bytes(i.dataset) for i in again.images
    ]
    assert first.series_instance_uid != other.series_instance_uid
    assert not {i.sop_instance_uid for i in first.images} & {
        i.sop_instance_uid for i in other.images
    }
    series, sops = review_uids("job-1", PARAMS, roi.slices_x_mm)
    assert series == first.series_instance_uid and len(set(sops)) == len(roi.slices_x_mm)


def _dciodvfy(path: Path) -> list[str]:
    completed = subprocess.run(
        [require_binary("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (completed.stderr + completed.stdout).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


def test_review_images_pass_dciodvfy(tmp_path: Path) -> None:
    headers, geometry, roi = _phantom(tmp_path, "VFY", multiframe=True)
    review = _review(headers, geometry, roi)
    for image in review.images:
        path = tmp_path / f"{image.sop_instance_uid}.dcm"
        path.write_bytes(image_to_bytes(image.dataset))
        assert _dciodvfy(path) == [KNOWN_WARNING]
        ds = pydicom.dcmread(path)
        assert list(ds.ImageType) == REVIEW_IMAGE_TYPE
        assert ds.DerivationCodeSequence[0].CodeValue == "113072"
        referenced = {item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence}
        assert referenced == {h.SOPInstanceUID for h in headers}
        assert all("ReferencedFrameNumber" in item for item in ds.SourceImageSequence)


def _finding(roi: Roi, probability: float = 0.91) -> Any:
    return make_finding(
        polygon_yz_mm=roi.polygon_yz_mm,
        slices_x_mm=roi.slices_x_mm,
        slice_probabilities=[probability - 0.05 * abs(i - 1) for i in range(len(roi.slices_x_mm))],
        patient_probability=probability,
        label="malignant" if probability >= 0.5 else "benign",
        priority="HIGH" if probability >= 0.5 else "ROUTINE",
        threshold=0.5,
        vertebra=roi.vertebra,
        study_instance_uid=roi.study_instance_uid,
        series_instance_uid=roi.series_instance_uid,
    )


def _groups_by_kind(sr: pydicom.Dataset) -> tuple[list[Any], list[Any]]:
    decoded = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(BytesIO(sr_to_bytes(sr))))
    report = decoded.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_planar_roi_measurement_groups()
    flat = [
        g for g in groups if g.reference_type == hd.sr.CodedConcept("111030", "DCM", "Image Region")
    ]
    on_image = [g for g in flat if isinstance(g.roi, hd.sr.ImageRegion)]
    in_space = [g for g in flat if isinstance(g.roi, hd.sr.ImageRegion3D)]
    return on_image, in_space


def test_reader_roi_sr_draws_every_group_on_its_review_image(tmp_path: Path) -> None:
    headers, geometry, roi = _phantom(tmp_path, "SR1")
    review = _review(headers, geometry, roi)
    sr = build_triage_sr(headers, _finding(roi), ALGORITHM, annotation_key="job-1", review=review)
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    assert [line for line in _dciodvfy(path) if line.startswith("Error")] == []
    on_image, in_space = _groups_by_kind(sr)
    assert len(in_space) == len(on_image) == 1 + len(roi.slices_x_mm)
    for flat, solid in zip(on_image, in_space, strict=True):
        assert flat.tracking_uid == solid.tracking_uid
        assert flat.tracking_identifier == solid.tracking_identifier
        region = flat.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        np.testing.assert_array_equal(points[0], points[-1])  # closed
        xyz = solid.roi.value
        image = review.image_at(float(xyz[0, 0]))
        source = region.ContentSequence[0].ReferencedSOPSequence[0]
        assert source.ReferencedSOPInstanceUID == image.sop_instance_uid
        ds = image.dataset
        back = _image_to_patient(ds, points[:, 0] - 0.5, points[:, 1] - 0.5)
        np.testing.assert_allclose(back, xyz, atol=1e-3)
        assert [m.value for m in flat.get_measurements()] == [
            m.value for m in solid.get_measurements()
        ]
        assert [e.value for e in flat.get_qualitative_evaluations()] == [
            e.value for e in solid.get_qualitative_evaluations()
        ]
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert {i.sop_instance_uid for i in review.images} <= evidence


def test_without_a_review_series_the_sr_is_as_before(tmp_path: Path) -> None:
    headers, _, roi = _phantom(tmp_path, "SR0")
    sr = build_triage_sr(headers, _finding(roi), ALGORITHM, annotation_key="job-1")
    on_image, in_space = _groups_by_kind(sr)
    assert on_image == [] and len(in_space) == 1 + len(roi.slices_x_mm)


def test_automatic_sr_draws_every_body_on_the_review_images(tmp_path: Path) -> None:
    headers, geometry, roi = _phantom(tmp_path, "SR2")
    other = Roi(
        study_instance_uid=roi.study_instance_uid,
        series_instance_uid=roi.series_instance_uid,
        slices_x_mm=tuple(x + 1.0 for x in roi.slices_x_mm),
        polygon_yz_mm=tuple((y, z - 30.0) for y, z in roi.polygon_yz_mm),
        vertebra=None,
    )
    xs = sorted({*roi.slices_x_mm, *other.slices_x_mm})
    volume = load_review_volume(geometry, xs, PARAMS)
    review = build_review_series(headers, geometry, volume, xs, PARAMS, job_key="auto-1")
    assert len(review.images) == 6
    sr = build_automatic_sr(
        headers,
        [_finding(roi), _finding(other, 0.2)],
        ALGORITHM,
        LocaliserInfo(name="localiser", version="1"),
        job_key="auto-1",
        review=review,
    )
    path = tmp_path / "auto.dcm"
    path.write_bytes(sr_to_bytes(sr))
    assert [line for line in _dciodvfy(path) if line.startswith("Error")] == []
    on_image, in_space = _groups_by_kind(sr)
    assert len(on_image) == len(in_space) == 2
    for flat, solid in zip(on_image, in_space, strict=True):
        assert flat.tracking_uid == solid.tracking_uid
        image = review.image_at(float(solid.roi.value[0, 0]))
        points = flat.roi.value
        back = _image_to_patient(image.dataset, points[:, 0] - 0.5, points[:, 1] - 0.5)
        np.testing.assert_allclose(back, solid.roi.value, atol=1e-3)
