"""The SR of an automatic job: one measurement group per body, most suspicious first, the
localiser named as the algorithm that placed each region, per-slice probabilities with their
polygons, Pathology only on a flagged body; valid per dciodvfy; the same object when rebuilt."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from model.serving.prediction import prediction_from_probabilities
from tests.findings import make_finding
from tests.sr.synthetic_ct import axial_series, new_study
from tests.sr.test_result_sr import algorithm, dciodvfy_messages
from worker.sr import TriageFinding, sr_to_bytes
from worker.sr_automatic import LocaliserInfo, build_automatic_sr

LOCALISER = LocaliserInfo(name="spine-triage-localiser", version="1.0")
XS = (-6.0, -3.0, 0.0, 3.0, 6.0)


def _body(z: float, probabilities: tuple[float, ...], vertebra: str | None) -> TriageFinding:
    prediction = prediction_from_probabilities(XS, probabilities, 0.5)
    return make_finding(
        polygon_yz_mm=((-20.0, z), (15.0, z), (15.0, z + 24.0), (-20.0, z + 24.0)),
        slices_x_mm=XS,
        slice_probabilities=prediction.slice_probabilities,
        patient_probability=prediction.patient_probability,
        label=prediction.label,
        priority=prediction.priority,
        threshold=0.5,
        vertebra=vertebra,
    )


BODIES = [  # inferior to superior, as the localiser gives them
    _body(-90.0, (0.05, 0.1, 0.08, 0.02, 0.04), "L3"),
    _body(-60.0, (0.3, 0.88, 0.93, 0.6, 0.2), "L2"),
    _body(-30.0, (0.1, 0.2, 0.15, 0.1, 0.05), None),
]


@pytest.fixture
def ct_series() -> list[pydicom.Dataset]:
    study_uid, frame_uid = new_study()
    return axial_series(study_uid, frame_uid)


def _build(ct_series: list[pydicom.Dataset]) -> hd.sr.Comprehensive3DSR:
    return build_automatic_sr(ct_series, BODIES, algorithm(), LOCALISER, job_key="auto:job-7")


def test_one_group_per_body_most_suspicious_first_with_the_localiser_as_placer(
    ct_series: list[pydicom.Dataset], tmp_path: Path
) -> None:
    path = tmp_path / "auto.dcm"
    path.write_bytes(sr_to_bytes(_build(ct_series)))
    sr = hd.sr.srread(path)
    groups = sr.content.get_planar_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [
        "Vertebral body L2",
        "Vertebral body 3",
        "Vertebral body L3",
    ]
    assert len({g.tracking_uid for g in groups}) == 3
    first = groups[0]
    values = [m.value for m in first.get_measurements(name=codes.DCM.ProbabilityOfCancer)]
    assert float(values[0]) == pytest.approx(0.93)  # the body's: the maximum of its slices
    assert [float(v) for v in values[1:]] == pytest.approx([0.3, 0.88, 0.93, 0.6, 0.2])
    slices = [
        item.TextValue
        for m in first.get_measurements(name=codes.DCM.ProbabilityOfCancer)[1:]
        for item in m[0].ContentSequence
        if item.ValueType == "TEXT"
    ]
    assert slices[0] == "Vertebral body L2, sagittal slice x=-6 mm"
    pathology = [e.value for e in first.get_qualitative_evaluations(name=codes.DCM.Pathology)]
    assert pathology == [codes.SCT.Malignant]
    for group in groups[1:]:  # below the threshold: no Pathology, no finding asserted
        assert group.get_qualitative_evaluations(name=codes.DCM.Pathology) == []
    algorithm_names = [
        item.TextValue
        for item in first[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111001"  # Algorithm Name
    ]
    assert algorithm_names == ["spine-triage-localiser"]
    region = first.roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues3D.POLYGON
    observer = sr.content[0].ContentSequence
    assert any(
        item.ConceptNameCodeSequence[0].CodeValue == "121005"  # Observer Type
        and item.ConceptCodeSequence[0].CodeValue == codes.DCM.Device.value
        for item in observer
    )


def test_the_automatic_sr_passes_dciodvfy_and_is_rebuilt_identically(
    ct_series: list[pydicom.Dataset], tmp_path: Path
) -> None:
    first, second = _build(ct_series), _build(ct_series)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    path = tmp_path / "auto.dcm"
    path.write_bytes(sr_to_bytes(first))
    returncode, lines = dciodvfy_messages(path)
    assert [line for line in lines if line.startswith("Error")] == []
    assert returncode == 0


def test_an_automatic_report_needs_a_body_and_its_evidence(
    ct_series: list[pydicom.Dataset],
) -> None:
    with pytest.raises(ValueError, match="at least one analysed body"):
        build_automatic_sr(ct_series, [], algorithm(), LOCALISER, job_key="k")
    with pytest.raises(ValueError, match="evidence"):
        build_automatic_sr([], BODIES, algorithm(), LOCALISER, job_key="k")
