"""An input outside the model's training domain, end to end: the real CT stored in a node
archive and triaged in-process by the worker's own jobs (a reader's ROI and the automatic job)
with the demonstration model. Neither result is flagged, whatever its probability; each says
why — in its row, in its SR (read back with highdicom, dciodvfy clean), on the worklist page
(headless Chromium) and in ``/metrics``."""

from __future__ import annotations

import statistics
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import highdicom as hd
import pytest
from pydicom.sr.codedict import codes
from sqlalchemy import select

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction, writer_lock
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import TriageResult
from dicom_node.dicom.ingest import StoreContext, store_instance
from dicom_node.settings import Settings
from dicom_node.web.app import start_http
from model.io.volume import load_series
from model.serving.localiser import localise, propose_rois
from tests.real_ct import REAL_CT_PATIENT_ID, write_real_ct_series
from tests.support import free_port, require_binary
from tests.worklist.browser import add_reader
from tests.worklist.test_page_chromium import dump_dom
from worker.automatic import run_automatic
from worker.pipeline import Outcome, run_triage
from worker.runtime import WorkerRuntime
from worker.sr import DOMAIN_SCORE, OUTSIDE_DOMAIN

OUTSIDE = "outside the model's training domain"


@dataclass
class Triaged:
    settings: Settings
    rt: WorkerRuntime
    study_uid: str
    reader: TriageResult
    automatic: TriageResult


@pytest.fixture(scope="module")
def triaged(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> Iterator[Triaged]:
    folder = tmp_path_factory.mktemp("ood")
    series_dir = folder / REAL_CT_PATIENT_ID
    paths = write_real_ct_series(series_dir)
    volume = load_series(paths)
    proposals = propose_rois(
        localise(volume),
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        slices=5,
    )
    url = f"sqlite:///{folder / 'node.db'}"
    upgrade(url)
    settings = Settings(
        _env_file=None,
        var_dir=folder / "var",
        database_url=url,
        model_checkpoint=demo_checkpoint,
        http_host="127.0.0.1",
        http_port=free_port(),
    )
    rt = WorkerRuntime.from_settings(settings)
    try:
        context = StoreContext(
            store=rt.store, sessions=rt.sessions, writer_lock=writer_lock(rt.engine)
        )
        for path in paths:
            assert store_instance(context, path.read_bytes(), transfer_syntax=None, source="t").ok
        now = datetime.now(UTC)
        # the reader's ROI: of the bodies outside the model's domain, the one the
        # demonstration model finds most "malignant"
        answers = [(rt.classifier.predict(volume, p.roi), p.roi) for p in proposals]
        outside = [(a.patient_probability, roi) for a, roi in answers if a.in_domain is False]
        assert outside, [a.domain_score for a, _ in answers]
        roi = max(outside, key=lambda pair: pair[0])[1]
        with transaction(rt.sessions) as session:
            later = now + timedelta(seconds=1)
            lifecycle.complete_quiet_studies(session, quiet_period_s=0, now=later)
            annotation_id = lifecycle.create_annotation(session, roi, source="rest", now=now).id
            (job_id,) = lifecycle.create_auto_jobs(
                session, policy="always", fallback_s=0, now=later
            )
        reader = run_triage(rt, annotation_id)
        assert reader.outcome is Outcome.DONE, reader.reason
        automatic = run_automatic(rt, job_id)
        assert automatic.outcome is Outcome.DONE and automatic.unanalysable is None
        assert reader.result_id is not None and automatic.result_id is not None
        with rt.sessions() as session:
            rows = {r.id: r for r in session.scalars(select(TriageResult))}
        yield Triaged(
            settings,
            rt,
            volume.study_instance_uid,
            rows[reader.result_id],
            rows[automatic.result_id],
        )
    finally:
        rt.close()


def test_results_outside_the_domain_are_recorded_and_not_flagged(triaged: Triaged) -> None:
    for result in (triaged.reader, triaged.automatic):
        assert result.in_domain is False
        assert result.domain_score is not None and result.domain_threshold is not None
        assert result.domain_score > result.domain_threshold
        assert result.priority == "ROUTINE"
    assert triaged.automatic.bodies
    for body in triaged.automatic.bodies:  # the series is outside: every body reported so
        assert body["in_domain"] is False and body["priority"] == "ROUTINE", body
    scores = [body["domain_score"] for body in triaged.automatic.bodies]
    threshold = triaged.automatic.domain_threshold
    assert all(isinstance(score, float) for score in scores) and threshold is not None
    assert statistics.median(scores) > threshold  # most of its bodies lie outside


def test_the_sr_says_the_input_is_outside_the_training_domain(triaged: Triaged) -> None:
    for result in (triaged.reader, triaged.automatic):
        path = triaged.settings.resolved_storage_dir / result.sr_path
        sr = hd.sr.srread(path)
        group = sr.content.get_planar_roi_measurement_groups()[0]  # type: ignore[attr-defined]
        [evaluation] = group.get_qualitative_evaluations(name=OUTSIDE_DOMAIN)
        assert evaluation.value == codes.SCT.Yes
        assert group.get_qualitative_evaluations(name=codes.DCM.Pathology) == []
        [score] = group.get_measurements(name=DOMAIN_SCORE)
        assert float(score.value) == pytest.approx(result.domain_score, rel=1e-6)
        [probability, *_] = group.get_measurements(name=codes.DCM.ProbabilityOfCancer)
        assert float(probability.value) == pytest.approx(result.patient_probability, abs=1e-6)
        check = subprocess.run(
            [require_binary("dciodvfy"), str(path)], capture_output=True, text=True, check=False
        )
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert errors == [], check.stderr


def test_the_worklist_page_and_metrics_say_so(triaged: Triaged) -> None:
    require_binary("chromium")
    login = add_reader(triaged.rt.sessions)
    server = start_http(triaged.settings, triaged.rt.sessions, None)
    try:
        base = f"http://127.0.0.1:{server.port}"
        dom = dump_dom(f"{base}/#study={triaged.study_uid}", login)
        [body] = dom.by_id("worklist").find_all("tbody")
        [row] = body.find_all("tr")
        assert "row-flagged" not in (row.attrs["class"] or "")
        assert OUTSIDE in row.text
        facts = dom.by_id("detail").text
        assert f"{OUTSIDE} (score" in facts and "not flagged" in facts
        with urllib.request.urlopen(f"{base}/metrics") as response:
            metrics = response.read().decode()
        assert 'spine_triage_results_by_domain_total{domain="outside"} 2.0' in metrics
        assert 'spine_triage_results_by_domain_total{domain="inside"} 0.0' in metrics
    finally:
        server.stop()
