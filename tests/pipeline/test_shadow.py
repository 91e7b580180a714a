"""Checkpoint pinning and shadow mode, through the worker's own functions with real
components: the demonstration model as the live checkpoint, a candidate derived from it
(its final layer rescaled, another version), a real database, the real store, the SR read
back with highdicom, a folder destination as the PACS.

Shadow mode end to end: two checkpoints, one job, two results, one delivery."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.archive import lifecycle
from dicom_node.archive.db import transaction, writer_lock
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import Delivery, TriageResult
from dicom_node.dicom.ingest import StoreContext, store_instance
from dicom_node.settings import Settings
from dicom_node.web.worklist_query import WorklistFilter, build_study_detail, build_worklist
from model.serving import checkpoint
from model.synthetic.cases import make_case
from tests.system import case_files
from worker.automatic import run_automatic
from worker.cli import main
from worker.delivery import DeliveryOutcome, run_delivery
from worker.pipeline import Outcome, run_triage
from worker.runtime import CheckpointRefused, WorkerRuntime, verify_checkpoints

CANDIDATE_VERSION = "demo-candidate-1"


def derive_checkpoint(source: Path, target: Path, *, version: str, scale: float) -> str:
    """Another checkpoint from ``source``: its final layer rescaled (logits × ``scale``, a
    negative shift), under ``version``; an out-of-domain description (of the features before
    that layer, unchanged) kept. Returns its sha256."""
    state_dict, meta = checkpoint.load_checkpoint(source)
    state_dict["fc.weight"] = state_dict["fc.weight"] * scale
    state_dict["fc.bias"] = state_dict["fc.bias"] * scale - 0.5
    meta = {key: value for key, value in meta.items() if key != "sha256"}
    meta["version"] = version
    if "domain" not in meta:
        return checkpoint.save_checkpoint(target, state_dict, meta)
    domain = checkpoint.read_checkpoint(source).domain
    assert domain is not None
    return checkpoint.save_checkpoint(target, state_dict, meta, domain_arrays=domain.arrays())


@pytest.fixture(scope="module")
def candidate(demo_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("candidate") / "candidate.pt"
    derive_checkpoint(demo_checkpoint, path, version=CANDIDATE_VERSION, scale=0.6)
    return path


def _version(path: Path) -> str:
    return str(checkpoint.load_checkpoint(path)[1]["version"])


def _sha256(path: Path) -> str:
    return str(checkpoint.load_checkpoint(path)[1]["sha256"])


def _runtime(tmp_path: Path, url: str, **overrides: Any) -> WorkerRuntime:
    upgrade(url)
    settings = Settings(
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=url,
        destinations=[{"name": "pacs", "kind": "folder", "path": str(tmp_path / "pacs")}],
        **overrides,
    )
    return WorkerRuntime.from_settings(settings)


def _receive(rt: WorkerRuntime, case: Any) -> None:
    context = StoreContext(store=rt.store, sessions=rt.sessions, writer_lock=writer_lock(rt.engine))
    for path in case_files(case):
        assert store_instance(context, path.read_bytes(), transfer_syntax=None, source="test").ok
    with transaction(rt.sessions) as session:
        lifecycle.complete_quiet_studies(
            session, quiet_period_s=0, now=datetime.now(UTC) + timedelta(seconds=1)
        )


def _annotate(rt: WorkerRuntime, case: Any) -> int:
    with transaction(rt.sessions) as session:
        return lifecycle.create_annotation(
            session, case.roi, source="rest", now=datetime.now(UTC)
        ).id


def _results(rt: WorkerRuntime) -> list[TriageResult]:
    with rt.sessions() as session:
        return list(session.scalars(select(TriageResult).order_by(TriageResult.id)))


def _deliveries(rt: WorkerRuntime) -> list[Delivery]:
    with rt.sessions() as session:
        return list(session.scalars(select(Delivery).order_by(Delivery.id)))


def _deliver_all(rt: WorkerRuntime) -> None:
    for delivery in _deliveries(rt):
        assert run_delivery(rt, delivery.id).outcome is DeliveryOutcome.DELIVERED


def _pinned(demo_checkpoint: Path, candidate: Path) -> dict[str, Any]:
    return {
        "model_checkpoint": demo_checkpoint,
        "model_checkpoint_sha256": _sha256(demo_checkpoint),
        "candidate_checkpoint": candidate,
        "candidate_checkpoint_sha256": _sha256(candidate),
    }


# --- shadow mode -----------------------------------------------------------------------------


def test_shadow_mode_two_checkpoints_one_job_two_results_one_delivery(
    tmp_path: Path,
    database_url: str,
    demo_checkpoint: Path,
    candidate: Path,
    synthetic_cases: list[Any],
) -> None:
    rt = _runtime(tmp_path, database_url, **_pinned(demo_checkpoint, candidate))
    case = synthetic_cases[0]
    _receive(rt, case)
    annotation_id = _annotate(rt, case)

    outcome = run_triage(rt, annotation_id)

    assert outcome.outcome is Outcome.DONE, outcome.reason
    live, shadow = _results(rt)
    assert (live.role, live.model_version) == ("live", rt.classifier.version)
    assert (shadow.role, shadow.model_version) == ("shadow", CANDIDATE_VERSION)
    assert live.checkpoint_sha256 == _sha256(demo_checkpoint)
    assert shadow.checkpoint_sha256 == _sha256(candidate)
    assert live.annotation_id == shadow.annotation_id == annotation_id
    assert live.shadow_failure is None
    # the rescaled final layer answers differently on the same inputs
    assert shadow.slice_probabilities != pytest.approx(live.slice_probabilities, abs=1e-4)
    assert shadow.sr_sop_instance_uid != live.sr_sop_instance_uid

    deliveries = _deliveries(rt)
    assert [d.result_id for d in deliveries] == [live.id]  # one delivery: the live result's
    _deliver_all(rt)
    sent = [pydicom.dcmread(p) for p in (tmp_path / "pacs").glob("*.dcm")]
    # the live SR, its review series and its key image, nothing of the candidate's
    assert [ds.SOPInstanceUID for ds in sent if ds.Modality == "SR"] == [live.sr_sop_instance_uid]
    assert live.key_image_path is not None
    live_key = pydicom.dcmread(rt.store.absolute(live.key_image_path))
    assert [ds.SOPInstanceUID for ds in sent if ds.Modality == "OT"] == [live_key.SOPInstanceUID]
    assert {ds.SeriesInstanceUID for ds in sent if ds.Modality == "CT"} <= {
        live.review_series_instance_uid
    }

    # the candidate's SR is stored for review (never delivered) and names its model
    candidate_sr = hd.sr.srread(rt.store.absolute(shadow.sr_path))
    assert candidate_sr.SOPInstanceUID == shadow.sr_sop_instance_uid
    assert CANDIDATE_VERSION in str(candidate_sr)

    # the worklist counts and shows only the live result, naming its model
    with rt.sessions() as session:
        worklist = build_worklist(session, WorklistFilter())
        detail = build_study_detail(session, case.roi.study_instance_uid)
    (item,) = worklist["items"]
    assert item["result_id"] == live.id
    assert item["probability"] == pytest.approx(live.patient_probability)
    assert item["model"]["version"] == live.model_version
    assert item["model"]["sha256"] == live.checkpoint_sha256
    assert item["deliveries"]["total"] == 1
    assert detail is not None and detail["result_id"] == live.id
    assert [s["model_version"] for s in detail["shadow"]] == [CANDIDATE_VERSION]
    assert detail["shadow"][0]["patient_probability"] == pytest.approx(shadow.patient_probability)

    # a re-run of the job changes nothing: same two results, still one delivery
    assert run_triage(rt, annotation_id).outcome is Outcome.SKIPPED
    assert len(_results(rt)) == 2 and len(_deliveries(rt)) == 1
    rt.close()


def test_shadow_mode_on_an_automatic_job(
    tmp_path: Path, demo_checkpoint: Path, candidate: Path
) -> None:
    rt = _runtime(
        tmp_path,
        f"sqlite:///{tmp_path / 'auto.db'}",
        auto_roi="always",
        **_pinned(demo_checkpoint, candidate),
    )
    case = make_case(tmp_path / "case", patient_id="SHADOW-AUTO", label="malignant", seed=5)
    _receive(rt, case)
    with transaction(rt.sessions) as session:
        (job_id,) = lifecycle.create_auto_jobs(
            session, policy="always", fallback_s=0.0, now=datetime.now(UTC)
        )

    outcome = run_automatic(rt, job_id)

    assert outcome.outcome is Outcome.DONE and outcome.unanalysable is None, outcome.reason
    live, shadow = _results(rt)
    assert live.auto_job_id == shadow.auto_job_id == job_id
    assert (live.role, shadow.role) == ("live", "shadow")
    assert shadow.model_version == CANDIDATE_VERSION
    assert shadow.bodies and live.bodies
    live_bodies = {b["annotation_id"]: b["probability"] for b in live.bodies}
    shadow_bodies = {b["annotation_id"]: b["probability"] for b in shadow.bodies}
    assert set(shadow_bodies) <= set(live_bodies)  # the same bodies, the live job's annotations
    assert shadow.annotation_id == shadow.bodies[0]["annotation_id"]  # its own top body
    assert [d.result_id for d in _deliveries(rt)] == [live.id]
    with rt.sessions() as session:
        (item,) = build_worklist(session, WorklistFilter())["items"]
    assert item["automatic"]["result_id"] == live.id
    rt.close()


def test_a_failing_candidate_never_fails_the_live_job_and_is_recorded(
    tmp_path: Path,
    demo_checkpoint: Path,
    candidate: Path,
    synthetic_cases: list[Any],
) -> None:
    rt = _runtime(
        tmp_path,
        f"sqlite:///{tmp_path / 'fail.db'}",
        model_checkpoint=demo_checkpoint,
        candidate_checkpoint=candidate,
        candidate_checkpoint_sha256="0" * 64,  # not the candidate's: refused
    )
    case = synthetic_cases[1]
    _receive(rt, case)
    annotation_id = _annotate(rt, case)

    outcome = run_triage(rt, annotation_id)

    assert outcome.outcome is Outcome.DONE, outcome.reason
    (live,) = _results(rt)
    assert live.role == "live"
    assert live.shadow_failure is not None
    assert "CANDIDATE_CHECKPOINT_SHA256" in live.shadow_failure
    assert len(_deliveries(rt)) == 1
    rt.close()


def test_a_candidate_with_the_live_models_version_is_refused(
    tmp_path: Path, demo_checkpoint: Path
) -> None:
    twin = tmp_path / "twin.pt"
    derive_checkpoint(demo_checkpoint, twin, version=_version(demo_checkpoint), scale=0.9)
    rt = _runtime(
        tmp_path,
        f"sqlite:///{tmp_path / 'twin.db'}",
        model_checkpoint=demo_checkpoint,
        candidate_checkpoint=twin,
    )
    with pytest.raises(CheckpointRefused, match="live model's version"):
        verify_checkpoints(rt.settings)
    with pytest.raises(CheckpointRefused, match="live model's version"):
        _ = rt.candidate
    rt.close()


# --- checkpoint pinning ----------------------------------------------------------------------


def test_a_worker_refuses_a_checkpoint_whose_sha256_differs_from_the_configured_one(
    tmp_path: Path,
    demo_checkpoint: Path,
    candidate: Path,
    synthetic_cases: list[Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the pin names the candidate's sha256, the configured file is the demonstration model
    wrong = _sha256(candidate)
    rt = _runtime(
        tmp_path,
        f"sqlite:///{tmp_path / 'pin.db'}",
        model_checkpoint=demo_checkpoint,
        model_checkpoint_sha256=wrong,
        job_max_attempts=1,
    )
    with pytest.raises(CheckpointRefused) as refused:
        verify_checkpoints(rt.settings)
    message = str(refused.value)
    assert _sha256(demo_checkpoint) in message and wrong in message
    assert "MODEL_CHECKPOINT_SHA256" in message

    # a job on such a worker records no result and says why
    case = synthetic_cases[2]
    _receive(rt, case)
    annotation_id = _annotate(rt, case)
    outcome = run_triage(rt, annotation_id)
    assert outcome.outcome is Outcome.FAILED
    assert outcome.reason and "MODEL_CHECKPOINT_SHA256" in outcome.reason
    assert _results(rt) == [] and _deliveries(rt) == []

    # `models show` names it and says it is refused
    monkeypatch.setenv("SPINE_TRIAGE_MODEL_CHECKPOINT", str(demo_checkpoint))
    monkeypatch.setenv("SPINE_TRIAGE_MODEL_CHECKPOINT_SHA256", wrong)
    monkeypatch.chdir(tmp_path)
    assert main(["models", "show"]) == 1
    shown = capsys.readouterr().out
    assert "REFUSED" in shown and _sha256(demo_checkpoint) in shown
    # the worker command refuses to start
    with pytest.raises(SystemExit, match="refusing to start"):
        main(["worker"])
    rt.close()


def test_the_configured_sha256_is_accepted_in_any_case(
    tmp_path: Path, demo_checkpoint: Path
) -> None:
    rt = _runtime(
        tmp_path,
        f"sqlite:///{tmp_path / 'ok.db'}",
        model_checkpoint=demo_checkpoint,
        model_checkpoint_sha256=_sha256(demo_checkpoint).upper(),
    )
    (identity,) = verify_checkpoints(rt.settings)
    assert identity.sha256 == _sha256(demo_checkpoint)
    assert rt.classifier.sha256 == identity.sha256
    rt.close()


# --- models compare --------------------------------------------------------------------------


def test_models_compare_reports_agreement_flag_changes_and_auroc(
    tmp_path: Path,
    demo_checkpoint: Path,
    candidate: Path,
    synthetic_cases: list[Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = f"sqlite:///{tmp_path / 'compare.db'}"
    rt = _runtime(tmp_path, url, **_pinned(demo_checkpoint, candidate))
    annotation_of = {}
    for case in synthetic_cases:
        _receive(rt, case)
        annotation_of[case.roi.study_instance_uid] = annotation_id = _annotate(rt, case)
        assert run_triage(rt, annotation_id).outcome is Outcome.DONE
    results = _results(rt)
    rt.close()
    live = {r.annotation_id: r for r in results if r.role == "live"}
    shadow = {r.annotation_id: r for r in results if r.role == "shadow"}
    assert live.keys() == shadow.keys() and len(live) == len(synthetic_cases)

    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["study_instance_uid", "label"])
        for case in synthetic_cases:
            writer.writerow([case.roi.study_instance_uid, case.label])
    monkeypatch.setenv("SPINE_TRIAGE_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    assert main(["models", "compare", "--labels", str(labels), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["candidate"] == CANDIDATE_VERSION
    assert report["jobs"] == len(synthetic_cases)
    label_of = {case.roi.study_instance_uid: case.label for case in synthetic_cases}
    assert sorted(s["study_instance_uid"] for s in report["studies"]) == sorted(label_of)
    changes: dict[str, list[str]] = {"newly_flagged": [], "no_longer_flagged": []}
    agree = 0
    for study in report["studies"]:
        uid = study["study_instance_uid"]
        a, b = live[annotation_of[uid]], shadow[annotation_of[uid]]
        assert study["live_probability"] == pytest.approx(a.patient_probability)
        assert study["candidate_probability"] == pytest.approx(b.patient_probability)
        assert (study["live_priority"], study["candidate_priority"]) == (a.priority, b.priority)
        assert study["label"] == int(label_of[uid] == "malignant")
        agree += a.priority == b.priority
        if a.priority != "HIGH" and b.priority == "HIGH":
            changes["newly_flagged"].append(uid)
        if a.priority == "HIGH" and b.priority != "HIGH":
            changes["no_longer_flagged"].append(uid)
    assert report["agreement"] == pytest.approx(agree / len(synthetic_cases))
    assert report["flag_changes"] == changes
    assert report["auroc"]["labelled_studies"] == len(synthetic_cases)
    assert report["auroc"]["live"] == pytest.approx(_auroc(report, "live_probability"))
    assert report["auroc"]["candidate"] == pytest.approx(_auroc(report, "candidate_probability"))

    # the text report names studies by UID, never the patient
    assert main(["models", "compare", "--labels", str(labels)]) == 0
    text = capsys.readouterr().out
    assert f"vs candidate {CANDIDATE_VERSION}" in text
    for case in synthetic_cases:
        assert case.roi.study_instance_uid in text
        assert case.patient_id not in text


def _auroc(report: dict[str, Any], key: str) -> float:
    """AUROC computed here: the fraction of (malignant, benign) pairs ranked right."""
    studies = report["studies"]
    positives = [s[key] for s in studies if s["label"] == 1]
    negatives = [s[key] for s in studies if s["label"] == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs)
