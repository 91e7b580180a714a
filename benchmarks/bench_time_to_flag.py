"""Time to flag: from the last instance acknowledged to the SR stored in the PACS and the HL7
message received — the whole system running, as a hospital would see it.

    python benchmarks/bench_time_to_flag.py [--studies 20] [--workers 1] [--quiet-period 1]
        [--database-url postgresql+psycopg2://postgres@127.0.0.1:5432] [--json out.json]

The node (``spine-triage node``) and the worker(s) (``spine-triage worker``) run as their own
processes, as in production; a real Orthanc is the PACS (C-STORE destination) and a real MLLP
listener the RIS (HL7 destination). Synthetic 300-slice 512×512 studies (a few phantoms,
copied under new UIDs) are sent back to back with DCMTK ``storescu``; each ROI is posted by
REST before its study, so the job is ready the moment the study completes (with
``--automatic`` no ROI is posted: the node's automatic analysis finds and judges every
vertebral body once the study is complete, as with ``AUTO_ROI=always``). Reported: p50 and
p95 of (flag time − last acknowledgment − quiet period), throughput in studies per hour, where
the time goes (ingest, load, inference, report, delivery), and the peak resident memory of
the node and of a worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests.services import MllpListener, Orthanc  # noqa: E402
from tests.support import free_port  # noqa: E402


def make_studies(
    folder: Path, count: int, phantoms: int
) -> list[tuple[list[Path], dict[str, Any]]]:
    """``count`` 300-slice studies: ``phantoms`` distinct ones, the rest copies under new UIDs."""
    from model.synthetic.cases import make_case

    bases = []
    for number in range(phantoms):
        label = "malignant" if number % 2 == 0 else "benign"
        case = make_case(
            folder / "phantoms",
            patient_id=f"T2F{number}",
            label=label,
            seed=100 + number,
            size="full",
            slices=300,
            slice_spacing_mm=1.0,
            pixel_spacing_mm=0.7,
        )
        bases.append(case)
    studies = []
    for index in range(count):
        base = bases[index % phantoms]
        files = sorted(Path(base.series_dir).rglob("*.dcm"))
        roi = base.roi.to_json()
        if index >= phantoms:
            study_uid, series_uid = generate_uid(), generate_uid()
            target = folder / f"copy{index:03d}"
            target.mkdir(parents=True)
            copies = []
            for path in files:
                ds = pydicom.dcmread(path)
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.SOPInstanceUID = generate_uid()
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.PatientID = f"T2F-COPY-{index:03d}"
                out = target / path.name
                ds.save_as(out, enforce_file_format=True)
                copies.append(out)
            files = copies
            roi = {**roi, "study_instance_uid": study_uid, "series_instance_uid": series_uid}
        studies.append((files, roi))
    return studies


def peak_rss_mib(pid: int) -> float:
    """VmHWM of a process and its children (a Celery worker is one process with threads)."""
    total = 0.0
    for candidate in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total = max(total, int(line.split()[1]) / 1024)
        except FileNotFoundError:
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low, high = int(rank), min(int(rank) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quiet-period", type=float, default=1.0)
    parser.add_argument("--checkpoint", type=Path, help="default: the demonstration model")
    parser.add_argument("--database-url", help="PostgreSQL server URL (default: SQLite)")
    parser.add_argument("--broker-url", default="", help="e.g. redis://127.0.0.1:6379/5")
    parser.add_argument("--data", type=Path, default=ROOT / "var" / "bench-t2f")
    parser.add_argument(
        "--batch",
        action="store_true",
        help="throughput mode: send every study first, then post all ROIs at once and time "
        "the workers alone (studies per hour from the first ROI to the last flag)",
    )
    parser.add_argument(
        "--automatic",
        action="store_true",
        help="post no ROI: every study is analysed automatically (AUTO_ROI=always)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    if not (args.data / "ready").exists():
        shutil.rmtree(args.data, ignore_errors=True)
        print(f"writing {args.studies} synthetic 300-slice studies to {args.data}", flush=True)
        studies = make_studies(args.data, args.studies, args.phantoms)
        (args.data / "studies.json").write_text(
            json.dumps([[list(map(str, f)), roi] for f, roi in studies])
        )
        (args.data / "ready").touch()
    studies = [
        ([Path(p) for p in files], roi)
        for files, roi in json.loads((args.data / "studies.json").read_text())
    ][: args.studies]

    work = Path(tempfile.mkdtemp(prefix="bench-t2f-"))
    orthanc = Orthanc(work / "orthanc").start()
    ris = MllpListener().start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_TRIAGE_")}
    dicom_port, http_port = free_port(), free_port()
    database_url = f"sqlite:///{work / 'triage.db'}"
    if args.database_url:
        from sqlalchemy import create_engine, text

        name = f"bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(f"{args.database_url}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        database_url = f"{args.database_url}/{name}"
    checkpoint = args.checkpoint
    if checkpoint is None:
        from model.synthetic.demo import ensure_demo_checkpoint

        checkpoint = ensure_demo_checkpoint(ROOT / "var" / "models")
    env.update(
        {
            "SPINE_TRIAGE_VAR_DIR": str(work / "var"),
            "SPINE_TRIAGE_DATABASE_URL": database_url,
            "SPINE_TRIAGE_BROKER_URL": args.broker_url,
            "SPINE_TRIAGE_DICOM_HOST": "127.0.0.1",
            "SPINE_TRIAGE_DICOM_PORT": str(dicom_port),
            "SPINE_TRIAGE_HTTP_PORT": str(http_port),
            "SPINE_TRIAGE_QUIET_PERIOD_S": str(args.quiet_period),
            "SPINE_TRIAGE_COMPLETION_CHECK_INTERVAL_S": "0.2",
            "SPINE_TRIAGE_MIN_FREE_DISK_MB": "0",
            "SPINE_TRIAGE_MODEL_CHECKPOINT": str(checkpoint),
            "SPINE_TRIAGE_API_TOKEN": "bench-token",
            "SPINE_TRIAGE_AUTO_ROI": "always" if args.automatic else "off",
            "SPINE_TRIAGE_DESTINATIONS": json.dumps(
                [
                    {
                        "name": "pacs",
                        "kind": "cstore",
                        "ae_title": orthanc.aet,
                        "host": "127.0.0.1",
                        "port": orthanc.dicom_port,
                    },
                    {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port},
                ]
            ),
        }
    )
    cli = [sys.executable, "-m", "worker.cli", "--log-level", "WARNING"]
    subprocess.run(
        [*cli, "db", "upgrade"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    logs = open(work / "processes.log", "ab")  # noqa: SIM115
    node = subprocess.Popen([*cli, "node"], env=env, cwd=ROOT, stdout=logs, stderr=logs)
    workers = [
        subprocess.Popen(
            [*cli, "worker", "--hostname", f"w{n}@bench", "--concurrency", "2"],
            env=env,
            cwd=ROOT,
            stdout=logs,
            stderr=logs,
        )
        for n in range(args.workers)
    ]
    api = f"http://127.0.0.1:{http_port}"
    try:
        _wait_http(api)
        time.sleep(8)  # workers load the model before the first study
        acked: dict[str, float] = {}
        ingest_s: list[float] = []
        watcher = ArrivalWatcher(orthanc, ris, acked)
        watcher.start()
        start = time.perf_counter()
        with httpx.Client(base_url=api, headers={"Authorization": "Bearer bench-token"}) as client:
            for files, roi in studies:
                if not args.batch and not args.automatic:
                    client.post("/annotations", json=roi).raise_for_status()
                begin = time.perf_counter()
                subprocess.run(
                    [
                        "/usr/bin/storescu",
                        "-aec",
                        "SPINE_TRIAGE",
                        "127.0.0.1",
                        str(dicom_port),
                        *map(str, files),
                    ],
                    env={**os.environ, "TCP_NODELAY": "1"},
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                acked[roi["study_instance_uid"]] = time.perf_counter()
                ingest_s.append(acked[roi["study_instance_uid"]] - begin)
            if args.batch and not args.automatic:
                time.sleep(args.quiet_period + 1.0)  # every study complete
                start = time.perf_counter()
                for _, roi in studies:
                    client.post("/annotations", json=roi).raise_for_status()
                    acked[roi["study_instance_uid"]] = time.perf_counter() + args.quiet_period
        deadline = time.perf_counter() + 60 * 30
        while len(watcher.flagged) < len(studies) and time.perf_counter() < deadline:
            time.sleep(0.1)
        watcher.stop()
        flagged = dict(watcher.flagged)
        end = max(flagged.values(), default=time.perf_counter())
        node_rss = peak_rss_mib(node.pid)
        worker_rss = max(peak_rss_mib(w.pid) for w in workers)
        timings = _result_timings(api)
    finally:
        for process in [*workers, node]:
            process.send_signal(signal.SIGTERM)
        for process in [*workers, node]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
        orthanc.stop()
        ris.stop()
        shutil.rmtree(work, ignore_errors=True)

    delays = [flagged[uid] - acked[uid] - args.quiet_period for uid in flagged]
    figures = {
        "studies": len(studies),
        "flagged": len(flagged),
        "workers": args.workers,
        "quiet_period_s": args.quiet_period,
        "mode": "automatic (no ROI), studies back to back"
        if args.automatic
        else "batch (ROIs after every study)"
        if args.batch
        else "ROI first, studies back to back",
        "database": "postgresql" if args.database_url else "sqlite",
        "broker": "redis" if args.broker_url else "filesystem",
        "time_to_flag_p50_s": round(percentile(delays, 0.5), 2),
        "time_to_flag_p95_s": round(percentile(delays, 0.95), 2),
        "time_to_flag_max_s": round(max(delays), 2),
        "ingest_per_study_s": round(statistics.median(ingest_s), 2),
        "studies_per_hour": round(len(flagged) / (end - start) * 3600, 1),
        "median_step_s": timings,
        "node_peak_rss_mib": round(node_rss, 1),
        "worker_peak_rss_mib": round(worker_rss, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if len(flagged) == len(studies) else 1


def _wait_http(api: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{api}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the node did not come up")


class ArrivalWatcher(threading.Thread):
    """Polls the RIS listener and Orthanc every 50 ms: when did each study's flag arrive
    (its ORU received and its SR stored, whichever came last)."""

    def __init__(self, orthanc: Orthanc, ris: MllpListener, acked: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.orthanc, self.ris, self.acked = orthanc, ris, acked
        self.oru: dict[str, float] = {}
        self.sr: dict[str, float] = {}
        self.flagged: dict[str, float] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        with self.orthanc.client() as client:
            while not self._stop_event.is_set():
                now = time.perf_counter()
                for message in list(self.ris.received):
                    uid = str(message.segment("ZDS").extract_field(1, 1, 1, 1))
                    self.oru.setdefault(uid, now)
                for uid in list(self.acked):
                    if uid in self.sr:
                        continue
                    found = client.post(
                        "/tools/find",
                        json={
                            "Level": "Instance",
                            "Query": {"StudyInstanceUID": uid, "Modality": "SR"},
                        },
                    ).json()
                    if found:
                        self.sr[uid] = now
                for uid in set(self.sr) & set(self.oru):
                    self.flagged.setdefault(uid, max(self.sr[uid], self.oru[uid]))
                self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def _result_timings(api: str) -> dict[str, float]:
    annotations = httpx.get(f"{api}/annotations", params={"limit": 1000}, timeout=30).json()
    steps: dict[str, list[float]] = {}
    for annotation in annotations:
        for result in annotation["results"]:
            for delivery in result["deliveries"]:
                if delivery["delivered_at"]:
                    from datetime import datetime

                    took = (
                        datetime.fromisoformat(delivery["delivered_at"])
                        - datetime.fromisoformat(result["created_at"])
                    ).total_seconds()
                    steps.setdefault(f"delivery_{delivery['kind']}_s", []).append(took)
            for key, value in result.get("timings_s", {}).items():
                steps.setdefault(key, []).append(value)
    return {key: round(statistics.median(values), 3) for key, values in steps.items()}


if __name__ == "__main__":
    sys.exit(main())
