"""The node SIGKILLed at random points while it receives a 300-instance study.

Two pynetdicom senders (one association each, half the study each) record which instances
got Success. The node process is killed with SIGKILL a few times mid-send, at random moments
(seeded), and restarted on the same storage and database; the senders then send again what
was never acknowledged. After every restart each acknowledged instance must be indexed and
its file on disk with the indexed digest; at the end the index holds each instance exactly
once, the storage holds exactly the indexed files (nothing half written, no orphan), and the
quiet period completes the study with the right count. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from sqlalchemy import Engine, select

from dicom_node.archive.db import make_engine
from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import Instance, Series, Study, StudyState
from tests.dicom_factory import write_ct_series
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
INSTANCES = 300
SENDERS = 2
KILLS = 4


@dataclass
class NodeProcess:
    """The node as its own process (``spine-triage node --no-http``), to be SIGKILLed."""

    var_dir: Path
    database_url: str
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_TRIAGE_")}
        env.update(
            {
                "SPINE_TRIAGE_VAR_DIR": str(self.var_dir),
                "SPINE_TRIAGE_DATABASE_URL": self.database_url,
                "SPINE_TRIAGE_DICOM_HOST": "127.0.0.1",
                "SPINE_TRIAGE_DICOM_PORT": str(self.port),
                "SPINE_TRIAGE_MIN_FREE_DISK_MB": "0",
                "SPINE_TRIAGE_QUIET_PERIOD_S": "1",
                "SPINE_TRIAGE_AUTO_ROI": "off",
            }
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "--log-level", "WARNING", "node", "--no-http"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited: {self.process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the node did not start listening")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@dataclass
class Sender:
    """One association sending its share in order, recording every Success."""

    port: int
    datasets: Sequence[pydicom.Dataset]
    acknowledged: set[str]
    lock: threading.Lock

    def send_unacknowledged(self) -> None:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        # pynetdicom notices a dead peer only when a timeout ends its wait for the response;
        # a response that is merely late counts as unacknowledged and is sent again
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 2
        try:
            assoc = ae.associate("127.0.0.1", self.port, ae_title="SPINE_TRIAGE")
            if not assoc.is_established:
                return
            if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
                assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for ds in self.datasets:
                with self.lock:
                    if ds.SOPInstanceUID in self.acknowledged:
                        continue
                if not assoc.is_established:
                    return
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) == 0x0000:
                    with self.lock:
                        self.acknowledged.add(ds.SOPInstanceUID)
            assoc.release()
        except (OSError, RuntimeError):  # the node died under the association
            return
        finally:
            ae.shutdown()


def _indexed(engine: Engine) -> dict[str, tuple[str, str]]:
    """SOP Instance UID → (path, sha256) of every indexed instance."""
    with engine.connect() as connection:
        rows = connection.execute(select(Instance.sop_instance_uid, Instance.path, Instance.sha256))
        return {row.sop_instance_uid: (row.path, row.sha256) for row in rows}


def _check_acknowledged_are_durable(
    engine: Engine, storage: Path, acknowledged: set[str]
) -> dict[str, tuple[str, str]]:
    indexed = _indexed(engine)
    missing = acknowledged - indexed.keys()
    assert not missing, f"{len(missing)} acknowledged instance(s) not in the index"
    for uid in acknowledged:
        path, sha256 = indexed[uid]
        assert hashlib.sha256((storage / path).read_bytes()).hexdigest() == sha256, uid
    return indexed


@pytest.fixture
def node_process(tmp_path: Path, database_url: str) -> Iterator[NodeProcess]:
    upgrade(database_url)
    node = NodeProcess(tmp_path / "var", database_url)
    yield node
    node.stop()


def test_sigkill_at_random_points_loses_and_duplicates_nothing(
    node_process: NodeProcess, tmp_path: Path
) -> None:
    files = write_ct_series(tmp_path / "study", INSTANCES)
    datasets = [pydicom.dcmread(path) for path in files]
    study_uid = str(datasets[0].StudyInstanceUID)
    acknowledged: set[str] = set()
    lock = threading.Lock()
    rng = random.Random(16)
    # kill once this many instances were acknowledged (spread over the send), plus a random
    # delay of up to a few milliseconds: the kill lands anywhere in an instance's handling
    kill_after = sorted(rng.sample(range(20, INSTANCES - 20), KILLS))
    engine = make_engine(node_process.database_url)
    storage = node_process.var_dir / "storage"
    try:
        for round_number in range(KILLS + 1):
            node_process.start()
            if round_number:  # after a restart: every instance acknowledged so far is there
                _check_acknowledged_are_durable(engine, storage, acknowledged)
            senders = [
                Sender(node_process.port, datasets[part::SENDERS], acknowledged, lock)
                for part in range(SENDERS)
            ]
            threads = [threading.Thread(target=s.send_unacknowledged) for s in senders]
            for thread in threads:
                thread.start()
            if round_number < KILLS:
                target = kill_after[round_number]
                deadline = time.monotonic() + 60
                while len(acknowledged) < target and time.monotonic() < deadline:
                    time.sleep(0.0005)
                time.sleep(rng.uniform(0, 0.004))
                node_process.kill()
            for thread in threads:
                thread.join(timeout=120)
                assert not thread.is_alive()
            if round_number < KILLS:
                assert len(acknowledged) < INSTANCES, "the kill came after the whole study"
        for _ in range(3):  # a late response (a busy machine) is sent again, as a PACS would
            if len(acknowledged) == INSTANCES:
                break
            Sender(node_process.port, datasets, acknowledged, lock).send_unacknowledged()
        assert len(acknowledged) == INSTANCES

        indexed = _check_acknowledged_are_durable(engine, storage, acknowledged)
        assert set(indexed) == {str(ds.SOPInstanceUID) for ds in datasets}
        on_disk = {
            path.relative_to(storage).as_posix()
            for path in storage.rglob("*.dcm")
            if not path.relative_to(storage).parts[0].startswith(".")
        }
        assert on_disk == {path for path, _ in indexed.values()}  # no orphan, no duplicate
        assert not list((storage / ".incoming").glob("*.part"))

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                study = connection.execute(
                    select(Study.state, Study.instance_count).where(
                        Study.study_instance_uid == study_uid
                    )
                ).one()
            if study.state is StudyState.COMPLETE:
                break
            time.sleep(0.2)
        assert study.state is StudyState.COMPLETE
        assert study.instance_count == INSTANCES  # each instance counted once
        with engine.connect() as connection:
            assert connection.scalar(select(Series.instance_count)) == INSTANCES
    finally:
        engine.dispose()
