"""The fault suite: the real pipeline (node + worker + PostgreSQL + Redis + Orthanc as the PACS)
under crashes and outages. Every scenario asserts nothing lost, nothing duplicated: every
instance acknowledged is stored and indexed, every ready annotation ends with exactly one
result and exactly one SR in the PACS. The figures land in the table printed at the end."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from dicom_node.archive.schema import AnnotationState, Delivery, DeliveryState, Instance
from dicom_node.dicom.scu import StoreError, StorePeer, store_files
from tests.dicom_factory import write_ct_series
from tests.faults.ledger import Ledger
from tests.services import Orthanc
from tests.support import dcmtk_env, require_dcmtk
from tests.system import System, case_files

SystemFactory = Callable[..., System]


def _pacs_destination(orthanc: Orthanc) -> str:
    return json.dumps(
        [
            {
                "name": "pacs",
                "kind": "cstore",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ]
    )


def _start(
    system_factory: SystemFactory,
    orthanc: Orthanc,
    database_url: str,
    broker_url: str,
    **overrides: Any,
) -> System:
    return system_factory(
        database_url=database_url,
        broker_url=broker_url,
        destinations=_pacs_destination(orthanc),
        delivery_backoff_s=0.5,
        delivery_backoff_max_s=2.0,
        **overrides,
    )


def _indexed(system: System) -> int:
    with system.node.sessions() as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def _srs_in_pacs(orthanc: Orthanc, study_uids: list[str]) -> int:
    total = 0
    with orthanc.client() as client:
        for uid in study_uids:
            found = client.post(
                "/tools/find",
                json={"Level": "Instance", "Query": {"StudyInstanceUID": uid, "Modality": "SR"}},
            ).json()
            total += len(found)
    return total


def _settle(system: System, annotations: list[int], orthanc: Orthanc, studies: list[str]) -> None:
    system.wait_until(
        lambda: all(system.annotation_states().get(a) is AnnotationState.DONE for a in annotations),
        timeout=240,
        what="every annotation done",
    )
    system.wait_until(
        lambda: _delivered(system) >= len(annotations), timeout=120, what="every SR delivered"
    )
    system.wait_until(
        lambda: _srs_in_pacs(orthanc, studies) >= len(annotations),
        timeout=60,
        what="every SR in the PACS",
    )
    time.sleep(1.0)  # a duplicate, if any, would arrive now


def _delivered(system: System) -> int:
    with system.node.sessions() as session:
        return int(
            session.scalar(
                select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.DELIVERED)
            )
            or 0
        )


def _record(
    ledger: Ledger,
    scenario: str,
    system: System,
    orthanc: Orthanc,
    *,
    sent: int,
    annotations: list[int],
    studies: list[str],
) -> None:
    results = system.results_per_annotation()
    row = ledger.record(
        scenario,
        instances_sent=sent,
        instances_stored=_indexed(system),
        jobs_ready=len(annotations),
        jobs_completed=sum(1 for a in annotations if results.get(a) == 1),
        srs_expected=len(annotations),
        srs_delivered=_srs_in_pacs(orthanc, studies),
    )
    assert row.instances_stored == row.instances_sent, row
    assert all(results.get(a) == 1 for a in annotations), results
    assert row.srs_delivered == row.srs_expected, row


def _submit(system: System, cases: list[Any]) -> tuple[int, list[int], list[str]]:
    sent, annotations, studies = 0, [], []
    for case in cases:
        files = case_files(case)
        system.send_study(files)
        sent += len(files)
        annotations.append(system.post_roi(case.roi.to_json()))
        studies.append(case.roi.study_instance_uid)
    return sent, annotations, studies


def test_worker_killed_mid_job(
    system_factory: SystemFactory,
    orthanc_factory: Callable[..., Orthanc],
    postgres_url_factory: Callable[[], str],
    throwaway_redis: Any,
    synthetic_cases: list[Any],
    ledger: Ledger,
) -> None:
    orthanc = orthanc_factory()
    system = _start(
        system_factory, orthanc, postgres_url_factory(), throwaway_redis.url, job_lease_s=4.0
    )
    sent, annotations, studies = _submit(system, synthetic_cases[:2])
    system.start_worker("victim")
    system.wait_until(
        lambda: AnnotationState.PROCESSING in system.annotation_states().values(),
        what="a job in progress",
    )
    system.kill_workers(signal.SIGKILL)
    system.start_worker("survivor")
    _settle(system, annotations, orthanc, studies)
    _record(
        ledger,
        "worker SIGKILL mid-job",
        system,
        orthanc,
        sent=sent,
        annotations=annotations,
        studies=studies,
    )


def test_broker_restarted_without_persistence(
    system_factory: SystemFactory,
    orthanc_factory: Callable[..., Orthanc],
    postgres_url_factory: Callable[[], str],
    throwaway_redis: Any,
    synthetic_cases: list[Any],
    ledger: Ledger,
) -> None:
    orthanc = orthanc_factory()
    system = _start(system_factory, orthanc, postgres_url_factory(), throwaway_redis.url)
    sent, annotations, studies = _submit(system, synthetic_cases)
    system.wait_until(lambda: _queued(system, annotations), what="every job queued in Redis")
    throwaway_redis.stop()  # queued messages are gone with it
    throwaway_redis.start()
    system.start_worker()
    _settle(system, annotations, orthanc, studies)
    _record(
        ledger,
        "broker restarted (no persistence)",
        system,
        orthanc,
        sent=sent,
        annotations=annotations,
        studies=studies,
    )


def _queued(system: System, annotations: list[int]) -> bool:
    from dicom_node.archive.schema import RoiAnnotation

    with system.node.sessions() as session:
        values = session.scalars(
            select(RoiAnnotation.enqueued_at).where(RoiAnnotation.id.in_(annotations))
        ).all()
    return len(values) == len(annotations) and all(v is not None for v in values)


def _send_with_retries(peer: StorePeer, files: list[Path], deadline_s: float = 120) -> int:
    """A PACS's behaviour: refused or failed instances are sent again until accepted."""
    remaining = list(files)
    deadline = time.monotonic() + deadline_s
    while remaining:
        try:
            store_files(remaining[:5], peer)
            remaining = remaining[5:]
        except StoreError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return len(files)


