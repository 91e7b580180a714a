"""The result SR: valid per dciodvfy, readable by dsrdump, and read back by highdicom unchanged."""

from __future__ import annotations

import logging
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from tests.findings import make_finding
from tests.sr.synthetic_ct import PATIENT_ID, PATIENT_NAME, axial_series, new_study
from tests.support import require_binary, require_dcmtk
from worker.sr import (
    DEMONSTRATION_NOTICE,
    FINDING_COMPRESSION_FRACTURE,
    AlgorithmInfo,
    TriageFinding,
    build_triage_sr,
    result_uids,
    sr_to_bytes,
    tracking_uid,
)

POLYGON = ((10.0, -80.0), (30.5, -80.0), (32.0, -62.25), (9.5, -60.0))
DEVICE_UID = "1.2.826.0.1.3680043.8.498.4711"
ANNOTATION_KEY = "annotation-42"


def malignant_finding(**changes: object) -> TriageFinding:
    values: dict[str, object] = {
        "polygon_yz_mm": POLYGON,
        "slices_x_mm": (-3.0, 0.0, 3.0),
        "slice_probabilities": (0.42, 0.91, 0.7),
        "patient_probability": 0.91,
        "label": "malignant",
        "priority": "HIGH",
        "threshold": 0.5,
        "vertebra": "L1",
    }
    values.update(changes)
    return make_finding(**values)  # type: ignore[arg-type]


def algorithm(**changes: object) -> AlgorithmInfo:
    values: dict[str, object] = {
        "name": "resnet50-li2021",
        "version": "1.2.0",
        "device_uid": DEVICE_UID,
    }
    values.update(changes)
    return AlgorithmInfo(**values)  # type: ignore[arg-type]


@pytest.fixture
def ct_series() -> list[pydicom.Dataset]:
    study_uid, frame_uid = new_study()
    return axial_series(study_uid, frame_uid)


@pytest.fixture
def written_sr(tmp_path: Path, ct_series: list[pydicom.Dataset]) -> Path:
    sr = build_triage_sr(
        ct_series,
        malignant_finding(),
        algorithm(),
        annotation_key=ANNOTATION_KEY,
        institution_name="General Hospital",
    )
    path = tmp_path / "result-sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    return path


def read_back(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    """The SR's content as a receiver sees it: encoded, decoded, parsed by highdicom."""
    decoded = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(BytesIO(sr_to_bytes(sr))))
    report = decoded.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report


