"""``spine-triage classify``: one study from files on disk gives the probabilities the worker
gives it — in every encoding the node stores.

The same study is stored in a real node archive (SQLite, the ingest path) and triaged
in-process by the worker's own jobs: the reader's job (:func:`worker.pipeline.run_triage`)
on its ROI and the automatic job (:func:`worker.automatic.run_automatic`); the command's
``--json`` answers from the study's files must be theirs."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from sqlalchemy import select

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction, writer_lock
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import TriageResult
from dicom_node.dicom.ingest import StoreContext, store_instance
from dicom_node.settings import Settings
from model.synthetic.cases import SynthCase, make_case
from worker.automatic import run_automatic
from worker.cli import main
from worker.pipeline import Outcome, run_triage
from worker.runtime import WorkerRuntime

ENCODINGS: dict[str, dict[str, Any]] = {
    "explicit": {"transfer_syntax": "explicit"},
    "implicit": {"transfer_syntax": "explicit"},  # re-encoded below
    "jpeg2000-lossless": {"transfer_syntax": "j2k"},
    "rle": {"transfer_syntax": "rle"},
    "enhanced-multiframe": {"multiframe": True},
}


def _implicit(folder: Path) -> None:
    for path in sorted(folder.rglob("*.dcm")):
        dataset = pydicom.dcmread(path)
        dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        dataset.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian


def _case(tmp_path: Path, encoding: str) -> SynthCase:
    case = make_case(
        tmp_path / "cases",
        patient_id=f"CLS-{encoding}",
        label="malignant",
        seed=41,
        **ENCODINGS[encoding],
    )
    if encoding == "implicit":
        _implicit(case.series_dir)
    return case


def _worker_results(tmp_path: Path, case: SynthCase, checkpoint: Path) -> dict[str, Any]:
    """The reader's job and the automatic job, run by the worker on the stored study."""
    url = f"sqlite:///{tmp_path / 'node.db'}"
    upgrade(url)
    settings = Settings(
        _env_file=None, var_dir=tmp_path / "var", database_url=url, model_checkpoint=checkpoint
    )
    rt = WorkerRuntime.from_settings(settings)
    try:
        context = StoreContext(
            store=rt.store, sessions=rt.sessions, writer_lock=writer_lock(rt.engine)
        )
        for path in sorted(Path(case.series_dir).rglob("*.dcm")):
            assert store_instance(context, path.read_bytes(), transfer_syntax=None, source="t").ok
        now = datetime.now(UTC)
        with transaction(rt.sessions) as session:
            later = now + timedelta(seconds=1)
            lifecycle.complete_quiet_studies(session, quiet_period_s=0, now=later)
            annotation_id = lifecycle.create_annotation(
                session, case.roi, source="rest", now=now
            ).id
            (job_id,) = lifecycle.create_auto_jobs(
                session, policy="always", fallback_s=0, now=later
            )
        reader = run_triage(rt, annotation_id)
        assert reader.outcome is Outcome.DONE, reader.reason
        automatic = run_automatic(rt, job_id)
        assert automatic.outcome is Outcome.DONE and automatic.unanalysable is None
        with rt.sessions() as session:
            rows = {
                r.id: (list(r.slice_probabilities), r.patient_probability, r.priority, r.bodies)
                for r in session.scalars(select(TriageResult))
            }
            domains = {
                r.id: {"score": r.domain_score, "in_domain": r.in_domain}
                for r in session.scalars(select(TriageResult))
            }
        assert reader.result_id is not None and automatic.result_id is not None
        return {
            "reader": rows[reader.result_id],
            "auto": rows[automatic.result_id],
            "reader_domain": domains[reader.result_id],
        }
    finally:
        rt.close()


def _classify(capsys: pytest.CaptureFixture[str], *arguments: str) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["--log-level", "WARNING", "classify", *arguments, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_classify_gives_the_workers_probabilities(
    encoding: str,
    tmp_path: Path,
    demo_checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SPINE_TRIAGE_VAR_DIR", str(tmp_path / "cli-var"))
    case = _case(tmp_path, encoding)
    worker = _worker_results(tmp_path, case, demo_checkpoint)
    folder, model = str(case.series_dir), str(demo_checkpoint)

    sr_path = tmp_path / "reader-sr.dcm"
    reader = _classify(
        capsys, folder, "--roi", str(case.roi_path), "--checkpoint", model, "--sr", str(sr_path)
    )
    slices, patient, priority, _ = worker["reader"]
    assert reader["slice_probabilities"] == pytest.approx(slices, abs=1e-6)
    assert reader["patient_probability"] == pytest.approx(patient, abs=1e-6)
    assert reader["priority"] == priority
    assert reader["slice_x_mm"] == list(case.roi.slices_x_mm)
    assert set(reader["domain"]) == {"score", "threshold", "in_domain"}
    assert reader["domain"]["in_domain"] == worker["reader_domain"]["in_domain"]
    assert reader["domain"]["score"] == pytest.approx(worker["reader_domain"]["score"], rel=1e-5)
    sr = hd.sr.srread(sr_path)
    assert sr.StudyInstanceUID == case.roi.study_instance_uid

    auto = _classify(capsys, folder, "--auto", "--checkpoint", model)
    slices, patient, priority, bodies = worker["auto"]
    assert auto["patient_probability"] == pytest.approx(patient, abs=1e-6)
    assert auto["priority"] == priority
    assert auto["slice_probabilities"] == pytest.approx(slices, abs=1e-6)
    assert [b["vertebra"] for b in auto["bodies"]] == [b["vertebra"] for b in bodies]
    for mine, theirs in zip(auto["bodies"], bodies, strict=True):
        assert mine["slice_x_mm"] == pytest.approx(theirs["slice_x_mm"])
        assert mine["slice_probabilities"] == pytest.approx(theirs["slice_probabilities"], abs=1e-6)
        assert mine["priority"] == theirs["priority"]