def test_database_restarted_while_receiving_and_working(
    system_factory: SystemFactory,
    orthanc_factory: Callable[..., Orthanc],
    throwaway_postgres: Any,
    throwaway_redis: Any,
    synthetic_cases: list[Any],
    ledger: Ledger,
) -> None:
    orthanc = orthanc_factory()
    system = _start(system_factory, orthanc, throwaway_postgres.url, throwaway_redis.url)
    system.start_worker()
    first, second = synthetic_cases[0], synthetic_cases[1]
    sent, annotations, studies = _submit(system, [first])
    annotations.append(system.post_roi(second.roi.to_json()))  # its study is still to come
    studies.append(second.roi.study_instance_uid)
    peer = StorePeer(
        ae_title=system.settings.ae_title,
        host="127.0.0.1",
        port=system.node.dicom_address[1],
        calling_ae_title="PACS",
    )
    files = case_files(second)
    sender = threading.Thread(target=_send_with_retries, args=(peer, files))
    sender.start()
    time.sleep(0.3)
    throwaway_postgres.stop()  # mid-transfer and mid-job
    time.sleep(2.0)
    throwaway_postgres.start()
    sender.join(timeout=180)
    assert not sender.is_alive()
    sent += len(files)
    _settle(system, annotations, orthanc, studies)
    _record(
        ledger,
        "database restarted",
        system,
        orthanc,
        sent=sent,
        annotations=annotations,
        studies=studies,
    )


