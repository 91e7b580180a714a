"""A tiny end-to-end cross-validation and training run through the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from model.serving.checkpoint import load_checkpoint
from model.serving.inference import Classifier
from model.serving.preprocess import load_roi_volume
from model.training.cohort import load_cohort, read_manifest
from worker.cli import main

QUICK = [
    "--epochs",
    "1",
    "--augmentation-factor",
    "2",
    "--init",
    "random",
    "--threads",
    "1",
    "--no-progress",
]


def test_evaluate_writes_every_output_and_the_table(tiny_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    arguments = ["evaluate", str(tiny_cohort), "--folds", "2", "--bootstrap", "200"]
    code = main([*arguments, "--out", str(out), *QUICK])
    assert code == 0
    for name in ("predictions.csv", "report.md", "roc.png", "config.json"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"

    rows = list(csv.DictReader((out / "predictions.csv").open()))
    manifest = {r.patient_id: r for r in read_manifest(tiny_cohort)}
    assert {r["patient_id"] for r in rows} == set(manifest)
    folds_of = {}
    for row in rows:
        folds_of.setdefault(row["patient_id"], set()).add(row["fold"])
        assert row["label"] == ("malignant" if manifest[row["patient_id"]].label else "benign")
        assert 0.0 <= float(row["slice_probability"]) <= float(row["patient_probability"]) <= 1.0
    assert all(len(f) == 1 for f in folds_of.values())  # each patient in one test fold
    assert {f for fs in folds_of.values() for f in fs} == {"0", "1"}
    for patient, row in manifest.items():
        slices = sorted(float(r["slice_x_mm"]) for r in rows if r["patient_id"] == patient)
        assert slices == pytest.approx(sorted(row.roi.slices_x_mm), abs=1e-3)

    report = (out / "report.md").read_text()
    assert "| level | n | sensitivity | specificity | accuracy | AUROC (95 % CI) |" in report
    assert "| per slice |" in report and "| per patient | 6 |" in report
    assert "**Initialisation:** random" in report
    assert "Threshold for 95 % per-patient sensitivity" in report
    assert "Brier score" in report
    misclassified = report.split("## Misclassified patients")[1].split("## Folds")[0]
    plots = (
        sorted((out / "misclassified").glob("*.png")) if (out / "misclassified").exists() else []
    )
    assert len(plots) == misclassified.count("![")

    config = json.loads((out / "config.json").read_text())
    assert config["cross_validation"]["folds"] == 2
    assert config["cross_validation"]["fold_seed"] == 0
    assert config["fold_training_seeds"] == [0, 1]
    assert config["training"]["epochs"] == 1
    assert config["training"]["augmentation_factor"] == 2
    assert config["training"]["learning_rate"] == 1e-4 and config["training"]["beta1"] == 0.5


def test_train_writes_a_servable_checkpoint_with_its_config(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code = main(["train", str(tiny_cohort), "--out", str(out), "--version", "t1", *QUICK])
    assert code == 0
    _, meta = load_checkpoint(out / "model.pt")
    assert meta["name"] == "spine-triage" and meta["version"] == "t1"
    assert meta["demonstration"] is False
    training = meta["training"]
    assert training["config"]["batch_size"] == 32
    assert training["config"]["weight_decay"] == 1e-4
    assert training["cohort"] == {
        "patients": 6,
        "malignant": 3,
        "benign": 3,
        "rois": 6,
        "normal_rois": 0,
        "slices": sum(len(r.roi.slices_x_mm) for r in read_manifest(tiny_cohort)),
    }
    assert meta["task"] == "reader-roi"  # no normal bodies: the paper's task
    assert training["init_used"] == "random"
    assert training["train_patients"] + training["validation_patients"] == 6
    assert training["validation_patients"] >= 1
    written = json.loads((out / "config.json").read_text())
    assert written["training"]["config"] == training["config"]
    assert written["sha256"] == meta["sha256"]

    # the serving path reproduces the training-time inputs and gives probabilities
    classifier = Classifier.load(out / "model.pt", device="cpu")
    row = read_manifest(tiny_cohort)[0]
    volume = load_roi_volume(list(row.series_files), row.roi)
    prediction = classifier.predict(volume, row.roi)
    (patient,) = [p for p in load_cohort(tiny_cohort) if p.patient_id == row.patient_id]
    direct = classifier.predict_inputs(patient.inputs)
    assert np.allclose(prediction.slice_probabilities, direct, atol=1e-5)


def test_normal_bodies_train_the_automatic_task(
    tiny_cohort_with_normals: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code = main(["train", str(tiny_cohort_with_normals), "--out", str(out), *QUICK])
    assert code == 0
    _, meta = load_checkpoint(out / "model.pt")
    assert meta["task"] == "automatic"
    rows = read_manifest(tiny_cohort_with_normals)
    cohort = meta["training"]["cohort"]
    assert (cohort["patients"], cohort["malignant"], cohort["benign"]) == (6, 3, 3)
    assert cohort["rois"] == len(rows)
    assert cohort["normal_rois"] == sum(r.normal for r in rows) > 0
    assert meta["training"]["train_patients"] + meta["training"]["validation_patients"] == 6
    assert "normal_specificity" in meta["training"]["validation_metrics"]


def test_evaluate_with_normal_bodies_reports_the_normal_vertebrae(
    tiny_cohort_with_normals: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cv"
    arguments = ["evaluate", str(tiny_cohort_with_normals), "--folds", "2", "--bootstrap", "50"]
    assert main([*arguments, "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "| per patient | 6 |" in printed  # the paper's table: one reader ROI per patient
    assert "| normal vertebrae (below threshold) |" in printed
    report = (out / "report.md").read_text()
    assert "## Normal vertebrae and the automatic path" in report
    assert "| per patient | 6 |" in report
    assert (
        "| per slice | "
        + str(
            sum(
                len(r.roi.slices_x_mm)
                for r in read_manifest(tiny_cohort_with_normals)
                if r.source == "reader"
            )
        )
        + " |"
        in report
    )
    assert "| normal vertebrae (below threshold) |" in report
    assert "| fractured bodies, localiser ROIs | 6 |" in report
    assert "| per patient, max over all ROIs | 6 |" in report

    rows = list(csv.DictReader((out / "predictions.csv").open()))
    manifest = read_manifest(tiny_cohort_with_normals)
    assert {int(r["manifest_row"]) for r in rows} == {m.row_number for m in manifest}
    folds_of: dict[str, set[str]] = {}
    for row in rows:
        folds_of.setdefault(row["patient_id"], set()).add(row["fold"])
        assert float(row["slice_probability"]) <= float(row["all_rois_patient_probability"])
    assert all(len(f) == 1 for f in folds_of.values())  # a patient's ROIs in one test fold
    labels = {int(r["manifest_row"]): (r["label"], r["roi_source"]) for r in rows}
    for m in manifest:
        assert labels[m.row_number] == (m.label_name, m.source)


def test_train_synthetic_marks_a_demonstration_model(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    code = main(["train", "--synthetic", "4", "--out", str(out), *QUICK])
    assert code == 0
    _, meta = load_checkpoint(out / "model.pt")
    assert meta["demonstration"] is True
    assert "not for clinical use" in meta["intended_use"].lower()
    assert "synthetic" in meta["intended_use"].lower()
    assert meta["training"]["config"]["epochs"] == 1  # the flag overrides the recipe
    assert meta["task"] == "automatic"  # the recipe's phantoms have normal bodies


def test_a_bad_manifest_stops_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("patient_id,label,series_dir,roi\nA,unsure,nowhere,none.json\n")
    code = main(["train", str(manifest), "--out", str(tmp_path / "out"), *QUICK])
    assert code == 2
    err = capsys.readouterr().err
    assert "row 2 (patient A)" in err and "unknown label" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_invalid_settings_are_refused_plainly(
    tiny_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "out")
    assert main(["train", str(tiny_cohort), "--out", out, "--lr", "-1", *QUICK]) == 2
    assert "invalid setting: learning rate must be positive" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_cohort), "--out", out, "--folds", "1", *QUICK]) == 2
    assert "cannot split the cohort: cross-validation needs at least 2 folds" in (
        capsys.readouterr().err
    )
    assert main(["evaluate", str(tiny_cohort), "--out", out, "--folds", "7", *QUICK]) == 2
    assert "6 patients cannot fill 7 test folds" in capsys.readouterr().err
