"""The durable store path alone, stage by stage, without the network.

Makes N synthetic CT instances (512×512 int16, ~0.5 MiB each) and stores them one after the
other through the pieces of :func:`dicom_node.dicom.ingest.store_instance` (a fresh SQLite index and
storage under ``--root``), timing each stage, then prints the medians in ms per instance:

    python benchmarks/bench_store_path.py [--instances 300] [--root /tmp]

start      begin the background write (free-space check, hand-off to the I/O thread)
header     read and check the header (pydicom, no pixels; from the data set's offset past
           the file meta, as C-STORE does)
digest     SHA-256 of the bytes (the file's name and the index's fixity value)
place      wait for the bytes to be on stable storage, rename into place
index      the index statements (SQLAlchemy Core, three for a known series)
commit     the index commit (SQLite WAL fsync; the folder fsync runs beside it)
durable    wait for the folder fsync
total      all of it; "CPU" is the receiving thread's CPU time

``--root /dev/shm`` puts storage and index on tmpfs, where fsync costs nothing: the
difference to a disk run is what durability costs on that disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.archive.db import make_engine  # noqa: E402
from dicom_node.archive.migrate import upgrade  # noqa: E402
from dicom_node.dicom.index import KnownIds, record_instance  # noqa: E402
from dicom_node.dicom.ingest import _read_header  # noqa: E402
from dicom_node.dicom.storage import FileStore, content_digest  # noqa: E402
from tests.dicom_factory import write_ct_series  # noqa: E402

STAGES = ("start", "header", "digest", "place", "index", "commit", "durable", "total", "CPU")


def run(blobs: list[bytes], root: Path) -> dict[str, float]:
    url = f"sqlite:///{root / 'index.db'}"
    upgrade(url)
    engine = make_engine(url)
    store = FileStore(root / "storage")
    known = KnownIds()
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    os.sync()
    for data in blobs:
        # the file meta ends after the preamble, "DICM" and its group length element
        offset = 144 + int.from_bytes(data[140:144], "little")
        cpu, t0 = time.thread_time(), time.perf_counter()
        pending = store.start(data)
        t1 = time.perf_counter()
        header = _read_header(data, "1.2.840.10008.1.2.1", "BENCH", None, offset)
        assert not hasattr(header, "status"), header
        t2 = time.perf_counter()
        digest = content_digest(data)
        t3 = time.perf_counter()
        uids = (header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        stored = pending.place(store.relative_path(*uids, digest), digest)
        t4 = time.perf_counter()
        with engine.connect() as connection:
            transaction = connection.begin()
            result = record_instance(
                connection, header, stored, calling_ae="BENCH", now=datetime.now(UTC), known=known
            )
            t5 = time.perf_counter()
            transaction.commit()
        t6 = time.perf_counter()
        pending.wait_durable()
        t7 = time.perf_counter()
        known.remember(header, result)
        marks = (t0, t1, t2, t3, t4, t5, t6, t7)
        for stage, begin, end in zip(STAGES, marks, marks[1:], strict=False):
            times[stage].append(end - begin)
        times["total"].append(t7 - t0)
        times["CPU"].append(time.thread_time() - cpu)
    engine.dispose()
    return {stage: statistics.median(values) * 1e3 for stage, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=args.root))
    try:
        files = write_ct_series(data, args.instances, rows=512, columns=512)
        blobs = [path.read_bytes() for path in files]
        medians = run(blobs, work)
    finally:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.instances} instances under {args.root}, median ms per instance:")
    for stage in STAGES:
        print(f"  {stage:<8} {medians[stage]:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
