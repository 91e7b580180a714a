"""The node with other real peers: Orthanc as the sending PACS, TLS, a database outage."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import func, select

from dicom_node.archive.db import make_engine, make_session_factory
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import Instance
from dicom_node.node import start_node
from dicom_node.settings import Settings
from tests.dicom_factory import ct_slice, write_ct_series
from tests.node.conftest import RecordingSender, RunningNode
from tests.services import ThrowawayPostgres
from tests.support import free_port

NodeFactory = Callable[..., RunningNode]


def test_orthanc_sends_a_study_and_every_instance_is_indexed(
    node_factory: NodeFactory, orthanc_factory: Callable[..., object], tmp_path: Path
) -> None:
    node = node_factory(allowed_calling_aes=["ORTHANC"])
    orthanc = orthanc_factory(modalities={"node": ["SPINE_TRIAGE", "127.0.0.1", node.port]})
    files = write_ct_series(tmp_path / "study", 15)
    with orthanc.client() as client:  # type: ignore[attr-defined]
        for path in files:
            assert client.post("/instances", content=path.read_bytes()).status_code == 200
        studies = client.get("/studies").json()
        assert len(studies) == 1
        answer = client.post(
            "/modalities/node/store", json={"Resources": studies, "Synchronous": True}
        )
        assert answer.status_code == 200, answer.text
    with node.node.sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 15
        assert set(session.scalars(select(Instance.calling_ae))) == {"ORTHANC"}


def _make_certificate(folder: Path) -> tuple[Path, Path]:
    key, cert = folder / "node.key", folder / "node.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_tls_node_refuses_plain_dicom_and_serves_tls(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    cert, key = _make_certificate(tmp_path)
    node = node_factory(tls_certificate=cert, tls_private_key=key)

    plain = AE(ae_title="PACS")
    plain.add_requested_context(Verification)
    plain.acse_timeout = 3
    plain.network_timeout = 3
    assoc = plain.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    assert not assoc.is_established
    plain.shutdown()

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    context.check_hostname = False
    secure = AE(ae_title="PACS")
    secure.add_requested_context(CTImageStorage)
    assoc = secure.associate(
        "127.0.0.1", node.port, ae_title="SPINE_TRIAGE", tls_args=(context, None)
    )
    assert assoc.is_established
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    assert int(assoc.send_c_store(ds).Status) == 0
    assoc.release()
    secure.shutdown()


def test_database_outage_answers_failure_and_sender_retry_succeeds(
    throwaway_postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    url = throwaway_postgres.url
    upgrade(url)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        var_dir=tmp_path / "var",
        database_url=url,
        dicom_host="127.0.0.1",
        dicom_port=free_port(),
        min_free_disk_mb=0,
    )
    node = start_node(settings, send=RecordingSender(), run_scheduler=False)
    try:
        study, series = generate_uid(), generate_uid()
        datasets = [ct_slice(study_uid=study, series_uid=series, index=i) for i in range(3)]
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)

        def send(ds: object) -> int:
            assoc = ae.associate("127.0.0.1", node.dicom_address[1], ae_title="SPINE_TRIAGE")
            assert assoc.is_established
            try:
                return int(assoc.send_c_store(ds).Status)
            finally:
                assoc.release()

        assert send(datasets[0]) == 0
        throwaway_postgres.stop()
        status = send(datasets[1])
        assert 0xC000 <= status <= 0xCFFF  # failure: the sender keeps it and retries
        storage = settings.resolved_storage_dir
        files = [p for p in storage.rglob("*.dcm")]
        assert len(files) == 1  # no file left behind for the refused instance
        throwaway_postgres.start()
        deadline = time.monotonic() + 30
        while (status := send(datasets[1])) != 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status == 0
        assert send(datasets[2]) == 0
        ae.shutdown()
    finally:
        node.stop()
    engine = make_engine(url)
    with make_session_factory(engine)() as session:
        assert session.scalar(select(func.count(Instance.id))) == 3
    engine.dispose()
    assert len(list(settings.resolved_storage_dir.rglob("*.dcm"))) == 3