def dciodvfy_messages(path: Path) -> tuple[int, list[str]]:
    dciodvfy = require_binary("dciodvfy")
    completed = subprocess.run(
        [dciodvfy, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (completed.stderr + completed.stdout).splitlines()
    return completed.returncode, lines


def test_written_sr_passes_dciodvfy_without_errors(written_sr: Path) -> None:
    returncode, lines = dciodvfy_messages(written_sr)
    errors = [line for line in lines if line.startswith("Error")]
    assert errors == []
    assert returncode == 0
    assert any("Comprehensive3DSR" in line for line in lines), lines


def test_demonstration_sr_passes_dciodvfy_without_errors(
    tmp_path: Path, ct_series: list[pydicom.Dataset]
) -> None:
    sr = build_triage_sr(
        ct_series,
        malignant_finding(label="benign", priority="ROUTINE", threshold=0.95, vertebra=None),
        algorithm(demonstration=True),
        annotation_key=ANNOTATION_KEY,
    )
    path = tmp_path / "demo-sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    returncode, lines = dciodvfy_messages(path)
    assert [line for line in lines if line.startswith("Error")] == []
    assert returncode == 0
    assert returncode == 0


def test_dsrdump_shows_the_report_tree(written_sr: Path) -> None:
    dsrdump = require_dcmtk("dsrdump")
    completed = subprocess.run(
        [dsrdump, str(written_sr)], capture_output=True, text=True, timeout=60, check=True
    )
    tree = completed.stdout
    for concept in (
        "Comprehensive 3D SR Document",
        '"Imaging Measurement Report"',
        '(241577003,SCT,"Computed tomography of spine")',
        '"Tracking Unique Identifier"',
        '(42942008,SCT,"Compression fracture of vertebral column")',
        '(66794005,SCT,"L1 vertebra")',
        'NUM:(,,"Probability of cancer")="0.91" (1,UCUM,"no units")',
        'NUM:(,,"Probability of cancer")="0.42"',
        '(56851009,SCT,"Maximum")',
        'CODE:(,,"Pathology")=(21594007,SCT,"Malignant")',
        '"Algorithm Name")="resnet50-li2021"',
        '"Algorithm Version")="1.2.0"',
        '"Algorithm Parameters")="threshold=0.5"',
        'SCOORD3D:(,,"Image Region")=(POLYGON,,0/10/-80',
    ):
        assert concept in tree, concept


def test_sr_reads_back_with_the_same_values(
    written_sr: Path, ct_series: list[pydicom.Dataset]
) -> None:
    sr = hd.sr.srread(written_sr)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    ct = ct_series[0]
    assert sr.StudyInstanceUID == ct.StudyInstanceUID
    assert sr.SeriesInstanceUID != ct.SeriesInstanceUID
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "StudyDescription",
    ):
        assert sr[keyword].value == ct[keyword].value, keyword
    assert str(sr.PatientName) == PATIENT_NAME and sr.PatientID == PATIENT_ID
    assert sr.Modality == "SR"
    assert sr.InstitutionName == "General Hospital"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == result_uids(ANNOTATION_KEY, "1.2.0")

    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_planar_roi_measurement_groups()
    assert len(groups) == 4

    patient = report.get_planar_roi_measurement_groups(tracking_uid=tracking_uid(ANNOTATION_KEY))
    assert len(patient) == 1
    group = patient[0]
    assert group.tracking_identifier == "Vertebral fracture ROI"
    assert group.finding_type == FINDING_COMPRESSION_FRACTURE
    assert [site.value for site in group.finding_sites] == [codes.SCT.L1Vertebra]
    (probability,) = group.get_measurements(name=codes.DCM.ProbabilityOfCancer)
    assert probability.value == pytest.approx(0.91)
    assert probability.unit == codes.UCUM.NoUnits
    assert probability.derivation == codes.SCT.Maximum
    (pathology,) = group.get_qualitative_evaluations(name=codes.DCM.Pathology)
    assert pathology.value == codes.SCT.Malignant
    roi = group.roi
    assert isinstance(roi, hd.sr.ImageRegion3D)
    assert roi.graphic_type == hd.sr.GraphicTypeValues3D.POLYGON
    assert roi.frame_of_reference_uid == ct.FrameOfReferenceUID
    expected = [(0.0, y, z) for y, z in (*POLYGON, POLYGON[0])]
    np.testing.assert_allclose(roi.value, expected, atol=1e-4)

    algorithm_items = hd.sr.utils.find_content_items(probability[0], name=codes.DCM.AlgorithmName)
    assert [item.value for item in algorithm_items] == ["resnet50-li2021"]
    versions = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmVersion)
    assert [item.value for item in versions] == ["1.2.0"]
    parameters = hd.sr.utils.find_content_items(group[0], name=codes.DCM.AlgorithmParameters)
    assert "threshold=0.5" in [item.value for item in parameters]

    per_slice = {}
    for x in (-3.0, 0.0, 3.0):
        (slice_group,) = report.get_planar_roi_measurement_groups(
            tracking_uid=tracking_uid(ANNOTATION_KEY, x)
        )
        (measurement,) = slice_group.get_measurements(name=codes.DCM.ProbabilityOfCancer)
        assert measurement.derivation is None
        assert slice_group.get_qualitative_evaluations(name=codes.DCM.Pathology) == []
        slice_roi = slice_group.roi
        assert isinstance(slice_roi, hd.sr.ImageRegion3D)
        np.testing.assert_allclose(slice_roi.value[:, 0], x)
        np.testing.assert_allclose(slice_roi.value[:, 1:], [*POLYGON, POLYGON[0]], atol=1e-4)
        per_slice[x] = measurement.value
    assert per_slice == pytest.approx({-3.0: 0.42, 0.0: 0.91, 3.0: 0.7})

    evidence = sr.get_evidence(current_procedure_only=True)
    assert sorted(evidence) == sorted(
        (image.StudyInstanceUID, image.SeriesInstanceUID, image.SOPInstanceUID, image.SOPClassUID)
        for image in ct_series
    )


def test_contributing_equipment_names_the_algorithm(written_sr: Path) -> None:
    sr = pydicom.dcmread(written_sr)
    processing = [
        item for item in sr.ContributingEquipmentSequence if item.get("DeviceUID") == DEVICE_UID
    ]
    assert len(processing) == 1
    item = processing[0]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator) == ("109102", "DCM")
    assert item.Manufacturer == "spine-triage project"
    assert item.ManufacturerModelName == "resnet50-li2021"
    assert "1.2.0" in list(item.SoftwareVersions)
    acquisition = [
        entry
        for entry in sr.ContributingEquipmentSequence
        if entry.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"
    ]
    assert [entry.Manufacturer for entry in acquisition] == ["Synthetic Scanner Co"]


