"""The command line: --help reads like a manual; studies, annotations import/list/retry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_node.archive.db import make_engine, make_session_factory
from dicom_node.archive.schema import AnnotationState, RoiAnnotation
from worker.cli import build_parser, main


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPINE_TRIAGE_DATABASE_URL", database_url)
    monkeypatch.setenv("SPINE_TRIAGE_VAR_DIR", str(tmp_path / "var"))
    assert main(["db", "upgrade"]) == 0
    return database_url


def test_every_command_has_a_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {
        "node",
        "worker",
        "up",
        "db",
        "studies",
        "annotations",
        "deliveries",
        "synth",
        "preprocess",
        "train",
        "evaluate",
    } <= set(subcommands)
    for name, sub in subcommands.items():
        assert sub.description, f"{name} has no description"
        assert len(sub.format_help()) > 200, name


def test_db_current_and_studies_on_an_empty_node(
    embedded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["db", "current"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["studies"]) == 0
    assert "no studies" in capsys.readouterr().out
    assert main(["studies", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def _csv(path: Path, rows: list[str]) -> Path:
    header = "study_instance_uid,series_instance_uid,slices_x_mm,polygon_yz_mm,vertebra\n"
    path.write_text(header + "\n".join(rows) + "\n")
    return path


def test_annotations_import_is_all_or_nothing_with_errors_by_row(
    embedded: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study, series = generate_uid(), generate_uid()
    good = f'{study},{series},-3;0;3,"10 20;30 20;30 40;10 40",L1'
    bad_uid = f'1.2.abc,{series},0,"10 20;30 20;30 40",L2'
    degenerate = f'{study},{series},0,"10 20;20 20;30 20",'
    path = _csv(tmp_path / "rois.csv", [good, bad_uid, degenerate])
    assert main(["annotations", "import", str(path)]) == 1
    errors = capsys.readouterr().err
    assert "row 3: study_instance_uid" in errors and "row 4: polygon_yz_mm" in errors
    engine = make_engine(embedded)
    with make_session_factory(engine)() as session:
        assert session.scalars(select(RoiAnnotation)).all() == []  # nothing half-imported

    path = _csv(tmp_path / "rois.csv", [good])
    assert main(["annotations", "import", str(path)]) == 0
    assert "1 new annotation" in capsys.readouterr().out
    assert main(["annotations", "import", str(path)]) == 0  # the same rows again: nothing new
    assert "0 new annotation(s), 1 already known" in capsys.readouterr().out
    with make_session_factory(engine)() as session:
        row = session.scalars(select(RoiAnnotation)).one()
        assert row.slices_x_mm == [-3.0, 0.0, 3.0] and row.vertebra == "L1"
        row.state = AnnotationState.FAILED
        row.failure_reason = "series not received"
        session.commit()
    assert main(["annotations", "list", "--state", "failed"]) == 0
    assert "series not received" in capsys.readouterr().out
    assert main(["annotations", "retry"]) == 0
    with make_session_factory(engine)() as session:
        assert session.scalars(select(RoiAnnotation.state)).one() is AnnotationState.PENDING
    engine.dispose()
