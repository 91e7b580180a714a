"""``evaluate --auto``: the whole automatic path inside cross-validation."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from model.serving.preprocess import PreprocessParams
from model.training.automatic import (
    AUTOMATIC_COLUMNS,
    AutomaticPrediction,
    BodyScore,
    prepare_automatic,
    render_automatic_path_section,
    summarise_automatic_path,
    write_automatic_csv,
)
from model.training.cohort import read_manifest
from model.training.evaluate import CrossValidationConfig, write_outputs
from model.training.report import FoldSummary, SlicePrediction
from model.training.train import TrainConfig
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


def test_evaluate_auto_runs_the_automatic_path_on_every_test_patient(
    tiny_cohort_with_normals: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cv"
    arguments = ["evaluate", str(tiny_cohort_with_normals), "--folds", "2", "--bootstrap", "50"]
    assert main([*arguments, "--auto", "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    assert "| per patient | 6 |" in printed  # the reader-ROI table stays
    assert "| per patient, max over the bodies found | 6 |" in printed
    assert "could not be analysed (counted as not flagged)" in printed

    manifest = read_manifest(tiny_cohort_with_normals)
    labels = {r.patient_id: r.label_name for r in manifest if not r.normal}
    patients = list(csv.DictReader((out / "automatic_predictions.csv").open()))
    assert tuple(patients[0]) == AUTOMATIC_COLUMNS
    assert sorted(p["patient_id"] for p in patients) == sorted(labels)  # one row each
    assert {p["fold"] for p in patients} == {"0", "1"}
    slice_rows = list(csv.DictReader((out / "predictions.csv").open()))
    fold_of = {r["patient_id"]: r["fold"] for r in slice_rows}
    bodies = list(csv.DictReader((out / "automatic_bodies.csv").open()))
    for patient in patients:
        pid = patient["patient_id"]
        assert patient["fold"] == fold_of[pid]  # tested by the model of its own fold
        assert patient["label"] == labels[pid]
        own = [b for b in bodies if b["patient_id"] == pid]
        assert {b["fold"] for b in own} <= {patient["fold"]}
        assert int(patient["bodies_found"]) == len(own)
        if patient["unanalysable"]:
            assert not own and patient["patient_probability"] == ""
            continue
        for body in own:
            slices = [float(q) for q in body["slice_probabilities"].split()]
            assert len(slices) == len(body["slice_x_mm"].split()) == 5
            assert float(body["body_probability"]) == pytest.approx(max(slices), abs=1e-6)
        top = max(own, key=lambda b: float(b["body_probability"]))
        assert float(patient["patient_probability"]) == pytest.approx(
            float(top["body_probability"]), abs=1e-6
        )
        assert patient["top_body_centre_z_mm"] == top["centre_z_mm"]
        assert patient["top_body_on_fracture"] in ("yes", "no")

    report = (out / "report.md").read_text()
    assert "## The automatic path (`--auto`)" in report
    assert "| per patient, max over the bodies found | 6 |" in report
    assert "**count as not flagged**" in report
    assert report.index("## Results") < report.index("## The automatic path")
    assert report.index("## Normal vertebrae") < report.index("## The automatic path")
    config = json.loads((out / "config.json").read_text())
    assert config["automatic_path"]["patients"] == 6
    assert config["automatic_path"]["bodies"] == len(bodies)


def test_a_series_too_short_to_localise_is_unanalysable(tiny_cohort: Path) -> None:
    rows = read_manifest(tiny_cohort)
    short = replace(rows[0], series_files=rows[0].series_files[:6])
    patients = prepare_automatic([short, *rows[1:]], PreprocessParams())
    assert list(patients) == [r.patient_id for r in rows]
    failed = patients[rows[0].patient_id]
    assert failed.bodies == () and failed.unanalysable is not None
    assert "too few slices" in failed.unanalysable
    found = patients[rows[1].patient_id]
    assert found.unanalysable is None and len(found.bodies) >= 2
    assert all(b.inputs.shape == (5, 3, 64, 64) for b in found.bodies)
    assert found.fracture_z_mm is not None


def _body(z: float, *probabilities: float) -> BodyScore:
    return BodyScore(
        "L1", z, 0.9, tuple(float(k) for k in range(len(probabilities))), probabilities
    )


def _hand_made() -> list[AutomaticPrediction]:
    return [
        AutomaticPrediction("M1", 0, 1, (_body(10, 0.2, 0.9), _body(40, 0.3)), None, (35, 45)),
        AutomaticPrediction("M2", 1, 1, (_body(10, 0.6),), None, (30, 40)),  # flagged elsewhere
        AutomaticPrediction("M3", 0, 1, (), "too few slices (6) for localisation"),
        AutomaticPrediction("B1", 1, 0, (_body(10, 0.1), _body(40, 0.4)), None),
        AutomaticPrediction("B2", 0, 0, (_body(10, 0.7),), None),
        AutomaticPrediction("B3", 1, 0, (), "no spine in the field of view"),
    ]


def test_unanalysable_patients_count_as_not_flagged() -> None:
    predictions = _hand_made()
    assert predictions[0].probability == 0.9 and predictions[0].top_on_fracture is False
    assert predictions[2].probability is None and predictions[2].score == 0.0
    summary = summarise_automatic_path(predictions, threshold=0.5, bootstrap_resamples=50)
    assert (summary.patient_count, summary.analysed, summary.unanalysable) == (6, 4, 2)
    assert summary.unanalysable_reasons == {
        "too few slices (6) for localisation": 1,
        "no spine in the field of view": 1,
    }
    m = summary.matrix
    assert (m.true_positive, m.false_negative) == (2, 1)  # M3 not analysable: a miss
    assert (m.true_negative, m.false_positive) == (2, 1)  # B3 not analysable: not flagged
    assert summary.bodies_mean == pytest.approx(6 / 4)
    assert (summary.bodies_min, summary.bodies_max) == (1, 2)
    assert (summary.flagged_malignant, summary.flagged_on_fracture) == (2, 0)
    assert summary.auroc is not None
    # scores M .9 .6 0 vs B .4 .7 0: M1 wins 3, M2 wins 2, M3 ties B3 (0.5)
    assert summary.auroc.estimate == pytest.approx((3 + 2 + 0.5) / 9)
    section = "\n".join(
        render_automatic_path_section(summary, csv_name="a.csv", bodies_csv_name="b.csv")
    )
    assert "| per patient, max over the bodies found | 6 | 2 | 1.5 (1–2) |" in section
    assert "- too few slices (6) for localisation: 1" in section


def test_the_automatic_csv_has_one_row_per_patient(tmp_path: Path) -> None:
    path = tmp_path / "automatic_predictions.csv"
    write_automatic_csv(path, _hand_made())
    rows = list(csv.DictReader(path.open()))
    assert [r["patient_id"] for r in rows] == ["M1", "M2", "M3", "B1", "B2", "B3"]
    assert rows[0]["patient_probability"] == "0.900000"
    assert rows[0]["top_body_centre_z_mm"] == "10.00" and rows[0]["top_body_vertebra"] == "L1"
    assert rows[0]["bodies_found"] == "2" and rows[0]["top_body_on_fracture"] == "no"
    assert rows[2]["patient_probability"] == "" and rows[2]["bodies_found"] == "0"
    assert rows[2]["unanalysable"] == "too few slices (6) for localisation"


def test_without_auto_the_outputs_are_unchanged(tmp_path: Path) -> None:
    predictions = [
        SlicePrediction(p, k % 2, 0.0, q, label)
        for k, (p, label, q) in enumerate(
            [("M1", 1, 0.8), ("M2", 1, 0.3), ("B1", 0, 0.2), ("B2", 0, 0.6)]
        )
    ]
    result = write_outputs(
        tmp_path,
        predictions,
        [FoldSummary(0, 1, 0, 2, 1, 1, None, 1.0), FoldSummary(1, 1, 0, 2, 1, 1, None, 1.0)],
        config=TrainConfig(),
        cv=CrossValidationConfig(folds=2, bootstrap_resamples=20),
        initialisation="random (as requested).",
        preprocessing={},
        source="hand-made",
        title="Test report",
        cohort={"patients": 4},
        inputs=[],
        seconds=1.0,
    )
    assert result.automatic is None and result.automatic_csv is None
    assert not (tmp_path / "automatic_predictions.csv").exists()
    assert not (tmp_path / "automatic_bodies.csv").exists()
    assert "automatic path (`--auto`)" not in result.report.read_text()
    assert "automatic_path" not in json.loads(result.config_json.read_text())
