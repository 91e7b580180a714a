"""The cohort manifest: every row problem reported together, with its row number."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.serving.preprocess import PreprocessParams
from model.synthetic.cases import make_case
from model.training.cohort import (
    CohortError,
    load_cohort,
    patient_labels,
    read_manifest,
    rois_by_patient,
)
from model.training.folds import make_cross_validation_splits


def _write_manifest(
    path: Path, rows: list[list[str]], header: tuple[str, ...] = ("patient_id", "label")
) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, "series_dir", "roi"])
        writer.writerows(rows)


def test_loads_inputs_of_every_patient(tiny_cohort: Path) -> None:
    patients = load_cohort(tiny_cohort)
    rows = read_manifest(tiny_cohort)
    assert [p.patient_id for p in patients] == [r.patient_id for r in rows]
    assert sorted(p.label for p in patients) == [0, 0, 0, 1, 1, 1]
    size = PreprocessParams().input_size
    for patient, row in zip(patients, rows, strict=True):
        assert patient.inputs.shape == (len(row.roi.slices_x_mm), 3, size, size)
        assert patient.inputs.dtype == np.float32
        assert patient.x_mm == tuple(row.roi.slices_x_mm)
        assert patient.row_number == row.row_number
        # each input is z-scored over its whole tensor (METHOD.md)
        flat = patient.inputs.reshape(len(patient.x_mm), -1)
        assert np.allclose(flat.mean(axis=1), 0.0, atol=1e-3)


def test_all_row_problems_are_reported_together(tmp_path: Path) -> None:
    good = make_case(tmp_path / "cases", patient_id="GOOD", label="benign", seed=1)
    other = make_case(tmp_path / "cases", patient_id="OTHER", label="malignant", seed=2)
    base = tmp_path
    rel = lambda p: p.relative_to(base).as_posix()  # noqa: E731

    # a degenerate polygon (all points on one line)
    bad_roi = good.roi.to_json()
    bad_roi["polygon_yz_mm"] = [[0, 0], [1, 1], [2, 2]]
    (base / "degenerate.json").write_text(json.dumps(bad_roi))
    # an ROI far to the patient's left of the scanned volume
    outside = good.roi.to_json()
    outside["slices_x_mm"] = [480.0, 483.0, 486.0]
    (base / "outside.json").write_text(json.dumps(outside))
    (base / "not-json.json").write_text("{ this is not json")
    # a series whose pixel data is cut short (headers still readable)
    broken = base / "broken-series"
    shutil.copytree(good.series_dir, broken)
    for path in sorted(broken.iterdir()):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 4000])

    rows = [
        ["GOOD", "benign", rel(good.series_dir), rel(good.roi_path)],  # row 2: fine
        ["P3", "probably", rel(good.series_dir), rel(good.roi_path)],  # 3: unknown label
        ["P4", "benign", "no/such/folder", rel(good.roi_path)],  # 4: missing series
        ["P5", "malignant", rel(good.series_dir), "missing.json"],  # 5: missing ROI
        ["P6", "benign", rel(good.series_dir), "degenerate.json"],  # 6: invalid ROI
        ["P7", "benign", rel(good.series_dir), "not-json.json"],  # 7: unreadable ROI
        ["P8", "benign", rel(good.series_dir), "outside.json"],  # 8: ROI outside volume
        ["GOOD", "benign", rel(good.series_dir), rel(good.roi_path)],  # 9: repeated id
        ["P10", "malignant", rel(good.series_dir), rel(other.roi_path)],  # 10: wrong series
        ["P11", "benign", rel(broken), rel(good.roi_path)],  # 11: unreadable pixel data
        ["OTHER", "Malignant", rel(other.series_dir), rel(other.roi_path)],  # 12: fine
    ]
    manifest = base / "manifest.csv"
    _write_manifest(manifest, rows)

    with pytest.raises(CohortError) as caught:
        load_cohort(manifest)
    problems = {p.row_number: p.message for p in caught.value.problems}
    assert set(problems) == {3, 4, 5, 6, 7, 8, 9, 10, 11}
    assert "unknown label 'probably'" in problems[3]
    assert "does not exist" in problems[4]
    assert "missing.json" in problems[5] and "does not exist" in problems[5]
    assert "invalid" in problems[6]
    assert "not readable JSON" in problems[7]
    assert "outside" in problems[8].lower()
    assert "repeats row 2" in problems[9]
    assert other.roi.series_instance_uid in problems[10]
    assert problems[11]  # the series' own error names the problem
    text = str(caught.value)
    assert "9 problem(s)" in text
    assert "row 3 (patient P3)" in text and "row 11 (patient P11)" in text


def test_missing_columns_are_reported_before_any_row(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient,label,series_dir\nA,benign,x\n")
    with pytest.raises(CohortError) as caught:
        read_manifest(manifest)
    (problem,) = caught.value.problems
    assert problem.row_number == 1
    assert "patient_id" in problem.message and "roi" in problem.message


def test_empty_manifest_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.csv"
    _write_manifest(manifest, [])
    with pytest.raises(CohortError, match="lists no patient"):
        read_manifest(manifest)


def test_several_rows_per_patient_with_normal_bodies(tiny_cohort_with_normals: Path) -> None:
    rois = load_cohort(tiny_cohort_with_normals)
    rows = read_manifest(tiny_cohort_with_normals)
    assert len(rois) == len(rows) > 6
    by_patient = rois_by_patient(rois)
    assert len(by_patient) == 6
    labels = patient_labels(rois)
    assert sorted(labels.values()) == [0, 0, 0, 1, 1, 1]
    for patient, mine in by_patient.items():
        reader = [r for r in mine if r.source == "reader"]
        assert len(reader) == 1 and not reader[0].normal
        assert {r.label for r in mine if not r.normal} == {labels[patient]}
        assert all(r.label == 0 for r in mine if r.normal)
        assert len({row.series_dir for row in rows if row.patient_id == patient}) == 1
    normal = [r for r in rois if r.normal]
    assert normal and all(r.source == "localiser" and r.label_name == "normal" for r in normal)
    assert all(len(r.x_mm) == 3 for r in rois if r.source == "localiser")
    # folds are made over patients: a patient's ROIs all follow it
    for split in make_cross_validation_splits(labels, 3, validation_fraction=0.2, seed=0):
        sides = (set(split.train), set(split.validation), set(split.test))
        assert sum(len(s) for s in sides) == 6 and not set.intersection(*sides)


def test_contradicting_labels_and_normal_only_patients_are_refused(tmp_path: Path) -> None:
    case = make_case(tmp_path / "cases", patient_id="A", label="malignant", seed=3, normals=1)
    rel = lambda p: p.relative_to(tmp_path).as_posix()  # noqa: E731
    series = rel(case.series_dir)
    body, normal = (rel(b.path) for b in case.body_rois)
    rows = [
        ["A", "malignant", "reader", series, rel(case.roi_path)],  # row 2: fine
        ["A", "normal", "localiser", series, normal],  # 3: fine
        ["A", "benign", "localiser", series, body],  # 4: contradicts row 2
        ["B", "normal", "localiser", series, normal],  # 5: B has only normal rows
        ["C", "benign", "robot", series, body],  # 6: unknown roi_source
        ["A", "normal", "", series, normal],  # 7: the same ROI file again
        ["D", "benign", "", series, body],  # 8: fine (empty source = reader)
    ]
    manifest = tmp_path / "manifest.csv"
    _write_manifest(manifest, rows, header=("patient_id", "label", "roi_source"))
    with pytest.raises(CohortError) as caught:
        read_manifest(manifest)
    problems = {p.row_number: p.message for p in caught.value.problems}
    assert set(problems) == {4, 5, 6, 7}
    assert "contradicts row 2" in problems[4] and "'malignant'" in problems[4]
    assert "only 'normal' rows" in problems[5]
    assert "unknown roi_source 'robot'" in problems[6]
    assert "repeats row 3" in problems[7]
    assert "row 4 (patient A)" in str(caught.value)

    _write_manifest(
        manifest, [rows[0], rows[1], rows[6]], header=("patient_id", "label", "roi_source")
    )
    accepted = read_manifest(manifest)
    assert [(r.patient_id, r.label_name, r.source) for r in accepted] == [
        ("A", "malignant", "reader"),
        ("A", "normal", "localiser"),
        ("D", "benign", "reader"),
    ]
