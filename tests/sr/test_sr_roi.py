"""ROI annotations arriving as TID 1500 SRs, built with highdicom the way viewers save them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import EnhancedSRStorage, generate_uid

from dicom_node.dicom.sr_roi import RoiReport, RoiSrError, extract_roi, is_roi_report
from dicom_node.dicom.vertebrae import vertebra_code, vertebra_label
from model.serving.roi import Roi
from tests.findings import make_finding
from tests.sr.synthetic_ct import axial_series, new_study, sagittal_image
from worker.sr import AlgorithmInfo, build_triage_sr, sr_to_bytes

RECTANGLE_YZ = ((12.0, -85.0), (34.0, -85.0), (34.0, -61.5), (12.0, -61.5))
READER = "Reader^Rita"


class Storage:
    """Headers by SOP Instance UID, as the node's storage would resolve them."""

    def __init__(self, images: Sequence[pydicom.Dataset]) -> None:
        self.images = {str(image.SOPInstanceUID): image for image in images}
        self.asked: list[str] = []

    def __call__(self, sop_instance_uid: str) -> pydicom.Dataset | None:
        self.asked.append(sop_instance_uid)
        return self.images.get(sop_instance_uid)


def as_received(sr: pydicom.Dataset) -> pydicom.Dataset:
    """The SR as the node gets it: a plain pydicom data set decoded from the wire bytes."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, sr, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def person_context() -> hd.sr.ObservationContext:
    return hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=READER),
        )
    )


def roi_report(
    evidence: Sequence[pydicom.Dataset],
    groups: Sequence[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ],
    *,
    observation_context: hd.sr.ObservationContext | None = None,
    sr_class: type[
        hd.sr.Comprehensive3DSR | hd.sr.ComprehensiveSR | hd.sr.EnhancedSR
    ] = hd.sr.Comprehensive3DSR,
) -> pydicom.Dataset:
    report = hd.sr.MeasurementReport(
        observation_context=(
            person_context() if observation_context is None else observation_context
        ),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=list(groups),
    )
    sr = sr_class(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Viewer Co",
    )
    return as_received(sr)


def planar_group(
    region: hd.sr.ImageRegion | hd.sr.ImageRegion3D,
    *,
    vertebra: Code | None = None,
    index: int = 1,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"ROI {index}"),
        referenced_region=region,
        finding_sites=[hd.sr.FindingSite(vertebra)] if vertebra is not None else None,
    )


def region_3d(
    points_xyz: Sequence[tuple[float, float, float]], frame_of_reference_uid: str
) -> hd.sr.ImageRegion3D:
    closed = [*points_xyz, points_xyz[0]]
    return hd.sr.ImageRegion3D(
        graphic_type=hd.sr.GraphicTypeValues3D.POLYGON,
        graphic_data=np.array(closed, dtype=float),
        frame_of_reference_uid=frame_of_reference_uid,
    )


def sagittal_region_3d(x_mm: float, frame_of_reference_uid: str) -> hd.sr.ImageRegion3D:
    return region_3d([(x_mm, y, z) for y, z in RECTANGLE_YZ], frame_of_reference_uid)


@pytest.fixture
def study() -> tuple[str, str, list[pydicom.Dataset]]:
    study_uid, frame_uid = new_study()
    return study_uid, frame_uid, axial_series(study_uid, frame_uid)


def test_scoord3d_roi_is_taken_as_is(study: tuple[str, str, list[pydicom.Dataset]]) -> None:
    study_uid, frame_uid, ct = study
    ds = roi_report(
        ct, [planar_group(sagittal_region_3d(2.5, frame_uid), vertebra=codes.SCT.T12Vertebra)]
    )
    storage = Storage(ct)

    assert is_roi_report(ds)
    roi = extract_roi(ds, storage)

    assert roi == RoiReport(
        roi=Roi(
            study_instance_uid=study_uid,
            series_instance_uid=ct[0].SeriesInstanceUID,
            slices_x_mm=(2.5,),
            polygon_yz_mm=RECTANGLE_YZ,
            vertebra="T12",
        ),
        annotator=READER,
        sr_sop_instance_uid=ds.SOPInstanceUID,
    )
    assert len(storage.asked) == 1, "one header per evidence series is enough"


def test_roi_json_has_the_method_keys(study: tuple[str, str, list[pydicom.Dataset]]) -> None:
    _, frame_uid, ct = study
    ds = roi_report(
        ct, [planar_group(sagittal_region_3d(-1.25, frame_uid), vertebra=codes.SCT.L1Vertebra)]
    )
    body = extract_roi(ds, Storage(ct)).to_json()
    assert body == {
        "study_instance_uid": ct[0].StudyInstanceUID,
        "series_instance_uid": ct[0].SeriesInstanceUID,
        "slices_x_mm": [-1.25],
        "polygon_yz_mm": [list(point) for point in RECTANGLE_YZ],
        "vertebra": "L1",
        "annotator": READER,
    }
    anonymous = roi_report(
        ct,
        [planar_group(sagittal_region_3d(0.0, frame_uid))],
        observation_context=hd.sr.ObservationContext(),
    )
    assert set(extract_roi(anonymous, Storage(ct)).to_json()) == {
        "study_instance_uid",
        "series_instance_uid",
        "slices_x_mm",
        "polygon_yz_mm",
    }


def test_scoord_on_a_sagittal_image_is_mapped_through_its_geometry() -> None:
    study_uid, frame_uid = new_study()
    series_uid = str(generate_uid())
    image = sagittal_image(study_uid, series_uid, frame_uid, x_mm=7.5)
    # (column, row) in DICOM image coordinates: pixel centres sit at +0.5.
    column_row = np.array([[0.5, 0.5], [10.5, 0.5], [10.5, 20.5], [0.5, 20.5], [0.5, 0.5]])
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=column_row,
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    ds = roi_report(
        [image],
        [planar_group(region, vertebra=codes.SCT.L3Vertebra)],
        sr_class=hd.sr.ComprehensiveSR,
    )

    assert is_roi_report(ds)
    roi = extract_roi(ds, Storage([image])).roi

    # Independent of highdicom: position + (column - 0.5)·column spacing·row cosine
    # + (row - 0.5)·row spacing·column cosine, with the image at y0 = -20, z0 = 40,
    # row cosine +y, column cosine -z, spacing (rows 0.5 mm, columns 0.8 mm).
    expected = tuple(
        (-20.0 + (column - 0.5) * 0.8, 40.0 - (row - 0.5) * 0.5) for column, row in column_row[:-1]
    )
    assert roi.series_instance_uid == series_uid
    assert roi.study_instance_uid == study_uid
    assert roi.slices_x_mm == (7.5,)
    np.testing.assert_allclose(roi.polygon_yz_mm, expected, atol=1e-4)
    assert roi.polygon_yz_mm[0] == (-20.0, 40.0)
    assert roi.vertebra == "L3"


def test_several_slices_give_sorted_distinct_positions(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    _, frame_uid, ct = study
    groups = [
        planar_group(sagittal_region_3d(x, frame_uid), index=index)
        for index, x in enumerate((3.0, -3.0, 0.0, 3.0), start=1)
    ]
    roi = extract_roi(roi_report(ct, groups), Storage(ct)).roi
    assert roi.slices_x_mm == (-3.0, 0.0, 3.0)
    assert roi.polygon_yz_mm == RECTANGLE_YZ


def test_different_polygons_on_several_slices_give_their_bounding_rectangle(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    _, frame_uid, ct = study
    triangle = [(-3.0, 5.0, -90.0), (-3.0, 20.0, -90.0), (-3.0, 12.0, -70.0)]
    groups = [
        planar_group(sagittal_region_3d(0.0, frame_uid), index=1),
        planar_group(region_3d(triangle, frame_uid), index=2),
    ]
    roi = extract_roi(roi_report(ct, groups), Storage(ct)).roi
    assert roi.slices_x_mm == (-3.0, 0.0)
    assert roi.polygon_yz_mm == ((5.0, -90.0), (34.0, -90.0), (34.0, -61.5), (5.0, -61.5))


def test_an_oblique_polygon_within_tolerance_counts_as_sagittal(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    _, frame_uid, ct = study
    points = [(1.0 + 0.02 * (z + 85.0), y, z) for y, z in RECTANGLE_YZ]
    report = extract_roi(roi_report(ct, [planar_group(region_3d(points, frame_uid))]), Storage(ct))
    roi = report.roi
    assert roi.slices_x_mm == (pytest.approx(1.235),)


def test_axial_roi_is_refused(study: tuple[str, str, list[pydicom.Dataset]]) -> None:
    _, frame_uid, ct = study
    axial = [(-10.0, 5.0, -90.0), (10.0, 5.0, -90.0), (10.0, 25.0, -90.0), (-10.0, 25.0, -90.0)]
    ds = roi_report(ct, [planar_group(region_3d(axial, frame_uid))])
    assert is_roi_report(ds)
    with pytest.raises(RoiSrError, match="not in a sagittal plane"):
        extract_roi(ds, Storage(ct))


@pytest.mark.parametrize(
    ("graphic_type", "column_row"),
    [
        (hd.sr.GraphicTypeValues.ELLIPSE, [[2.0, 5.0], [12.0, 5.0], [7.0, 2.0], [7.0, 8.0]]),
        (hd.sr.GraphicTypeValues.POINT, [[4.0, 4.0]]),
        (hd.sr.GraphicTypeValues.CIRCLE, [[4.0, 4.0], [8.0, 4.0]]),
    ],
)
def test_unsupported_graphic_types_are_refused(
    graphic_type: hd.sr.GraphicTypeValues, column_row: list[list[float]]
) -> None:
    study_uid, frame_uid = new_study()
    image = sagittal_image(study_uid, str(generate_uid()), frame_uid, x_mm=0.0)
    region = hd.sr.ImageRegion(
        graphic_type=graphic_type,
        graphic_data=np.array(column_row),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    ds = roi_report([image], [planar_group(region)])
    with pytest.raises(RoiSrError, match=f"graphic type {graphic_type.value} is not supported"):
        extract_roi(ds, Storage([image]))


def test_missing_referenced_image_is_named() -> None:
    study_uid, frame_uid = new_study()
    image = sagittal_image(study_uid, str(generate_uid()), frame_uid, x_mm=0.0)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([[1.0, 1.0], [9.0, 1.0], [9.0, 9.0], [1.0, 1.0]]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    ds = roi_report([image], [planar_group(region)])
    with pytest.raises(RoiSrError, match=image.SOPInstanceUID):
        extract_roi(ds, Storage([]))


def test_scoord3d_needs_one_matching_ct_series(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    study_uid, frame_uid, ct = study
    second_series = axial_series(study_uid, frame_uid, slices=2)
    ds = roi_report([*ct, *second_series], [planar_group(sagittal_region_3d(0.0, frame_uid))])
    with pytest.raises(RoiSrError, match="ambiguous"):
        extract_roi(ds, Storage([*ct, *second_series]))

    other_frame = str(generate_uid())
    mismatched = roi_report(ct, [planar_group(sagittal_region_3d(0.0, other_frame))])
    with pytest.raises(RoiSrError, match="frame of reference"):
        extract_roi(mismatched, Storage(ct))

    with pytest.raises(RoiSrError, match="not in storage"):
        extract_roi(roi_report(ct, [planar_group(sagittal_region_3d(0.0, frame_uid))]), Storage([]))


def test_ohif_style_measurement_with_a_closed_polyline_is_an_roi() -> None:
    """dcmjs (OHIF) stores a rectangle ROI as a TID 1501 group whose NUM is inferred from it."""
    study_uid, frame_uid = new_study()
    series_uid = str(generate_uid())
    image = sagittal_image(study_uid, series_uid, frame_uid, x_mm=-4.0)
    column_row = np.array([[4.5, 2.5], [14.5, 2.5], [14.5, 22.5], [4.5, 22.5], [4.5, 2.5]])
    area = hd.sr.Measurement(
        name=codes.SCT.Area,
        value=160.0,
        unit=codes.UCUM.SquareMillimeter,
        referenced_coordinates=[
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=column_row,
                source_image=hd.sr.SourceImageForRegion.from_source_image(image),
            )
        ],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="RectangleROI"),
        finding_sites=[hd.sr.FindingSite(codes.SCT.L2Vertebra)],
        measurements=[area],
    )
    ds = roi_report([image], [group], sr_class=hd.sr.ComprehensiveSR)

    assert is_roi_report(ds)
    roi = extract_roi(ds, Storage([image])).roi
    assert roi.series_instance_uid == series_uid
    assert roi.slices_x_mm == (-4.0,)
    assert roi.polygon_yz_mm == ((-16.8, 39.0), (-8.8, 39.0), (-8.8, 29.0), (-16.8, 29.0))
    assert roi.vertebra == "L2"


def reformat_of(
    ct: Sequence[pydicom.Dataset], *, x_mm: float, slab_mm: float | None = 3.0
) -> pydicom.Dataset:
    """A sagittal reformat of ``ct`` at ``x_mm``, as the node's review image: DERIVED, same
    frame of reference, a Source Image Sequence naming the CT slices, a slab thickness."""
    first = ct[0]
    image = sagittal_image(
        str(first.StudyInstanceUID), str(generate_uid()), str(first.FrameOfReferenceUID), x_mm=x_mm
    )
    image.ImageType = ["DERIVED", "SECONDARY", "REFORMATTED"]
    sources = []
    for slice_ in ct:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = slice_.SOPClassUID
        item.ReferencedSOPInstanceUID = slice_.SOPInstanceUID
        sources.append(item)
    image.SourceImageSequence = sources
    if slab_mm is None:
        del image.SliceThickness
    else:
        image.SliceThickness = slab_mm
    return image


def ohif_rectangle_report(
    images: Sequence[pydicom.Dataset], column_row: np.ndarray
) -> pydicom.Dataset:
    """What OHIF 3.13 saves for a RectangleROI ("Create SR"): an Enhanced SR, TID 1500, one
    TID 1501 group per image with NUM Area (and Mean...) inferred from a closed 5-point SCOORD
    POLYLINE on the image, the tool's name as tracking identifier, an unknown person observer."""
    groups = []
    for image in images:
        rectangle = hd.sr.CoordinatesForMeasurement(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=column_row,
            source_image=hd.sr.SourceImageForRegion.from_source_image(image),
        )
        measurements = [
            hd.sr.Measurement(
                name=codes.SCT.Area,
                value=1122.6,
                unit=codes.UCUM.SquareMillimeter,
                referenced_coordinates=[rectangle],
            ),
            hd.sr.Measurement(name=codes.SCT.Mean, value=126.8, unit=codes.UCUM.HounsfieldUnit),
        ]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(), identifier="Cornerstone3DTools@^0.1.0:RectangleROI"
                ),
                measurements=measurements,
            )
        )
    context = hd.sr.ObservationContext(
        observer_person_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name="unknown^unknown"
            ),
        )
    )
    return roi_report(images, groups, observation_context=context, sr_class=hd.sr.EnhancedSR)


