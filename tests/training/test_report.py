"""The report and its files from a hand-made set of out-of-fold predictions."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.training.evaluate import CrossValidationConfig, write_outputs
from model.training.report import (
    FoldSummary,
    SlicePrediction,
    group_by_patient,
    read_predictions_csv,
    render_automatic_table,
    render_table,
    summarise,
)
from model.training.train import TrainConfig


def _predictions() -> list[SlicePrediction]:
    # 4 malignant (M*) and 4 benign (B*) patients, 3 slices each, 2 folds.
    table = {
        "M1": (1, [0.9, 0.8, 0.3]),  # patient max 0.9 -> TP; slices TP TP FN
        "M2": (1, [0.6, 0.2, 0.1]),  # 0.6 -> TP; TP FN FN
        "M3": (1, [0.4, 0.3, 0.2]),  # 0.4 -> FN (misclassified); FN FN FN
        "M4": (1, [0.7, 0.7, 0.7]),  # TP; TP TP TP
        "B1": (0, [0.1, 0.2, 0.1]),  # TN; TN TN TN
        "B2": (0, [0.55, 0.1, 0.1]),  # 0.55 -> FP (misclassified); FP TN TN
        "B3": (0, [0.3, 0.3, 0.3]),  # TN
        "B4": (0, [0.05, 0.4, 0.2]),  # TN
    }
    rows = []
    for number, (patient, (label, probabilities)) in enumerate(table.items()):
        for k, p in enumerate(probabilities):
            rows.append(SlicePrediction(patient, number % 2, -3.0 + 3.0 * k, p, label))
    return rows


def test_summary_numbers_match_hand_count() -> None:
    summary = summarise(_predictions(), bootstrap_resamples=200)
    patient = summary.patient_matrix
    assert (patient.true_positive, patient.false_negative) == (3, 1)
    assert (patient.true_negative, patient.false_positive) == (3, 1)
    slices = summary.slice_matrix
    # malignant slices >= 0.5: M1 2, M2 1, M4 3 -> TP 6 of 12; benign >= 0.5: B2 one -> FP 1
    assert (slices.true_positive, slices.false_negative) == (6, 6)
    assert (slices.false_positive, slices.true_negative) == (1, 11)
    assert set(summary.misclassified) == {"M3", "B2"}
    assert summary.patient_auroc is not None
    # patient scores M .9 .6 .4 .7 vs B .2 .55 .3 .4; pairs won per malignant patient:
    # .9 -> 4, .6 -> 4, .4 -> 2 + a tie with .4 (0.5), .7 -> 4
    assert summary.patient_auroc.estimate == pytest.approx((4 + 4 + 2.5 + 4) / 16)
    point = summary.operating_point
    assert point is not None
    # 95 % of 4 malignant -> all 4 -> threshold 0.4 (M3); benign >= 0.4: B2 0.55, B4 0.4
    assert point.threshold == pytest.approx(0.4)
    assert point.specificity == pytest.approx(2 / 4)


def test_outputs_are_written_and_the_report_holds_the_table(tmp_path: Path) -> None:
    predictions = _predictions()
    folds = [
        FoldSummary(0, 3, 1, 4, 5, 3, 0.41, 12.0),
        FoldSummary(1, 3, 1, 4, 4, 2, None, 10.0),
    ]
    result = write_outputs(
        tmp_path,
        predictions,
        folds,
        config=TrainConfig(),
        cv=CrossValidationConfig(folds=2, bootstrap_resamples=100),
        initialisation="random (as requested).",
        preprocessing={"input_size": 64},
        source="hand-made",
        title="Test report",
        cohort={"patients": 8},
        inputs=[],  # no images: plots fall back to the bar chart only
        seconds=1.0,
    )
    for name in ("predictions.csv", "report.md", "roc.png", "config.json"):
        assert (tmp_path / name).is_file(), name
    assert set(result.misclassified_plots) == {"M3", "B2"}
    for path in result.misclassified_plots.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = result.report.read_text()
    assert "| per slice | 24 | 0.50 | 0.92 | 70.8 % |" in report
    assert "| per patient | 8 | 0.75 | 0.75 | 75.0 % |" in report
    assert "**Initialisation:** random" in report
    assert "threshold **0.4000**" in report
    assert "misclassified/M3.png" in report
    back = read_predictions_csv(result.predictions_csv)
    assert [(r.patient_id, r.fold, r.label) for r in back] == [
        (r.patient_id, r.fold, r.label) for r in predictions
    ]
    assert [r.probability for r in back] == pytest.approx([r.probability for r in predictions])
    header = result.predictions_csv.read_text().splitlines()[0]
    assert header == ("patient_id,fold,slice_x_mm,slice_probability,patient_probability,label")
    m1 = [line for line in result.predictions_csv.read_text().splitlines() if line.startswith("M1")]
    assert all(line.split(",")[4] == "0.900000" for line in m1)


def test_patient_grouping_refuses_inconsistent_labels() -> None:
    rows = [SlicePrediction("P", 0, 0.0, 0.5, 1), SlicePrediction("P", 0, 3.0, 0.5, 0)]
    with pytest.raises(ValueError, match="one fold and one label"):
        group_by_patient(rows)


def _with_body_rois() -> list[SlicePrediction]:
    """The reader predictions above plus localiser ROIs: one on each fractured body and
    normal bodies (B2 has a suspicious one)."""
    rows = [
        SlicePrediction(r.patient_id, r.fold, r.x_mm, r.probability, r.label, row_number=1)
        for r in _predictions()
    ]
    for number, patient in enumerate(["M1", "M2", "M3", "M4", "B1", "B2", "B3", "B4"]):
        fold, label = number % 2, int(patient.startswith("M"))
        body = 0.8 if patient in ("M1", "M3") else 0.3  # M3's box finds what its ROI missed
        rows += [
            SlicePrediction(patient, fold, x, body, label, 2, False, "localiser")
            for x in (-3.0, 0.0, 3.0)
        ]
        normal = 0.7 if patient == "B2" else 0.1
        rows += [
            SlicePrediction(patient, fold, x, p, 0, 3, True, "localiser")
            for x, p in ((-3.0, normal), (0.0, 0.05), (3.0, 0.02))
        ]
    return rows


def test_normal_bodies_add_the_automatic_figures_and_leave_the_table_alone(
    tmp_path: Path,
) -> None:
    plain = summarise(_predictions(), bootstrap_resamples=100)
    summary = summarise(_with_body_rois(), bootstrap_resamples=100)
    assert render_table(summary) == render_table(plain)  # the paper's table: reader ROIs
    assert plain.automatic is None and render_automatic_table(plain) == ""
    automatic = summary.automatic
    assert automatic is not None
    assert (automatic.normal_rois, automatic.normal_patients) == (8, 8)
    assert automatic.normal_specificity == pytest.approx(7 / 8)  # B2's normal body at 0.7
    body = automatic.fractured_body_matrix
    assert body is not None and (body.true_positive, body.false_negative) == (2, 2)
    assert (body.true_negative, body.false_positive) == (4, 0)
    # patient max over all ROIs: M 0.9 0.6 0.8 0.7 all >= 0.5; B2 0.7 flagged, others not
    matrix = automatic.patient_matrix
    assert (matrix.true_positive, matrix.false_negative) == (4, 0)
    assert (matrix.true_negative, matrix.false_positive) == (3, 1)
    table = render_automatic_table(summary)
    assert "| normal vertebrae (below threshold) | 8 | – | 0.88 | – | – |" in table
    assert "| per patient, max over all ROIs | 8 | 1.00 | 0.75 | 87.5 % |" in table

    result = write_outputs(
        tmp_path,
        _with_body_rois(),
        [FoldSummary(0, 3, 1, 4, 5, 3, 0.41, 12.0), FoldSummary(1, 3, 1, 4, 4, 2, None, 10.0)],
        config=TrainConfig(),
        cv=CrossValidationConfig(folds=2, bootstrap_resamples=100),
        initialisation="random (as requested).",
        preprocessing={"input_size": 64},
        source="hand-made",
        title="Test report",
        cohort={"patients": 8},
        inputs=[],
        seconds=1.0,
    )
    report = result.report.read_text()
    assert "| per patient | 8 | 0.75 | 0.75 | 75.0 % |" in report
    assert "## Normal vertebrae and the automatic path" in report
    assert set(result.misclassified_plots) == {"M3", "B2"}  # from the paper's table
    header = result.predictions_csv.read_text().splitlines()[0]
    assert header.endswith(",label,manifest_row,roi_source,all_rois_patient_probability")
    back = read_predictions_csv(result.predictions_csv)
    assert [(r.patient_id, r.row_number, r.normal, r.source) for r in back] == [
        (r.patient_id, r.row_number, r.normal, r.source) for r in _with_body_rois()
    ]
    m3 = [line.split(",") for line in result.predictions_csv.read_text().splitlines()[1:]]
    m3 = [cells for cells in m3 if cells[0] == "M3"]
    assert {cells[4] for cells in m3} == {"0.400000"}  # the paper's patient probability
    assert {cells[8] for cells in m3} == {"0.800000"}  # over all ROIs