def test_benign_result_reads_back_as_benign(ct_series: list[pydicom.Dataset]) -> None:
    finding = malignant_finding(
        slice_probabilities=(0.1, 0.3, 0.2),
        patient_probability=0.3,
        label="benign",
        priority="ROUTINE",
    )
    sr = build_triage_sr(ct_series, finding, algorithm(), annotation_key=ANNOTATION_KEY)
    (group,) = read_back(sr).get_planar_roi_measurement_groups(
        tracking_uid=tracking_uid(ANNOTATION_KEY)
    )
    (pathology,) = group.get_qualitative_evaluations(name=codes.DCM.Pathology)
    assert pathology.value == codes.SCT.Benign
    (probability,) = group.get_measurements(name=codes.DCM.ProbabilityOfCancer)
    assert probability.value == pytest.approx(0.3)


def test_demonstration_model_says_so_plainly(ct_series: list[pydicom.Dataset]) -> None:
    sr = build_triage_sr(
        ct_series, malignant_finding(), algorithm(demonstration=True), annotation_key="a"
    )
    assert len(sr.SeriesDescription) <= 64
    for words in ("DEMONSTRATION MODEL", "SYNTHETIC TRAINING DATA", "NOT FOR CLINICAL USE"):
        assert words in sr.SeriesDescription
    names = hd.sr.utils.find_content_items(sr, name=codes.DCM.AlgorithmName, recursive=True)
    assert names
    assert all(DEMONSTRATION_NOTICE in item.TextValue for item in names)
    normal = build_triage_sr(ct_series, malignant_finding(), algorithm(), annotation_key="a")
    assert "DEMONSTRATION" not in normal.SeriesDescription


def test_uids_are_deterministic_per_annotation_and_model_version(
    ct_series: list[pydicom.Dataset],
) -> None:
    first = build_triage_sr(ct_series, malignant_finding(), algorithm(), annotation_key="k1")
    again = build_triage_sr(ct_series, malignant_finding(), algorithm(), annotation_key="k1")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    newer_model = build_triage_sr(
        ct_series, malignant_finding(), algorithm(version="1.3.0"), annotation_key="k1"
    )
    assert newer_model.SOPInstanceUID != first.SOPInstanceUID
    other_annotation = build_triage_sr(
        ct_series, malignant_finding(), algorithm(), annotation_key="k2"
    )
    assert other_annotation.SOPInstanceUID != first.SOPInstanceUID
    assert len({*result_uids("k1", "1.2.0"), *result_uids("k1", "1.3.0")}) == 4
    for uid in (*result_uids("k1", "1.2.0"), tracking_uid("k1"), tracking_uid("k1", 3.0)):
        assert pydicom.uid.UID(uid).is_valid
    # The lesion keeps its tracking UID across model versions.
    tracking = hd.sr.utils.find_content_items(
        newer_model, name=codes.DCM.TrackingUniqueIdentifier, recursive=True
    )
    assert tracking_uid("k1") in [item.UID for item in tracking]


def test_even_slice_count_uses_the_lower_middle_slice(ct_series: list[pydicom.Dataset]) -> None:
    finding = malignant_finding(
        slices_x_mm=(6.0, -3.0, 3.0, 0.0),
        slice_probabilities=(0.2, 0.3, 0.91, 0.4),
    )
    assert finding.central_slice_x_mm == 0.0
    report = read_back(build_triage_sr(ct_series, finding, algorithm(), annotation_key="even"))
    (group,) = report.get_planar_roi_measurement_groups(tracking_uid=tracking_uid("even"))
    roi = group.roi
    assert isinstance(roi, hd.sr.ImageRegion3D)
    np.testing.assert_allclose(roi.value[:, 0], 0.0)


def test_unknown_vertebra_is_omitted_with_a_log_line(
    ct_series: list[pydicom.Dataset], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="worker.sr"):
        sr = build_triage_sr(
            ct_series, malignant_finding(vertebra="X9"), algorithm(), annotation_key="v"
        )
    assert "X9" in caplog.text
    sites = hd.sr.utils.find_content_items(sr, name=codes.SCT.FindingSite, recursive=True)
    assert sites == []


