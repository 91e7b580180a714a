"""Automatic triage end to end, with real workers and the demonstration model, on both stacks
(SQLite + local broker, PostgreSQL + Redis) and against Orthanc: studies sent by C-STORE with
no ROI get an automatic SR (one group per body, dciodvfy clean) and the result the model gives
offline on the same series (a malignant phantom it flags is flagged, a benign one is flagged
or not as the model answers), a head CT "could not be analysed", and a reader's ROI arriving
later makes its own result beside the automatic one."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.sr.codedict import codes
from sqlalchemy import select

from dicom_node.archive.schema import AnnotationState, AutoJob, AutoJobState, TriageResult
from model.synthetic.cases import make_case
from model.synthetic.dicom import SeriesIdentity, SeriesLayout
from model.synthetic.series import write_ct_series
from tests.answers import HELD_OUT_SEEDS, automatic_answer, case_called_right
from tests.services import Orthanc
from tests.support import require_binary
from tests.system import System, case_files
from worker.automatic import Body

SystemFactory = Callable[..., System]
HEAD_SEED = 4242
END_STATES = (AutoJobState.DONE, AutoJobState.UNANALYSABLE, AutoJobState.FAILED)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, demo_checkpoint: Path) -> dict[str, Any]:
    """A held-out malignant phantom the model flags automatically, a held-out benign one
    (whatever the model answers on it), and a head CT (a skull, no spine)."""
    folder = tmp_path_factory.mktemp("auto-cases")
    cases: dict[str, Any] = {
        "malignant": case_called_right(
            folder,
            demo_checkpoint,
            patient_id="AUTO-malignant",
            label="malignant",
            mode="automatic",
        ),
        "benign": make_case(
            folder, patient_id="AUTO-benign", label="benign", seed=HELD_OUT_SEEDS[0]
        ),
    }
    cases["head"] = _head_ct(folder / "head")
    return cases


def _head_ct(folder: Path) -> Path:
    """A head-CT-like series: brain in a skull shell, 40 slices, nothing else."""

    def hu_at(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        zz = z[:, None, None]
        radius = np.sqrt((x[None] / 75.0) ** 2 + (y[None] / 90.0) ** 2 + (zz / 80.0) ** 2)
        hu = np.where(radius < 1.0, 35.0, -1000.0)
        return np.where((radius >= 0.9) & (radius < 1.0), 1200.0, hu).astype(np.float32)

    layout = SeriesLayout(
        rows=160,
        columns=160,
        slices=40,
        pixel_spacing_mm=1.2,
        slice_spacing_mm=3.0,
        center=(0.0, 0.0, 0.0),
    )
    write_ct_series(folder, hu_at, layout, SeriesIdentity.derived("AUTO-head", HEAD_SEED))
    return folder


def _files(study: Any) -> list[Path]:
    return sorted(study.rglob("*.dcm")) if isinstance(study, Path) else case_files(study)


def _study_uid(study: Any) -> str:
    if isinstance(study, Path):
        return str(SeriesIdentity.derived("AUTO-head", HEAD_SEED).study_instance_uid)
    return str(study.roi.study_instance_uid)


@pytest.fixture(params=["embedded", "production"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url_factory: Callable[[], str]
) -> Iterator[dict[str, str]]:
    if request.param == "embedded":
        yield {"database_url": f"sqlite:///{tmp_path / 'auto.db'}", "broker_url": ""}
        return
    redis = request.getfixturevalue("throwaway_redis")
    yield {"database_url": postgres_url_factory(), "broker_url": redis.url}


def _jobs(system: System) -> dict[str, AutoJob]:
    with system.node.sessions() as session:
        return {job.study_instance_uid: job for job in session.scalars(select(AutoJob))}


def _auto_result(system: System, job_id: int) -> TriageResult:
    with system.node.sessions() as session:
        result = session.scalar(select(TriageResult).where(TriageResult.auto_job_id == job_id))
        assert result is not None
        return result


def _wait_for_jobs(system: System, uids: list[str]) -> dict[str, AutoJob]:
    system.wait_until(
        lambda: all(
            (job := _jobs(system).get(uid)) is not None and job.state in END_STATES for uid in uids
        ),
        timeout=300,
        what="every automatic job to end",
    )
    return _jobs(system)


def _check_sr(path: Path, result: TriageResult, study_uid: str) -> None:
    """Read back with highdicom: one group per body, the localiser as the groups' algorithm,
    the most suspicious body first; and dciodvfy finds no error."""
    sr = hd.sr.srread(path)
    assert sr.StudyInstanceUID == study_uid and sr.SOPInstanceUID == result.sr_sop_instance_uid
    every = sr.content.get_planar_roi_measurement_groups()
    groups = [g for g in every if isinstance(g.roi, hd.sr.ImageRegion3D)]
    drawn = [g for g in every if isinstance(g.roi, hd.sr.ImageRegion)]  # on the review images
    assert result.bodies is not None and len(groups) == len(drawn) == len(result.bodies) >= 3
    assert [g.tracking_uid for g in drawn] == [g.tracking_uid for g in groups]
    first = groups[0]
    probability = first.get_measurements(name=codes.DCM.ProbabilityOfCancer)
    values = [m.value for m in probability]
    assert float(values[0]) == pytest.approx(result.patient_probability, abs=1e-6)
    assert len(values) == 1 + len(result.slice_probabilities)  # the body's, then per slice
    check = subprocess.run(
        [require_binary("dciodvfy"), str(path)], capture_output=True, text=True, check=False
    )
    errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], check.stderr


def _check_answer(result: TriageResult, offline: list[Body]) -> None:
    """The node's result is what the model answers offline on the same series: the same
    bodies in the same order, the same probabilities, the flag on the same body."""
    recorded = result.bodies
    assert [b["vertebra"] for b in recorded] == [b.roi.vertebra for b in offline]
    assert [b["priority"] for b in recorded] == [b.prediction.priority for b in offline]
    for stored, body in zip(recorded, offline, strict=True):
        assert stored["slice_x_mm"] == pytest.approx(body.prediction.x_mm, abs=1e-6)
        assert stored["slice_probabilities"] == pytest.approx(
            body.prediction.slice_probabilities, abs=1e-4
        )
    top = offline[0].prediction
    assert (result.priority, result.patient_probability) == (
        top.priority,
        pytest.approx(top.patient_probability, abs=1e-4),
    )


def _worklist(system: System) -> dict[str, dict[str, Any]]:
    items = httpx.get(
        f"{system.api}/worklist",
        headers={"Authorization": f"Bearer {system.token}"},
        timeout=30,
    ).json()["items"]
    return {item["study_instance_uid"]: item for item in items}


def test_studies_without_an_roi_are_triaged_automatically(
    system_factory: SystemFactory,
    stack: dict[str, str],
    studies: dict[str, Any],
    demo_checkpoint: Path,
) -> None:
    system = system_factory(**stack, model_checkpoint=demo_checkpoint, auto_roi="always")
    system.start_worker()
    for study in studies.values():
        system.send_study(_files(study))  # no ROI from anyone
    uids = {label: _study_uid(study) for label, study in studies.items()}
    jobs = _wait_for_jobs(system, list(uids.values()))

    head = jobs[uids["head"]]
    assert head.state is AutoJobState.UNANALYSABLE, head.failure_reason
    assert head.unanalysable_reason
    results = {}
    for label in ("malignant", "benign"):
        job = jobs[uids[label]]
        assert job.state is AutoJobState.DONE, job.failure_reason or job.unanalysable_reason
        results[label] = _auto_result(system, job.id)
        _check_sr(
            system.settings.resolved_storage_dir / results[label].sr_path,
            results[label],
            uids[label],
        )
        _check_answer(results[label], automatic_answer(demo_checkpoint, studies[label]))
    malignant, benign = results["malignant"], results["benign"]
    assert malignant.priority == "HIGH", malignant.bodies
    # Whether the benign phantom stays under the threshold is the model's accuracy, not the
    # pipeline's: the node's result is the model's offline answer, flagged or not.
    flag = benign.priority

    worklist = _worklist(system)
    assert worklist[uids["malignant"]]["state"] == "flagged"
    assert worklist[uids["malignant"]]["source"] == "automatic"
    assert worklist[uids["benign"]]["state"] == ("flagged" if flag == "HIGH" else "routine")
    assert worklist[uids["head"]]["state"] == "not_analysed"
    assert worklist[uids["head"]]["activity"].startswith("could not analyse: ")

    # A reader's ROI arriving later makes its own job and result; both are shown.
    annotation = system.post_roi(studies["benign"].roi.to_json())
    system.wait_until(
        lambda: system.annotation_states().get(annotation) is AnnotationState.DONE,
        what="the reader's annotation",
    )
    with system.node.sessions() as session:
        reader = session.scalar(
            select(TriageResult).where(TriageResult.annotation_id == annotation)
        )
        assert reader is not None and reader.auto_job_id is None
    item = _worklist(system)[uids["benign"]]
    assert item["reader"]["result_id"] == reader.id
    assert item["automatic"]["result_id"] == results["benign"].id


def test_the_automatic_sr_reaches_orthanc_valid(
    system_factory: SystemFactory,
    orthanc_factory: Callable[..., Orthanc],
    studies: dict[str, Any],
    demo_checkpoint: Path,
    tmp_path: Path,
) -> None:
    orthanc = orthanc_factory()
    destinations = [
        {
            "name": "pacs",
            "kind": "cstore",
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
    ]
    system = system_factory(
        database_url=f"sqlite:///{tmp_path / 'auto-orthanc.db'}",
        model_checkpoint=demo_checkpoint,
        auto_roi="always",
        destinations=json.dumps(destinations),
    )
    system.start_worker()
    case = studies["malignant"]
    system.send_study(case_files(case))
    job = _wait_for_jobs(system, [case.roi.study_instance_uid])[case.roi.study_instance_uid]
    assert job.state is AutoJobState.DONE, job.failure_reason or job.unanalysable_reason
    result = _auto_result(system, job.id)
    system.wait_until(lambda: system.deliveries_delivered() == 1, what="the SR's C-STORE")
    client = DICOMwebClient(url=orthanc.dicomweb_url)
    client._session.auth = orthanc.auth
    fetched = client.retrieve_instance(
        case.roi.study_instance_uid, result.sr_series_instance_uid, result.sr_sop_instance_uid
    )
    path = tmp_path / "auto-sr.dcm"
    fetched.save_as(path, enforce_file_format=True)
    _check_sr(path, result, case.roi.study_instance_uid)


def test_a_checkpoint_not_trained_for_automatic_triage_is_refused_with_the_reason(
    system_factory: SystemFactory, studies: dict[str, Any], tmp_path: Path
) -> None:
    """The session's test checkpoint has no task in its meta: a reader-ROI model."""
    system = system_factory(database_url=f"sqlite:///{tmp_path / 'refused.db'}", auto_roi="always")
    system.start_worker()
    case = studies["benign"]
    system.send_study(case_files(case))
    job = _wait_for_jobs(system, [case.roi.study_instance_uid])[case.roi.study_instance_uid]
    assert job.state is AutoJobState.FAILED
    assert "not for automatic triage" in (job.failure_reason or "")
    item = _worklist(system)[case.roi.study_instance_uid]
    assert item["state"] == "failed" and "not for automatic triage" in item["activity"]
