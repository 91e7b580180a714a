"""The folder destination (atomic copy) and one sender per configured destination."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pydicom
import pytest

from dicom_node.settings import FolderDestination, Settings
from tests.delivery.conftest import ResultStudy
from worker.destinations.cstore import CStoreSender
from worker.destinations.factory import make_destination
from worker.destinations.folder import FolderCopier
from worker.destinations.hl7 import Hl7OruSender
from worker.destinations.orthanc import OrthancMetadataSetter
from worker.destinations.stow import StowSender
from worker.destinations.webhook import WebhookSender
from worker.errors import PermanentError


def test_folder_receives_the_sr_as_its_sop_instance_uid(
    result_study: ResultStudy, tmp_path: Path
) -> None:
    folder = tmp_path / "results" / "sr"
    copier = FolderCopier(FolderDestination(name="results", path=folder))
    copier.send(result_study.payload())
    copier.send(result_study.payload(attempt=2))  # a re-send replaces it with the same bytes

    target = folder / f"{result_study.sr_sop_instance_uid}.dcm"
    assert sorted(path.name for path in folder.iterdir()) == [target.name]  # no temporary left
    assert target.read_bytes() == result_study.sr_path.read_bytes()
    assert pydicom.dcmread(target).SOPInstanceUID == result_study.sr_sop_instance_uid
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


def test_folder_refuses_a_uid_that_is_not_one(result_study: ResultStudy, tmp_path: Path) -> None:
    folder = tmp_path / "out" / "sr"
    copier = FolderCopier(FolderDestination(name="results", path=folder))
    with pytest.raises(PermanentError, match="not a valid DICOM UID"):
        copier.send(result_study.payload(sr_sop_instance_uid="../../escape"))
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "escape.dcm").exists()


def test_folder_path_blocked_by_a_file_is_permanent(
    result_study: ResultStudy, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the folder should be")
    copier = FolderCopier(FolderDestination(name="results", path=blocker / "sr"))
    with pytest.raises(PermanentError, match="cannot write"):
        copier.send(result_study.payload())


def test_missing_sr_file_is_permanent(result_study: ResultStudy, tmp_path: Path) -> None:
    copier = FolderCopier(FolderDestination(name="results", path=tmp_path / "out"))
    with pytest.raises(PermanentError, match="cannot read"):
        copier.send(result_study.payload(sr_path=tmp_path / "gone.dcm"))


def test_every_configured_kind_gets_its_sender(tmp_path: Path) -> None:
    destinations = [
        {"name": "pacs", "kind": "cstore", "ae_title": "PACS", "host": "pacs", "port": 104},
        {"name": "web", "kind": "stow", "url": "https://pacs/dicom-web", "bearer_token": "t"},
        {"name": "ris", "kind": "hl7", "host": "ris", "port": 2575},
        {"name": "orthanc", "kind": "orthanc", "url": "http://orthanc:8042"},
        {
            "name": "engine",
            "kind": "webhook",
            "url": "https://engine/hook",
            "secret": "a-shared-secret-of-24ch",
        },
        {"name": "copies", "kind": "folder", "path": str(tmp_path)},
    ]
    settings = Settings(_env_file=None, destinations=json.loads(json.dumps(destinations)))  # type: ignore[call-arg]
    senders = [
        make_destination(config, node_ae_title="NODE_AE") for config in settings.destinations
    ]
    assert [type(sender) for sender in senders] == [
        CStoreSender,
        StowSender,
        Hl7OruSender,
        OrthancMetadataSetter,
        WebhookSender,
        FolderCopier,
    ]
    assert [sender.name for sender in senders] == [item["name"] for item in destinations]
    assert [sender.kind for sender in senders] == [item["kind"] for item in destinations]
    cstore = senders[0]
    assert isinstance(cstore, CStoreSender)
    assert cstore.peer.calling_ae_title == "NODE_AE"
