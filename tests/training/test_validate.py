"""``spine-triage validate``: a fixed checkpoint scored on a labelled cohort, no training.

The numbers of its report are recomputed here, by hand from its predictions.csv (sensitivity,
specificity, accuracy, AUROC as the Mann-Whitney statistic, the expected calibration error,
the threshold for the target sensitivity), and its probabilities from the checkpoint served
on each manifest row's files directly."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from model.serving.inference import Classifier
from model.serving.roi import Roi
from model.synthetic.cases import make_cohort
from model.training.cohort import read_manifest
from worker.cli import main


@pytest.fixture(scope="module")
def held_out_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six phantoms the demonstration model never saw (another seed), one normal body each."""
    out = tmp_path_factory.mktemp("validation-cohort")
    make_cohort(out, patients=6, seed=97, normals=1)
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def validation(
    held_out_cohort: Path, demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("validation")
    arguments = ["validate", str(demo_checkpoint), str(held_out_cohort), "--out", str(out)]
    assert main([*arguments, "--auto", "--bootstrap", "200", "--no-progress"]) == 0
    return out


def _auroc(labels: list[int], scores: list[float]) -> float:
    positives = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    negatives = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    won = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return won / (len(positives) * len(negatives))


def _rates(labels: list[int], scores: list[float], threshold: float) -> tuple[float, float, float]:
    called = [int(s >= threshold) for s in scores]
    tp = sum(c == y == 1 for c, y in zip(called, labels, strict=True))
    tn = sum(c == y == 0 for c, y in zip(called, labels, strict=True))
    positives = sum(labels)
    return tp / positives, tn / (len(labels) - positives), (tp + tn) / len(labels)


def _ece(labels: list[int], scores: list[float]) -> float:
    bins: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for y, s in zip(labels, scores, strict=True):
        bins[min(int(s * 10), 9)].append((y, s))
    gap = sum(
        len(items) * abs(np.mean([s for _, s in items]) - np.mean([y for y, _ in items]))
        for items in bins.values()
    )
    return float(gap / len(labels))


def _table_line(name: str, labels: list[int], scores: list[float], threshold: float) -> str:
    sensitivity, specificity, accuracy = _rates(labels, scores, threshold)
    return (
        f"| {name} | {len(labels)} | {sensitivity:.2f} | {specificity:.2f} | "
        f"{100 * accuracy:.1f} % | {_auroc(labels, scores):.3f} ("
    )


def test_the_report_is_what_its_predictions_give(validation: Path, demo_checkpoint: Path) -> None:
    rows = list(csv.DictReader((validation / "predictions.csv").open()))
    reader = [r for r in rows if r["roi_source"] == "reader" and r["label"] != "normal"]
    assert reader and {r["fold"] for r in rows} == {"0"}
    threshold = Classifier.load(demo_checkpoint, device="cpu").threshold
    slice_labels = [int(r["label"] == "malignant") for r in reader]
    slice_scores = [float(r["slice_probability"]) for r in reader]
    by_patient: dict[str, list[float]] = defaultdict(list)
    label_of: dict[str, int] = {}
    for r in reader:
        by_patient[r["patient_id"]].append(float(r["slice_probability"]))
        label_of[r["patient_id"]] = int(r["label"] == "malignant")
    patients = list(by_patient)
    patient_labels = [label_of[p] for p in patients]
    patient_scores = [max(by_patient[p]) for p in patients]
    for r in reader:
        assert float(r["patient_probability"]) == pytest.approx(max(by_patient[r["patient_id"]]))

    report = (validation / "report.md").read_text()
    assert "# Validation of a fixed checkpoint" in report
    assert "## Folds" not in report
    assert _table_line("per slice", slice_labels, slice_scores, threshold) in report
    assert _table_line("per patient", patient_labels, patient_scores, threshold) in report
    assert (
        f"Expected calibration error (10 equal-width bins): per patient "
        f"{_ece(patient_labels, patient_scores):.3f}, per slice "
        f"{_ece(slice_labels, slice_scores):.3f}." in report
    )
    malignant = sorted(
        (s for s, y in zip(patient_scores, patient_labels, strict=True) if y), reverse=True
    )
    needed = int(np.ceil(0.95 * len(malignant) - 1e-9))
    assert f"threshold **{malignant[needed - 1]:.4f}**" in report
    misclassified = [
        p
        for p, y, s in zip(patients, patient_labels, patient_scores, strict=True)
        if int(s >= threshold) != y
    ]
    for patient in misclassified:
        assert (validation / "misclassified" / f"{patient}.png").is_file()
    for name in ("roc.png", "reliability.png"):
        assert (validation / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((validation / "config.json").read_text())
    assert config["checkpoint"]["sha256"] == Classifier.load(demo_checkpoint).sha256
    # the out-of-domain guard's score distribution over the cohort's ROIs (held-out phantoms)
    domain_scores = config["domain_scores"]
    guard = Classifier.load(demo_checkpoint).domain
    assert guard is not None and len(domain_scores) == config["cohort"]["rois"]
    outside = sum(score > guard.threshold for score in domain_scores)
    assert f"**{outside} of {len(domain_scores)} ROIs outside the model's training domain**" in (
        report
    )

    # the whole automatic path: per patient, max over the bodies found
    automatic = list(csv.DictReader((validation / "automatic_predictions.csv").open()))
    bodies = list(csv.DictReader((validation / "automatic_bodies.csv").open()))
    assert len(automatic) == len(patients)
    for row in automatic:
        own = [float(b["body_probability"]) for b in bodies if b["patient_id"] == row["patient_id"]]
        assert own and float(row["patient_probability"]) == pytest.approx(max(own))
    labels = [int(r["label"] == "malignant") for r in automatic]
    scores = [float(r["patient_probability"]) for r in automatic]
    sensitivity, specificity, accuracy = _rates(labels, scores, threshold)
    assert (
        f"| {sensitivity:.2f} | {specificity:.2f} | {100 * accuracy:.1f} % | "
        f"{_auroc(labels, scores):.3f} (" in report
    )


def test_its_probabilities_are_the_checkpoints_on_each_row(
    validation: Path, held_out_cohort: Path, demo_checkpoint: Path
) -> None:
    classifier = Classifier.load(demo_checkpoint, device="cpu")
    rows = list(csv.DictReader((validation / "predictions.csv").open()))
    for row in read_manifest(held_out_cohort):
        expected = classifier.predict_files(row.series_files, row.roi).slice_probabilities
        written = [
            float(r["slice_probability"])
            for r in rows
            if r["patient_id"] == row.patient_id and int(r["manifest_row"]) == row.row_number
        ]
        assert written == pytest.approx(expected, abs=2e-6)


def test_every_bad_row_is_listed_before_anything_is_scored(
    held_out_cohort: Path,
    demo_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines = held_out_cohort.read_text().splitlines()
    header, first, second, *rest = lines
    broken = first.replace("/ct", "/missing", 1)
    roi = Roi.from_json(json.loads((held_out_cohort.parent / second.split(",")[3]).read_text()))
    bad_roi = held_out_cohort.parent / "bad-roi.json"
    bad_roi.write_text(json.dumps({**roi.to_json(), "slices_x_mm": []}))
    cells = second.split(",")
    cells[3] = "bad-roi.json"
    manifest = held_out_cohort.parent / "broken.csv"
    manifest.write_text("\n".join([header, broken, ",".join(cells), *rest]) + "\n")
    out = tmp_path / "out"
    code = main(["validate", str(demo_checkpoint), str(manifest), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "row 3" in err
    assert not out.exists()


def test_a_missing_checkpoint_is_refused(
    held_out_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["validate", str(tmp_path / "none.pt"), str(held_out_cohort), "--out", str(tmp_path)]
    )
    assert code == 2
    assert "no such checkpoint" in capsys.readouterr().err
