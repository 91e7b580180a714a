"""Synthetic phantoms: valid CT DICOM, reproducible by seed, labels and features per Table 1."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from model.io.volume import load_series
from model.serving.localiser import AUTOMATIC_MARGIN_MM
from model.serving.preprocess import build_inputs, load_roi_volume
from model.serving.roi import Roi
from model.synthetic.body_rois import (
    BODY_ROI_JITTER_MM,
    bodies_in_series,
    body_roi,
    normal_bodies,
    outline_box,
)
from model.synthetic.cases import make_case, make_cohort
from tests.support import require_binary


@pytest.fixture(autouse=True)
def strict_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading and writing with pydicom's validation raising errors (STYLE.md)."""
    from pydicom import config

    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.RAISE)


@pytest.mark.parametrize(
    ("transfer_syntax", "multiframe"),
    [("explicit", False), ("j2k", False), ("rle", False), ("explicit", True), ("j2k", True)],
)
def test_generated_files_pass_dciodvfy(
    tmp_path: Path, transfer_syntax: str, multiframe: bool
) -> None:
    dciodvfy = require_binary("dciodvfy")
    case = make_case(
        tmp_path,
        patient_id="VAL1",
        label="malignant",
        seed=2,
        transfer_syntax=transfer_syntax,
        multiframe=multiframe,
    )
    path = sorted(case.series_dir.glob("*.dcm"))[0]
    result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert ("EnhancedCTImage" if multiframe else "CTImage") in output
    assert "Error" not in output, output
    ds = pydicom.dcmread(path)
    expected = pydicom.uid.EnhancedCTImageStorage if multiframe else pydicom.uid.CTImageStorage
    assert ds.SOPClassUID == expected
    assert ds.PatientName == "PHANTOM^VAL1"
    volume = load_series([path] if multiframe else sorted(case.series_dir.glob("*.dcm")))
    assert volume.series_instance_uid == case.roi.series_instance_uid


def test_case_has_series_roi_and_label(tmp_path: Path) -> None:
    case = make_case(tmp_path, patient_id="P1", label="benign", seed=4)
    files = sorted(case.series_dir.glob("*.dcm"))
    assert 40 <= len(files) <= 90
    roi = Roi.from_json(json.loads(case.roi_path.read_text()))
    assert roi == case.roi
    assert 3 <= len(roi.slices_x_mm) <= 5
    label = json.loads((tmp_path / "P1" / "label.json").read_text())
    assert label["label"] == "benign" and label["synthetic"] is True
    first = pydicom.dcmread(files[0])
    assert roi.series_instance_uid == first.SeriesInstanceUID
    assert roi.study_instance_uid == first.StudyInstanceUID
    assert 0.5 <= float(first.PixelSpacing[0]) <= 0.9
    inputs = build_inputs(load_roi_volume(files, roi), roi)  # the ROI lies inside the volume
    assert inputs.shape == (len(roi.slices_x_mm), 3, 64, 64)