def test_pacs_down_during_delivery(
    system_factory: SystemFactory,
    orthanc_factory: Callable[..., Orthanc],
    postgres_url_factory: Callable[[], str],
    throwaway_redis: Any,
    synthetic_cases: list[Any],
    ledger: Ledger,
) -> None:
    orthanc = orthanc_factory()
    system = _start(system_factory, orthanc, postgres_url_factory(), throwaway_redis.url)
    orthanc.stop()
    system.start_worker()
    sent, annotations, studies = _submit(system, synthetic_cases[:2])
    system.wait_until(
        lambda: all(system.annotation_states().get(a) is AnnotationState.DONE for a in annotations),
        what="results while the PACS is down",
    )
    time.sleep(2.0)  # a few failed attempts
    assert _delivered(system) == 0
    orthanc.start()
    _settle(system, annotations, orthanc, studies)
    _record(
        ledger,
        "PACS down during delivery",
        system,
        orthanc,
        sent=sent,
        annotations=annotations,
        studies=studies,
    )


def test_same_study_twice_and_an_instance_changed(
    system_factory: SystemFactory,
    orthanc_factory: Callable[..., Orthanc],
    postgres_url_factory: Callable[[], str],
    throwaway_redis: Any,
    synthetic_cases: list[Any],
    ledger: Ledger,
) -> None:
    orthanc = orthanc_factory()
    system = _start(system_factory, orthanc, postgres_url_factory(), throwaway_redis.url)
    system.start_worker()
    case = synthetic_cases[2]
    files = case_files(case)
    _, annotations, studies = _submit(system, [case])
    _settle(system, annotations, orthanc, studies)
    system.send_study(files)  # the whole study again: re-opens it, stores nothing new
    assert _indexed(system) == len(files)
    import pydicom

    changed = pydicom.dcmread(files[0])
    changed.ImageComments = "re-sent with other content"
    changed_path = files[0].parent.parent / "changed.dcm"
    changed.save_as(changed_path, enforce_file_format=True)
    system.send_study([changed_path])
    time.sleep(system.settings.quiet_period_s + 1.5)  # completes again; the job is not re-run
    _record(
        ledger,
        "study twice, one instance changed",
        system,
        orthanc,
        sent=len(files),
        annotations=annotations,
        studies=studies,
    )
    stored = next(
        system.settings.resolved_storage_dir / path
        for path in _paths(system, changed.SOPInstanceUID)
    )
    assert pydicom.dcmread(stored).ImageComments == "re-sent with other content"


def _paths(system: System, sop_uid: str) -> list[str]:
    with system.node.sessions() as session:
        return list(
            session.scalars(select(Instance.path).where(Instance.sop_instance_uid == sop_uid))
        )


def test_eight_senders_beyond_the_association_limit(
    system_factory: SystemFactory,
    orthanc_factory: Callable[..., Orthanc],
    postgres_url_factory: Callable[[], str],
    throwaway_redis: Any,
    tmp_path: Path,
    ledger: Ledger,
) -> None:
    storescu = require_dcmtk("storescu")
    orthanc = orthanc_factory()
    system = _start(
        system_factory, orthanc, postgres_url_factory(), throwaway_redis.url, max_associations=3
    )
    folders = []
    for number in range(8):
        folder = tmp_path / f"sender{number}"
        write_ct_series(folder, 12)
        folders.append(folder)
    rejected = []

    def sender(folder: Path) -> None:
        for _ in range(120):  # retried like a PACS does when the association is refused
            done = subprocess.run(
                [
                    storescu,
                    "-aet",
                    "PACS",
                    "-aec",
                    "SPINE_TRIAGE",
                    "+sd",
                    "127.0.0.1",
                    str(system.node.dicom_address[1]),
                    str(folder),
                ],
                env=dcmtk_env(),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode == 0:
                return
            rejected.append(folder.name)
            time.sleep(0.2)
        raise AssertionError(f"{folder.name} never got through")

    threads = [threading.Thread(target=sender, args=(f,)) for f in folders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert rejected, "the association limit was never reached"
    _record(
        ledger,
        "8 senders, limit 3 associations",
        system,
        orthanc,
        sent=8 * 12,
        annotations=[],
        studies=[],
    )