def test_thoracic_and_cervical_vertebrae_are_coded(ct_series: list[pydicom.Dataset]) -> None:
    for label, code in (
        ("T12", codes.SCT.T12Vertebra),
        ("c7", codes.SCT.C7Vertebra),
        ("S1", codes.SCT.Sacrum),
    ):
        sr = build_triage_sr(
            ct_series, malignant_finding(vertebra=label), algorithm(), annotation_key=label
        )
        sites = hd.sr.utils.find_content_items(sr, name=codes.SCT.FindingSite, recursive=True)
        assert {(item.ConceptCodeSequence[0].CodeValue) for item in sites} == {code.value}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"slice_probabilities": (0.42, 0.91)}, "one probability per slice"),
        ({"patient_probability": 0.7}, "maximum"),
        ({"label": "benign"}, "contradicts"),
        ({"priority": "ROUTINE"}, "contradicts"),
        ({"slice_probabilities": (0.42, 1.91, 0.7), "patient_probability": 1.91}, "[0, 1]"),
        ({"polygon_yz_mm": ((0.0, 0.0), (1.0, 1.0), (0.0, 0.0))}, "three distinct points"),
    ],
)
def test_inconsistent_findings_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        malignant_finding(**changes)


def test_invalid_algorithm_info_is_refused() -> None:
    with pytest.raises(ValueError, match="device_uid"):
        algorithm(device_uid="not-a-uid")
    with pytest.raises(ValueError, match="name"):
        algorithm(name="x" * 65)


def test_source_images_of_two_studies_are_refused(ct_series: list[pydicom.Dataset]) -> None:
    other_study, other_frame = new_study()
    mixed = [*ct_series, *axial_series(other_study, other_frame, slices=1)]
    with pytest.raises(ValueError, match="studies"):
        build_triage_sr(mixed, malignant_finding(), algorithm(), annotation_key="m")
    with pytest.raises(ValueError, match="evidence"):
        build_triage_sr([], malignant_finding(), algorithm(), annotation_key="m")


def test_source_image_missing_type2_attributes_still_gives_a_valid_sr(
    tmp_path: Path, ct_series: list[pydicom.Dataset]
) -> None:
    del ct_series[0].AccessionNumber
    del ct_series[0].StudyID
    sr = build_triage_sr(ct_series, malignant_finding(), algorithm(), annotation_key="t2")
    assert sr.AccessionNumber == "" or sr.AccessionNumber is None
    assert "AccessionNumber" not in ct_series[0]
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    returncode, lines = dciodvfy_messages(path)
    assert [line for line in lines if line.startswith("Error")] == []
    assert returncode == 0


def test_sr_bytes_are_a_dicom_file_with_meta(ct_series: list[pydicom.Dataset]) -> None:
    sr = build_triage_sr(ct_series, malignant_finding(), algorithm(), annotation_key="f")
    encoded = sr_to_bytes(sr)
    assert encoded[128:132] == b"DICM"
    decoded = pydicom.dcmread(BytesIO(encoded))
    assert decoded.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert decoded.file_meta.MediaStorageSOPClassUID == Comprehensive3DSRStorage


def test_synthetic_ct_helper_makes_valid_ct_images(
    tmp_path: Path, ct_series: list[pydicom.Dataset]
) -> None:
    path = tmp_path / "ct.dcm"
    pydicom.dcmwrite(path, ct_series[0], enforce_file_format=True)
    returncode, lines = dciodvfy_messages(path)
    assert [line for line in lines if line.startswith(("Error", "Warning"))] == []
    assert returncode == 0


@pytest.mark.parametrize(
    ("charset", "name"),
    [
        (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
        (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
    ],
)
def test_iso_2022_source_gives_a_valid_utf8_sr_with_the_same_names(
    tmp_path: Path, ct_series: list[pydicom.Dataset], charset: list[str], name: str
) -> None:
    source = tmp_path / "ct.dcm"
    ct_series[0].SpecificCharacterSet = charset
    ct_series[0].PatientName = name
    ct_series[0].file_meta = pydicom.dataset.FileMetaDataset()
    ct_series[0].file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ct_series[0].save_as(source, enforce_file_format=True)
    ct_series[0] = pydicom.dcmread(source)  # as the worker reads it: encoded in ISO 2022
    sr = build_triage_sr(ct_series, malignant_finding(), algorithm(), annotation_key="jp")
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == name
    returncode, lines = dciodvfy_messages(path)
    assert [line for line in lines if line.startswith("Error")] == []
    assert returncode == 0
