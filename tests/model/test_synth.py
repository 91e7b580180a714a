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
from model.serving.preprocess import build_inputs, load_roi_volume
from model.serving.roi import Roi
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
    assert list(rows[0]) == ["patient_id", "label", "series_dir", "roi"]
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
