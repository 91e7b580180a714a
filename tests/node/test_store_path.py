"""The pieces of the receive path: file meta, the background write, header reading, the
SQLite writer lock. The whole path is exercised end to end in test_ingest.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from dicom_node.archive.db import WriterLock, make_engine, writer_lock
from dicom_node.archive.lifecycle import instance_received, open_study
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import Study, StudyState
from dicom_node.dicom.index import header_from_dataset
from dicom_node.dicom.ingest import STATUS_CANNOT_UNDERSTAND, _read_header
from dicom_node.dicom.scp import file_meta_bytes
from dicom_node.dicom.storage import FileStore, InvalidUidError, content_digest
from tests.dicom_factory import ct_slice, write_ct_series
from tests.node.test_ingest import NodeFactory, _instances, _storescu


@pytest.mark.parametrize(
    ("sop_instance_uid", "source_ae"),
    [("1.2.3.4", "MODALITY"), ("1.2.3.45", "CT1"), (generate_uid(), " PADDED ")],
)
def test_file_meta_matches_pydicoms_encoding(sop_instance_uid: str, source_ae: str) -> None:
    # odd and even UID and AE lengths: padding and group length as pydicom writes them
    meta = create_file_meta(
        sop_class_uid=CTImageStorage,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=ExplicitVRLittleEndian,
    )
    meta.SourceApplicationEntityTitle = source_ae.strip()
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
    assert (
        file_meta_bytes(CTImageStorage, sop_instance_uid, ExplicitVRLittleEndian, source_ae)
        == expected
    )


def test_received_file_has_file_meta_of_the_association(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    files = write_ct_series(tmp_path / "in", 2)
    done = _storescu(node.port, "127.0.0.1", str(node.port), *map(str, files))
    assert done.returncode == 0, done.stderr
    for instance in _instances(node):
        stored = pydicom.dcmread(node.storage / instance.path)
        meta = stored.file_meta
        assert meta.MediaStorageSOPInstanceUID == instance.sop_instance_uid == stored.SOPInstanceUID
        assert meta.MediaStorageSOPClassUID == CTImageStorage
        assert meta.TransferSyntaxUID == instance.transfer_syntax_uid
        assert meta.SourceApplicationEntityTitle == "MODALITY"  # the calling AE title


def _part10(seed: int = 0) -> tuple[bytes, pydicom.Dataset]:
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0, seed=seed)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), ds


def _relative(store: FileStore, ds: pydicom.Dataset, data: bytes) -> tuple[str, str]:
    digest = content_digest(data)
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return store.relative_path(*uids, digest), digest


def test_pending_file_is_durable_under_its_name_and_leaves_no_temporary(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    data, ds = _part10()
    relative, digest = _relative(store, ds, data)
    pending = store.start(data)
    stored = pending.place(relative, digest)
    pending.wait_durable()
    assert stored.created and stored.sha256 == digest and stored.size == len(data)
    assert (store.root / relative).read_bytes() == data
    assert not list((store.root / ".incoming").iterdir())

    again = store.start(data)  # the same content again: nothing new, the temporary goes
    assert again.place(relative, digest).created is False
    assert not list((store.root / ".incoming").iterdir())


def test_discarded_pending_file_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    data, ds = _part10()
    store.start(data).discard()  # refused before it was placed
    placed = store.start(data)
    relative, digest = _relative(store, ds, data)
    placed.place(relative, digest)
    placed.discard()  # refused after (the index would not take it)
    assert not list((store.root / ".incoming").iterdir())
    assert not list(store.root.rglob("*.dcm"))


def test_series_folder_removed_behind_the_stores_back_is_made_again(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    data, ds = _part10()
    first = store.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, data)
    folder = (store.root / first.relative_path).parent
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()  # e.g. an operator cleaning up
    other, other_ds = _part10(seed=3)
    again = store.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, other_ds.SOPInstanceUID, other)
    assert (store.root / again.relative_path).read_bytes() == other


def test_header_reads_padded_uids_and_refuses_a_bad_frame_of_reference() -> None:
    data, ds = _part10()
    header = header_from_dataset(
        pydicom.dcmread(BytesIO(data), stop_before_pixels=True), ExplicitVRLittleEndian
    )
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.instance_number == int(ds.InstanceNumber)
    assert header.study_fields()["patient_id"] == ds.PatientID
    assert header.series_fields()["modality"] == "CT"

    raw = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    element = raw.get_item(0x00080018)
    assert element is not None
    # a UID padded with NUL, as the standard pads odd lengths
    raw[0x00080018] = pydicom.DataElement(0x00080018, "UI", b"1.2.345\x00")
    assert header_from_dataset(raw, ExplicitVRLittleEndian).sop_instance_uid == "1.2.345"
    raw.FrameOfReferenceUID = "1.2.03"  # leading zero in a component: not a UID
    with pytest.raises(InvalidUidError):
        header_from_dataset(raw, ExplicitVRLittleEndian)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_read_from_the_data_set_offset_is_the_whole_files(syntax: str) -> None:
    """C-STORE reads the header past the file meta it wrote; STOW-RS reads the whole file:
    the same header, and the same refusal of a truncated image, either way."""
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=3)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    part10 = buffer.getvalue()  # the data set after pydicom's file meta: what travels
    dataset = part10[144 + int.from_bytes(part10[140:144], "little") :]
    meta = file_meta_bytes(CTImageStorage, ds.SOPInstanceUID, syntax, "MODALITY")
    data = meta + dataset
    from_offset = _read_header(data, syntax, "MODALITY", ds.SOPInstanceUID, len(meta))
    whole = _read_header(data, syntax, "MODALITY", ds.SOPInstanceUID)
    assert from_offset == whole
    assert getattr(from_offset, "sop_instance_uid", None) == ds.SOPInstanceUID

    truncated = meta + dataset[:-100]
    refused = _read_header(truncated, syntax, "MODALITY", None, len(meta))
    assert getattr(refused, "status", None) == STATUS_CANNOT_UNDERSTAND
    assert refused == _read_header(truncated, syntax, "MODALITY", None)


def test_per_instance_statements_bind_enums_and_utc_times(database_url: str) -> None:
    """The study statement run per instance past SQLAlchemy's execute (DriverStatement)
    stores what the ORM reads back: the state, the aware UTC time, the count."""
    upgrade(database_url)
    engine = make_engine(database_url)
    uid = generate_uid()
    first = datetime(2026, 12, 3, 14, 0, 0, 123456, tzinfo=UTC)
    later = datetime(2026, 12, 3, 16, 30, 5, 654321, tzinfo=timezone(timedelta(hours=1)))
    try:
        with engine.begin() as connection:
            open_study(connection, uid, {}, now=first)
            study_id = connection.scalar(select(Study.id).where(Study.study_instance_uid == uid))
            assert study_id is not None
            connection.execute(
                update(Study).where(Study.id == study_id).values(state=StudyState.COMPLETE)
            )
            instance_received(connection, study_id, now=first, new=True)
            instance_received(connection, study_id, now=later, new=True)
            instance_received(connection, study_id, now=later, new=False)
        with Session(engine) as session:
            study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
            assert study.state is StudyState.RECEIVING  # re-opened
            assert study.instance_count == 2  # only new instances counted
            assert study.last_received_at == later  # the same instant, read back in UTC
            assert study.last_received_at.tzinfo is not None
    finally:
        engine.dispose()


def test_writer_lock_queues_writers_across_open_files(tmp_path: Path) -> None:
    # Two locks on the same database (as two listener processes hold) exclude each other.
    path = tmp_path / "db.sqlite.writer-lock"
    first, second = WriterLock(path), WriterLock(path)
    order: list[str] = []
    with first:
        waiter = threading.Thread(target=lambda: (second.__enter__(), order.append("second")))
        waiter.start()
        time.sleep(0.2)
        order.append("first done")
    waiter.join(timeout=5)
    second.__exit__(None, None, None)
    assert order == ["first done", "second"]


def test_writer_lock_waits_for_another_process(tmp_path: Path) -> None:
    database = tmp_path / "index.db"
    engine = create_engine(f"sqlite:///{database}")
    lock = writer_lock(engine)
    assert isinstance(lock, WriterLock)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(database) + '.writer-lock'!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(0.5)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with lock:
            waited = time.monotonic() - start
        assert waited > 0.2  # it waited for the other process to let go
    finally:
        holder.wait(timeout=10)
    engine.dispose()


def test_no_writer_lock_for_postgresql() -> None:
    engine = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    assert not isinstance(writer_lock(engine), WriterLock)
    engine.dispose()


def test_file_descriptors_do_not_leak_per_write(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "storage")
    data, ds = _part10()
    before = len(os.listdir("/proc/self/fd"))
    for index in range(20):
        store.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, f"1.2.3.{index + 1}", data)
    assert len(os.listdir("/proc/self/fd")) <= before + 1


def test_poll_interval_setting_reaches_each_association(node_factory: NodeFactory) -> None:
    node = node_factory(dicom_poll_interval_ms=0.3)
    scu = AE(ae_title="MODALITY")
    scu.add_requested_context(CTImageStorage)
    assoc = scu.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    try:
        assert assoc.is_established
        deadline = time.monotonic() + 5
        while not node.node.service.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.01)
        (accepted,) = node.node.service.ae.active_associations
        assert accepted.dul._run_loop_delay == pytest.approx(0.0003)
    finally:
        assoc.release()


def test_the_pynetdicom_private_api_the_node_uses_is_there() -> None:
    """Fails loudly when a pynetdicom upgrade removes or renames what the adapter reaches."""
    from dicom_node.dicom import pynetdicom_private

    pynetdicom_private.check_private_api()
