"""The node's DICOM front door against real peers (DCMTK, pynetdicom) on loopback,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from sqlalchemy import func, select

from dicom_node.archive.schema import Instance, Series, Study, StudyState
from tests.dicom_factory import ct_slice, write_ct_series
from tests.node.conftest import RunningNode
from tests.support import dcmtk_env, require_dcmtk

NodeFactory = Callable[..., RunningNode]


def _instances(node: RunningNode) -> list[Instance]:
    with node.node.sessions() as session:
        return list(session.scalars(select(Instance).order_by(Instance.sop_instance_uid)))


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the file meta group: what travelled on the wire."""
    with path.open("rb") as handle:
        data = handle.read()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return data[meta_end:]


def _storescu(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_dcmtk("storescu"), "-aet", "MODALITY", "-aec", "SPINE_TRIAGE", *args],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_echoscu_verifies(node_factory: NodeFactory) -> None:
    node = node_factory()
    done = subprocess.run(
        [require_dcmtk("echoscu"), "-aec", "SPINE_TRIAGE", "127.0.0.1", str(node.port)],
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_storescu_one_association_stores_every_instance(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    files = write_ct_series(tmp_path / "in", 12)
    done = _storescu(node.port, "127.0.0.1", str(node.port), *map(str, files))
    assert done.returncode == 0, done.stderr

    instances = _instances(node)
    assert len(instances) == 12
    sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    for instance in instances:
        stored = node.storage / instance.path
        # stored exactly as received: the dataset bytes are those of the sent file
        assert _dataset_bytes(stored) == _dataset_bytes(sent[instance.sop_instance_uid])
        assert instance.calling_ae == "MODALITY"
    with node.node.sessions() as session:
        study = session.scalars(select(Study)).one()
        assert study.instance_count == 12
        assert study.state is StudyState.RECEIVING  # association release is not completion
        assert session.scalar(select(Series.instance_count)) == 12
    # nothing left in the incoming folder
    assert not list((node.storage / ".incoming").iterdir())


def _convert(tool: str, options: list[str], source: Path, target: Path) -> None:
    done = subprocess.run(
        [require_dcmtk(tool), *options, str(source), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _storescu_config(path: Path, transfer_syntaxes: list[str]) -> Path:
    lines = ["[[TransferSyntaxes]]"]
    for number, uid in enumerate(transfer_syntaxes, 1):
        lines += [f"[TS{number}]", f"TransferSyntax1 = {uid}"]
    lines += ["[[PresentationContexts]]", "[CTContexts]"]
    for number in range(1, len(transfer_syntaxes) + 1):
        lines.append(f"PresentationContext{number} = CTImageStorage\\TS{number}")
    lines += ["[[Profiles]]", "[AllCT]", "PresentationContexts = CTContexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_storescu_folder_in_several_transfer_syntaxes(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    node = node_factory()
    source = write_ct_series(tmp_path / "src", 8)
    folder = tmp_path / "mixed"
    folder.mkdir()
    conversions = [
        ("dcmconv", ["+ti"]),  # implicit VR little endian
        ("dcmconv", ["+te"]),  # explicit VR little endian
        ("dcmconv", ["+tb"]),  # explicit VR big endian
        ("dcmconv", ["+td"]),  # deflated
        ("dcmcjpeg", ["+e1"]),  # JPEG lossless SV1
        ("dcmcjpeg", ["+ee"]),  # JPEG extended (lossy, 12 bit)
        ("dcmcrle", []),  # RLE
        ("dcmcjpls", []),  # JPEG-LS lossless
    ]
    expected: dict[str, str] = {}
    for path, (tool, options) in zip(source, conversions, strict=True):
        target = folder / f"{path.stem}-{tool}{''.join(options)}.dcm"
        _convert(tool, options, path, target)
        ds = pydicom.dcmread(target, stop_before_pixels=True)
        expected[ds.SOPInstanceUID] = str(ds.file_meta.TransferSyntaxUID)
    # JPEG 2000 lossless, encoded with pydicom + openjpeg
    j2k = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=99)
    j2k.compress(JPEG2000Lossless)
    j2k.save_as(folder / "j2k.dcm", enforce_file_format=True)
    expected[j2k.SOPInstanceUID] = JPEG2000Lossless
    assert len(set(expected.values())) == 9

    # One association proposing every one of them, each in its own presentation context.
    config = _storescu_config(tmp_path / "storescu.cfg", sorted(set(expected.values())))
    done = _storescu(
        node.port, "-xf", str(config), "AllCT", "+sd", "127.0.0.1", str(node.port), str(folder)
    )
    assert done.returncode == 0, done.stderr
    instances = _instances(node)
    assert {i.sop_instance_uid: i.transfer_syntax_uid for i in instances} == expected
    by_uid = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in folder.iterdir()
    }
    for instance in instances:
        received = _dataset_bytes(node.storage / instance.path)
        sent = _dataset_bytes(by_uid[instance.sop_instance_uid])
        # an odd-length deflated stream travels with one pad byte (DICOM values are even)
        assert received == sent or (len(sent) % 2 == 1 and received == sent + b"\x00")


def _pynetdicom_scu(port: int, datasets: list[pydicom.Dataset], calling: str = "SCU") -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINE_TRIAGE")
    assert assoc.is_established
    assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
        ae.shutdown()


def test_pynetdicom_scu_and_resend_is_idempotent(node_factory: NodeFactory) -> None:
    node = node_factory()
    study, series = generate_uid(), generate_uid()
    datasets = [ct_slice(study_uid=study, series_uid=series, index=i) for i in range(5)]
    assert _pynetdicom_scu(node.port, datasets) == [0] * 5
    assert _pynetdicom_scu(node.port, datasets) == [0] * 5  # same content again
    instances = _instances(node)
    assert len(instances) == 5
    first_paths = {i.sop_instance_uid: i.path for i in instances}

    changed = ct_slice(study_uid=study, series_uid=series, index=2, seed=7)
    changed.SOPInstanceUID = datasets[2].SOPInstanceUID
    changed.file_meta.MediaStorageSOPInstanceUID = changed.SOPInstanceUID
    assert _pynetdicom_scu(node.port, [changed]) == [0]
    instances = _instances(node)
    assert len(instances) == 5  # replaced, not duplicated
    replaced = next(i for i in instances if i.sop_instance_uid == changed.SOPInstanceUID)
    assert replaced.path != first_paths[changed.SOPInstanceUID]
    assert not (node.storage / first_paths[changed.SOPInstanceUID]).exists()
    assert pydicom.dcmread(node.storage / replaced.path).PixelData == changed.PixelData
    with node.node.sessions() as session:
        assert session.scalar(select(Study.instance_count)) == 5
        assert len(list(node.storage.rglob("*.dcm"))) == 5


def test_unknown_calling_ae_is_rejected(node_factory: NodeFactory) -> None:
    node = node_factory(allowed_calling_aes=["PACS"])
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    try:
        assert assoc.is_rejected
    finally:
        ae.shutdown()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    assert assoc.is_established
    assoc.release()
    ae.shutdown()


def test_wrong_called_ae_is_rejected(node_factory: NodeFactory) -> None:
    node = node_factory()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SOMEONE_ELSE")
    try:
        assert assoc.is_rejected
    finally:
        ae.shutdown()


def test_non_ct_storage_context_is_rejected(node_factory: NodeFactory) -> None:
    node = node_factory()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        assert MRImageStorage in rejected
        assert CTImageStorage in accepted
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.parametrize(
    "bad_uid",
    ["../../../../tmp/escape", "1.2.840/../../x", "1.2.3.abc", "1." + "1" * 70],
)
def test_uid_that_would_escape_storage_is_refused(
    node_factory: NodeFactory, tmp_path: Path, bad_uid: str
) -> None:
    node = node_factory()
    ds = ct_slice(study_uid=bad_uid, series_uid=generate_uid(), index=0)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        assert 0xC000 <= int(status.Status) <= 0xCFFF
        # the association is still usable: a good instance after the bad one is stored
        good = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=1)
        assert int(assoc.send_c_store(good).Status) == 0
    finally:
        assoc.release()
        ae.shutdown()
    assert len(_instances(node)) == 1
    stored = [p for p in node.storage.rglob("*") if p.is_file()]
    assert len(stored) == 1  # only the good instance
    assert not Path("/tmp/escape").exists()
    written = {p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".dcm"}
    assert written == set(stored)


def test_disk_full_answers_out_of_resources_and_leaves_nothing(node_factory: NodeFactory) -> None:
    # A free-space reserve larger than any disk: the node is "full".
    node = node_factory(min_free_disk_mb=1 << 40)
    ds = ct_slice(study_uid=generate_uid(), series_uid=generate_uid(), index=0)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    try:
        assert int(assoc.send_c_store(ds).Status) == 0xA700
    finally:
        assoc.release()
        ae.shutdown()
    assert _instances(node) == []
    assert [p for p in node.storage.rglob("*") if p.is_file()] == []
    with node.node.sessions() as session:
        assert session.scalar(select(func.count(Study.id))) == 0


def test_quiet_period_completes_and_late_instance_reopens(node_factory: NodeFactory) -> None:
    import time

    node = node_factory(quiet_period_s=0.5, completion_check_interval_s=0.1, scheduler=True)
    study, series = generate_uid(), generate_uid()
    assert _pynetdicom_scu(node.port, [ct_slice(study_uid=study, series_uid=series, index=0)]) == [
        0
    ]

    def state() -> tuple[StudyState, int]:
        with node.node.sessions() as session:
            row = session.execute(select(Study.state, Study.completion_count)).one()
            return row.state, row.completion_count

    assert state() == (StudyState.RECEIVING, 0)
    deadline = time.monotonic() + 10
    while state()[0] is not StudyState.COMPLETE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state() == (StudyState.COMPLETE, 1)

    assert _pynetdicom_scu(node.port, [ct_slice(study_uid=study, series_uid=series, index=1)]) == [
        0
    ]
    assert state()[0] is StudyState.RECEIVING  # re-opened by the late instance
    deadline = time.monotonic() + 10
    while state()[0] is not StudyState.COMPLETE and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state() == (StudyState.COMPLETE, 2)


@pytest.mark.parametrize(
    ("offered", "accepted"),
    [
        (["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"], "1.2.840.10008.1.2.4.90"),
        (["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"], "1.2.840.10008.1.2.1"),
        (["1.2.840.10008.1.2.4.91"], "1.2.840.10008.1.2.4.91"),
    ],
)
def test_transfer_syntax_preference_lossless_first_lossy_last(
    node_factory: NodeFactory, offered: list[str], accepted: str
) -> None:
    node = node_factory()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, offered)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SPINE_TRIAGE")
    try:
        assert assoc.is_established
        assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [accepted]
    finally:
        assoc.release()
        ae.shutdown()


def test_storescu_legacy_converted_enhanced_ct_is_stored_and_indexed(
    node_factory: NodeFactory, tmp_path: Path
) -> None:
    """What highdicom's ``LegacyConvertedEnhancedCTImage`` writes (one multi-frame object
    made of classic slices) is accepted like Enhanced CT, on both databases."""
    node = node_factory()
    slices = write_ct_series(tmp_path / "in", 6)
    converted = LegacyConvertedEnhancedCTImage(
        legacy_datasets=[pydicom.dcmread(path) for path in slices],
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    path = tmp_path / "legacy.dcm"
    converted.save_as(path)
    # --required: storescu's default proposal list lacks this SOP class
    done = _storescu(node.port, "--required", "127.0.0.1", str(node.port), str(path))
    assert done.returncode == 0, done.stderr
    (row,) = _instances(node)
    assert row.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.2"
    assert row.sop_instance_uid == converted.SOPInstanceUID
    stored = pydicom.dcmread(node.storage / row.path)
    assert int(stored.NumberOfFrames) == 6
    assert stored.PixelData == converted.PixelData