OHIF_RECTANGLE = np.array([[4.5, 2.5], [14.5, 2.5], [14.5, 22.5], [4.5, 22.5], [4.5, 2.5]])


def test_ohif_rectangle_on_a_reformat_is_the_source_series_roi_on_three_slices(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    """A reader's rectangle on the node's sagittal review image, saved by OHIF: the points
    map through the reformat's geometry; the ROI is on the CT it was made from, on the
    three slabs centred on the image (x - 3, x, x + 3 mm)."""
    _, _, ct = study
    review = reformat_of(ct, x_mm=-4.0)
    ds = ohif_rectangle_report([review], OHIF_RECTANGLE)

    assert ds.SOPClassUID == EnhancedSRStorage
    assert is_roi_report(ds)
    report = extract_roi(ds, Storage([*ct, review]))
    roi = report.roi
    assert roi.series_instance_uid == ct[0].SeriesInstanceUID
    assert roi.study_instance_uid == ct[0].StudyInstanceUID
    assert roi.slices_x_mm == (-7.0, -4.0, -1.0)
    # the same patient coordinates as on the review image (top left -20, 40; 0.8 x 0.5 mm)
    assert roi.polygon_yz_mm == ((-16.8, 39.0), (-8.8, 39.0), (-8.8, 29.0), (-16.8, 29.0))
    assert report.annotator == "unknown^unknown"


def test_a_reformat_without_slice_thickness_defaults_to_3_mm_slabs(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    _, _, ct = study
    review = reformat_of(ct, x_mm=2.0, slab_mm=None)
    roi = extract_roi(ohif_rectangle_report([review], OHIF_RECTANGLE), Storage([*ct, review])).roi
    assert roi.slices_x_mm == (-1.0, 2.0, 5.0)


def test_rectangles_on_several_reformats_give_their_own_positions(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    _, _, ct = study
    left, right = reformat_of(ct, x_mm=-3.0), reformat_of(ct, x_mm=0.0)
    right.SeriesInstanceUID = left.SeriesInstanceUID
    ds = ohif_rectangle_report([left, right], OHIF_RECTANGLE)
    roi = extract_roi(ds, Storage([*ct, left, right])).roi
    assert roi.slices_x_mm == (-3.0, 0.0)
    assert roi.series_instance_uid == ct[0].SeriesInstanceUID


def test_a_reformat_whose_source_images_are_missing_is_refused(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    _, _, ct = study
    review = reformat_of(ct, x_mm=-4.0)
    with pytest.raises(RoiSrError, match="source images are not in storage"):
        extract_roi(ohif_rectangle_report([review], OHIF_RECTANGLE), Storage([review]))


def test_a_length_measurement_alone_is_not_an_roi_report() -> None:
    study_uid, frame_uid = new_study()
    image = sagittal_image(study_uid, str(generate_uid()), frame_uid, x_mm=0.0)
    length = hd.sr.Measurement(
        name=codes.SCT.Length,
        value=12.0,
        unit=codes.UCUM.Millimeter,
        referenced_coordinates=[
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array([[1.0, 1.0], [9.0, 9.0]]),
                source_image=hd.sr.SourceImageForRegion.from_source_image(image),
            )
        ],
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Length"),
        measurements=[length],
    )
    ds = roi_report([image], [group], sr_class=hd.sr.ComprehensiveSR)
    assert not is_roi_report(ds)
    with pytest.raises(RoiSrError, match="no planar ROI"):
        extract_roi(ds, Storage([image]))


def test_an_sr_that_is_not_tid_1500_is_refused(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    _, _, ct = study
    root = hd.sr.ContainerContentItem(
        name=Code("18748-4", "LN", "Diagnostic imaging report"), template_id=None
    )
    root.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Finding,
                value="Compression fracture of L1.",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        ]
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=ct,
        content=root,
        series_instance_uid=generate_uid(),
        series_number=5,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    ds = as_received(sr)
    assert not is_roi_report(ds)
    with pytest.raises(RoiSrError, match="TID 1500"):
        extract_roi(ds, Storage(ct))


def test_a_ct_image_is_not_an_roi_report(study: tuple[str, str, list[pydicom.Dataset]]) -> None:
    _, _, ct = study
    assert not is_roi_report(ct[0])
    with pytest.raises(RoiSrError, match="not a Comprehensive 3D, Comprehensive or Enhanced SR"):
        extract_roi(ct[0], Storage(ct))


def test_triage_result_sr_is_not_an_roi_report_but_its_roi_reads_back(
    study: tuple[str, str, list[pydicom.Dataset]],
) -> None:
    """The node must not take this product's own SR, echoed by the PACS, as a new request."""
    study_uid, _, ct = study
    finding = make_finding(
        polygon_yz_mm=RECTANGLE_YZ,
        slices_x_mm=(-3.0, 0.0, 3.0),
        slice_probabilities=(0.2, 0.81, 0.5),
        patient_probability=0.81,
        label="malignant",
        priority="HIGH",
        threshold=0.5,
        vertebra="T11",
    )
    algorithm = AlgorithmInfo(name="resnet50", version="2", device_uid="1.2.3.4")
    result = build_triage_sr(ct, finding, algorithm, annotation_key="a-1")
    ds = pydicom.dcmread(BytesIO(sr_to_bytes(result)))

    assert not is_roi_report(ds)
    report = extract_roi(ds, Storage(ct))
    roi = report.roi
    assert roi.study_instance_uid == study_uid
    assert roi.series_instance_uid == ct[0].SeriesInstanceUID
    assert roi.slices_x_mm == finding.roi.slices_x_mm
    assert roi.polygon_yz_mm == RECTANGLE_YZ
    assert roi.vertebra == "T11"
    assert report.annotator is None


def test_conflicting_vertebrae_are_dropped_with_a_warning(
    study: tuple[str, str, list[pydicom.Dataset]], caplog: pytest.LogCaptureFixture
) -> None:
    _, frame_uid, ct = study
    groups = [
        planar_group(sagittal_region_3d(0.0, frame_uid), vertebra=codes.SCT.L1Vertebra, index=1),
        planar_group(sagittal_region_3d(3.0, frame_uid), vertebra=codes.SCT.L2Vertebra, index=2),
    ]
    with caplog.at_level(logging.WARNING, logger="dicom_node.dicom.sr_roi"):
        roi = extract_roi(roi_report(ct, groups), Storage(ct)).roi
    assert roi.vertebra is None
    assert "2 different vertebrae" in caplog.text
    assert READER not in caplog.text


def test_vertebra_vocabulary_round_trips() -> None:
    for label in (
        [f"C{n}" for n in range(1, 8)]
        + [f"T{n}" for n in range(1, 13)]
        + [f"L{n}" for n in range(1, 6)]
    ):
        code = vertebra_code(label)
        assert code is not None
        assert vertebra_label(code) == label
    assert vertebra_code(" l4 ") == codes.SCT.L4Vertebra
    sacrum = vertebra_code("S1")
    assert sacrum == codes.SCT.Sacrum and vertebra_label(sacrum) == "sacrum"
    assert vertebra_code("L6") is None
    assert vertebra_label(codes.SCT.Spine) is None