def test_same_seed_same_case_other_seed_other_case(tmp_path: Path) -> None:
    first = make_case(tmp_path / "a", patient_id="P1", label="malignant", seed=11)
    again = make_case(tmp_path / "b", patient_id="P1", label="malignant", seed=11)
    other = make_case(tmp_path / "c", patient_id="P1", label="malignant", seed=12)
    assert first.roi == again.roi
    names = sorted(p.name for p in first.series_dir.iterdir())
    assert names == sorted(p.name for p in again.series_dir.iterdir())
    for name in names[:: max(1, len(names) // 5)]:
        assert (first.series_dir / name).read_bytes() == (again.series_dir / name).read_bytes()
    assert other.roi != first.roi


def test_small_case_is_fast(tmp_path: Path) -> None:
    make_case(tmp_path, patient_id="WARM", label="benign", seed=0)
    started = time.perf_counter()
    make_case(tmp_path, patient_id="T1", label="malignant", seed=5)
    assert time.perf_counter() - started < 1.5  # about 0.4 s alone; the machine is shared


def test_cohort_manifest_and_table1_features(tmp_path: Path) -> None:
    cases = make_cohort(tmp_path, patients=12, seed=3, malignant_fraction=0.5)
    with (tmp_path / "manifest.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert [r["patient_id"] for r in rows] == [c.patient_id for c in cases]
    assert list(rows[0]) == ["patient_id", "label", "series_dir", "roi", "roi_source"]
    assert {r["roi_source"] for r in rows} == {"reader"}
    for row in rows:
        assert (tmp_path / row["series_dir"]).is_dir()
        assert (tmp_path / row["roi"]).is_file()
    labels = [c.label for c in cases]
    assert labels.count("malignant") == 6
    for c in cases:
        if c.label == "malignant":
            assert c.features["bone_destruction"] and not c.features["fracture_line"]
        else:
            assert not c.features["bone_destruction"] and not c.features["soft_tissue_mass"]
    study_uids = {c.roi.study_instance_uid for c in cases}
    assert len(study_uids) == len(cases)


def _roi_hu(case) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Share of soft-tissue voxels inside the vertebral body and of bright (sclerotic) ones."""
    volume = load_roi_volume(sorted(case.series_dir.glob("*.dcm")), case.roi)
    box = case.roi.square_box_yz()
    x = float(np.mean(case.roi.slices_x_mm))
    points = np.array(
        [
            [x, box.center_y + dy, box.center_z + dz]
            for dy in np.linspace(-8, 8, 9)
            for dz in np.linspace(-6, 6, 7)
        ]
    )
    index = np.rint(volume.patient_to_index(points)).astype(int)
    values = volume.voxels[index[:, 0], index[:, 1], index[:, 2]]
    return float(np.mean(values < 90)), float(np.max(values))


def test_benign_and_malignant_look_different_where_the_roi_is(tmp_path: Path) -> None:
    malignant = [
        make_case(tmp_path, patient_id=f"M{i}", label="malignant", seed=i) for i in range(4)
    ]
    benign = [make_case(tmp_path, patient_id=f"B{i}", label="benign", seed=i) for i in range(4)]
    # Lytic destruction replaces cancellous bone (≈ 140-260 HU) by soft tissue (≈ 15-65 HU).
    soft_malignant = np.mean([_roi_hu(c)[0] for c in malignant])
    soft_benign = np.mean([_roi_hu(c)[0] for c in benign])
    assert soft_malignant > soft_benign + 0.1


@pytest.mark.parametrize(("feet_first", "reverse_order"), [(True, False), (False, True)])
def test_orientation_options(tmp_path: Path, feet_first: bool, reverse_order: bool) -> None:
    case = make_case(
        tmp_path,
        patient_id="O1",
        label="benign",
        seed=1,
        feet_first=feet_first,
        reverse_order=reverse_order,
    )
    datasets = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in case.series_dir.glob("*.dcm")),
        key=lambda d: int(d.InstanceNumber),
    )
    assert datasets[0].PatientPosition == ("FFS" if feet_first else "HFS")
    assert float(datasets[0].ImageOrientationPatient[0]) == (-1.0 if feet_first else 1.0)
    z_first, z_last = (float(d.ImagePositionPatient[2]) for d in (datasets[0], datasets[-1]))
    assert (z_first < z_last) == reverse_order


def test_full_size_options(tmp_path: Path) -> None:
    case = make_case(
        tmp_path,
        patient_id="F1",
        label="benign",
        seed=1,
        size="full",
        slices=50,
        slice_spacing_mm=3.0,
        pixel_spacing_mm=0.7,
    )
    files = sorted(case.series_dir.glob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert (len(files), first.Rows, first.Columns) == (50, 512, 512)


def test_unknown_options_and_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="colour"):
        make_case(tmp_path, patient_id="X", label="benign", seed=1, colour="red")
    with pytest.raises(ValueError, match="label"):
        make_case(tmp_path, patient_id="X", label="unknown", seed=1)


def _series_z(case) -> list[float]:  # type: ignore[no-untyped-def]
    return sorted(
        float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2])
        for p in case.series_dir.glob("*.dcm")
    )


def test_case_carries_the_phantom_and_slice_positions(tmp_path: Path) -> None:
    case = make_case(tmp_path, patient_id="T1", label="malignant", seed=3, feet_first=True)
    assert case.slice_z_mm == pytest.approx(_series_z(case), abs=1e-3)
    phantom = case.phantom
    fractured = phantom.vertebrae[phantom.abnormal_index]
    assert phantom.label == "malignant" and case.roi.vertebra == fractured.name
    assert min(case.slice_z_mm) < fractured.z_bottom < fractured.z_top < max(case.slice_z_mm)
    assert case.body_rois == ()  # asked for no normals: the reader's ROI only


def test_body_rois_do_not_change_the_case(tmp_path: Path) -> None:
    plain = make_case(tmp_path / "a", patient_id="P1", label="benign", seed=8)
    more = make_case(tmp_path / "b", patient_id="P1", label="benign", seed=8, normals=2)
    assert plain.roi == more.roi and plain.phantom == more.phantom
    for name in sorted(p.name for p in plain.series_dir.iterdir())[::10]:
        assert (plain.series_dir / name).read_bytes() == (more.series_dir / name).read_bytes()
    assert [b.label for b in more.body_rois] == ["benign", "normal", "normal"]
    assert [b.path.name for b in more.body_rois] == [
        "roi-body.json",
        "roi-normal-1.json",
        "roi-normal-2.json",
    ]
    for body in more.body_rois:
        assert Roi.from_json(json.loads(body.path.read_text())) == body.roi
    label = json.loads((tmp_path / "b" / "P1" / "label.json").read_text())
    assert [b["label"] for b in label["body_rois"]] == ["benign", "normal", "normal"]


def _mass_front_y(case) -> float:  # type: ignore[no-untyped-def]
    """The most anterior y (LPS mm) of the phantom's anterior paravertebral masses."""
    phantom = case.phantom
    fronts = [
        float(phantom.center_y_at(np.array(m.center[2])))
        + (m.center[1] - phantom.spine_y)
        - m.radii[1]
        for m in phantom.masses
        if m.center[1] < phantom.spine_y
    ]
    return min(fronts) if fronts else float("inf")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_body_rois_follow_the_body_like_the_localiser(tmp_path: Path, seed: int) -> None:
    case = make_case(tmp_path, patient_id=f"B{seed}", label="malignant", seed=seed, normals=3)
    phantom = case.phantom
    files = sorted(case.series_dir.glob("*.dcm"))
    inside = bodies_in_series(phantom, case.slice_z_mm)
    assert phantom.abnormal_index in inside
    slack = BODY_ROI_JITTER_MM + 0.01
    for body in case.body_rois:
        index = body.vertebra_index
        assert index in inside
        truth = outline_box(phantom, index)
        ys = [y for y, _ in body.roi.polygon_yz_mm]
        zs = [z for _, z in body.roi.polygon_yz_mm]
        # the outline rectangle, widened in front and behind by the localiser's margin
        assert abs(min(ys) - (truth.y_min - AUTOMATIC_MARGIN_MM)) <= slack
        assert abs(max(ys) - (truth.y_max + AUTOMATIC_MARGIN_MM)) <= slack
        assert abs(min(zs) - truth.z_min) <= slack and abs(max(zs) - truth.z_max) <= slack
        box = body.roi.square_box_yz()
        assert min(case.slice_z_mm) <= box.z_range[0] and box.z_range[1] <= max(case.slice_z_mm)
        vertebra = phantom.vertebrae[index]
        assert len(body.roi.slices_x_mm) == 5
        for x in body.roi.slices_x_mm:  # the inner ~60 % of the lateral extent
            assert abs(x - phantom.spine_x) <= 0.63 * vertebra.radius_x + BODY_ROI_JITTER_MM
        spread = max(body.roi.slices_x_mm) - min(body.roi.slices_x_mm)
        assert spread >= 2 * 0.57 * vertebra.radius_x
        assert body.roi.vertebra == vertebra.name
        build_inputs(load_roi_volume(files, body.roi), body.roi)  # inside the volume
    fractured = case.body_rois[0]
    assert fractured.label == "malignant" and fractured.vertebra_index == phantom.abnormal_index
    normals = [b.vertebra_index for b in case.normal_rois]
    assert set(normals) <= set(normal_bodies(phantom, case.slice_z_mm))
    assert not set(normals) & {phantom.abnormal_index + d for d in (-1, 0, 1)}
    assert len(normals) == min(3, len(normal_bodies(phantom, case.slice_z_mm)))

    # without the margin the box is tight on the body: inside its truth box, the mass left out
    tight = body_roi(
        phantom,
        phantom.abnormal_index,
        np.random.default_rng(seed),
        study_instance_uid=case.roi.study_instance_uid,
        series_instance_uid=case.roi.series_instance_uid,
        slice_z_mm=case.slice_z_mm,
        margin_mm=0.0,
    )
    truth = outline_box(phantom, phantom.abnormal_index)
    ys = [y for y, _ in tight.polygon_yz_mm]
    assert truth.y_min - slack <= min(ys) <= truth.y_min + slack
    assert truth.y_max - slack <= max(ys) <= truth.y_max + slack
    mass_front = _mass_front_y(case)
    if mass_front < float("inf"):
        # the reader's box takes the mass in, the tight box is on the body alone
        assert min(y for y, _ in case.roi.polygon_yz_mm) <= mass_front + 1.5
        assert min(ys) > mass_front + 2.0


def test_normal_bodies_of_a_benign_case_are_uncompressed(tmp_path: Path) -> None:
    for seed in range(4):
        case = make_case(tmp_path / str(seed), patient_id="N", label="benign", seed=seed)
        for index in normal_bodies(case.phantom, case.slice_z_mm):
            vertebra = case.phantom.vertebrae[index]
            assert index != case.phantom.abnormal_index
            assert vertebra.wedge_fraction == vertebra.biconcave_fraction == 0.0


def test_body_roi_refuses_a_body_outside_the_series(tmp_path: Path) -> None:
    case = make_case(tmp_path, patient_id="O", label="benign", seed=2)
    outside = [
        i
        for i in range(len(case.phantom.vertebrae))
        if i not in bodies_in_series(case.phantom, case.slice_z_mm)
    ]
    assert outside  # the column reaches past the series at both ends
    with pytest.raises(ValueError, match="not inside the series"):
        body_roi(
            case.phantom,
            outside[0],
            np.random.default_rng(0),
            study_instance_uid=case.roi.study_instance_uid,
            series_instance_uid=case.roi.series_instance_uid,
            slice_z_mm=case.slice_z_mm,
        )


def test_cohort_with_normals_lists_every_roi(tmp_path: Path) -> None:
    cases = make_cohort(tmp_path, patients=4, seed=5, normals=2)
    with (tmp_path / "manifest.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == sum(1 + len(c.body_rois) for c in cases)
    for case in cases:
        mine = [r for r in rows if r["patient_id"] == case.patient_id]
        assert [r["roi_source"] for r in mine][:2] == ["reader", "localiser"]
        assert {r["label"] for r in mine} == {case.label, "normal"} or (
            not case.normal_rois and {r["label"] for r in mine} == {case.label}
        )
        assert len({r["series_dir"] for r in mine}) == 1


def test_synth_command_writes_body_rois(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from worker.cli import main

    out = tmp_path / "synthetic"
    assert (
        main(["synth", "--out", str(out), "--patients", "2", "--seed", "5", "--normals", "1"]) == 0
    )
    assert "ROIs on normal bodies" in capsys.readouterr().out
    with (out / "manifest.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert {r["roi_source"] for r in rows} == {"reader", "localiser"}
    assert sum(r["roi_source"] == "reader" for r in rows) == 2
    assert (
        main(["synth", "--out", str(out), "--patients", "1", "--seed", "5", "--normals", "-1"]) == 2
    )
    other = tmp_path / "from-localiser"
    args = ["synth", "--out", str(other), "--patients", "1", "--seed", "5", "--normals", "1"]
    assert main([*args, "--body-rois-from", "localiser"]) == 0
    (label,) = other.glob("*/label.json")
    assert json.loads(label.read_text())["body_rois_from"] == "localiser"


def test_body_rois_from_the_localiser_are_its_own_proposals(tmp_path: Path) -> None:
    """``body_rois_from="localiser"``: each body ROI is one the localiser proposes on the
    written series (read as an automatic job reads it), on the body it names, normal ones on
    normal bodies; the series and the reader's ROI are those of the truth-drawn case."""
    from model.io.volume import read_series_geometry
    from model.serving.localiser import localise, propose_rois
    from model.serving.overview import load_overview

    for label in ("malignant", "benign"):
        case = make_case(
            tmp_path / "localiser",
            patient_id=f"L-{label}",
            label=label,
            seed=20210,
            normals=3,
            body_roi_slices=3,
            body_rois_from="localiser",
        )
        truth = make_case(
            tmp_path / "phantom", patient_id=f"L-{label}", label=label, seed=20210, normals=3
        )
        assert case.roi == truth.roi and case.slice_z_mm == truth.slice_z_mm
        files = sorted(case.series_dir.iterdir())
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        proposed = propose_rois(
            localise(load_overview(read_series_geometry(files, headers))),
            study_instance_uid=case.roi.study_instance_uid,
            series_instance_uid=case.roi.series_instance_uid,
            slices=3,
        )
        rois = [p.roi for p in proposed]
        phantom = case.phantom
        assert case.body_rois and case.body_rois[0].label == label
        assert case.body_rois[0].vertebra_index == phantom.abnormal_index
        for body in case.body_rois:
            assert body.roi in rois, body  # the localiser's own ROI, not one drawn from truth
            assert body.roi == Roi.from_json(json.loads(body.path.read_text()))
            zs = [z for _, z in body.roi.polygon_yz_mm]
            vertebra = phantom.vertebrae[body.vertebra_index]
            assert vertebra.z_bottom <= (min(zs) + max(zs)) / 2 <= vertebra.z_top
        normals = [b.vertebra_index for b in case.normal_rois]
        assert normals and set(normals) <= set(normal_bodies(phantom, case.slice_z_mm))
        recorded = json.loads((case.series_dir.parent / "label.json").read_text())
        assert recorded["body_rois_from"] == "localiser"
    with pytest.raises(ValueError, match="body_rois_from"):
        make_case(tmp_path, patient_id="X", label="benign", seed=1, normals=1, body_rois_from="x")  # type: ignore[arg-type]
