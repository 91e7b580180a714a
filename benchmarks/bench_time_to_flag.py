"""Time to flag: from the last instance acknowledged to the priority flag at the RIS (its HL7
ORU received) and to the SR stored in the PACS — the whole system running, as a hospital would
see it.

    python benchmarks/bench_time_to_flag.py [--studies 20] [--workers 1] [--quiet-period 1]
        [--automatic] [--arrival both|spaced|back-to-back] [--interval S]
        [--database-url postgresql+psycopg2://postgres@127.0.0.1:5432] [--json out.json]

The node (``spine-triage node``) and the worker(s) (``spine-triage worker``) run as their own
processes, as in production; a real Orthanc is the PACS (C-STORE destination) and a real MLLP
listener the RIS (HL7 destination). Synthetic 300-slice 512×512 studies (a few phantoms,
copied under new UIDs) are sent with DCMTK ``storescu``; each ROI is posted by REST before its
study, so the job is ready the moment the study completes (with ``--automatic`` no ROI is
posted: the node's automatic analysis finds and judges every vertebral body once the study is
complete, as with ``AUTO_ROI=always``).

How the studies arrive decides what is measured. ``spaced``: each study is sent once the
previous one's flag and SR have arrived (or, with ``--interval S``, S seconds after the previous
send began): the system is not saturated, and its p95 is what the time-to-flag target means.
``back-to-back``: every study sent as soon as the previous send ends, faster than one worker on
a small machine clears them: this measures saturation (throughput, and how the queue grows).
``both`` (default): ``--studies`` spaced, then ``--studies`` more back to back, in one run.
Reported per phase: p50/p95/max of (flag time − last acknowledgment − quiet period) and of the
SR's arrival, throughput in studies per hour, the worker's CPU seconds per study; and where the
time goes (ingest, load, inference, report, delivery), and the peak resident memory of the node
and of a worker.
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
    parser.add_argument(
        "--arrival",
        choices=("both", "spaced", "back-to-back"),
        default="both",
        help="spaced: each study after the previous one's flag and SR (not saturated: what the "
        "p95 target means); back-to-back: saturation and throughput; both (default): "
        "--studies of each, spaced first",
    )
    parser.add_argument(
        "--interval",
        type=float,
        help="spaced arrival: send a study every S seconds (from the start of the previous "
        "send) instead of after the previous one's flag and SR",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--logs", type=Path, help="keep the node's and workers' log here (default: discarded)"
    )
    parser.add_argument("--log-level", default="WARNING", help="of the node and the workers")
    args = parser.parse_args()
    phases = ["spaced", "back-to-back"] if args.arrival == "both" else [args.arrival]
    if args.batch and phases != ["back-to-back"]:
        parser.error("--batch sends every study first: use it with --arrival back-to-back")
    needed = args.studies * len(phases)

    ready = args.data / "ready"
    if not ready.exists() or int(ready.read_text() or 0) < needed:
        shutil.rmtree(args.data, ignore_errors=True)
        print(f"writing {needed} synthetic 300-slice studies to {args.data}", flush=True)
        studies = make_studies(args.data, needed, args.phantoms)
        (args.data / "studies.json").write_text(
            json.dumps([[list(map(str, f)), roi] for f, roi in studies])
        )
        ready.write_text(str(needed))
    studies = [
        ([Path(p) for p in files], roi)
        for files, roi in json.loads((args.data / "studies.json").read_text())
    ][:needed]

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
    cli = [sys.executable, "-m", "worker.cli", "--log-level", args.log_level]
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
    auth = {"Authorization": "Bearer bench-token"}
    measured: list[dict[str, Any]] = []
    try:
        _wait_http(api)
        time.sleep(8)  # workers load the model before the first study
        acked: dict[str, float] = {}
        watcher = ArrivalWatcher(orthanc, ris, acked)
        watcher.start()
        with httpx.Client(base_url=api, headers=auth) as client:
            for number, phase in enumerate(phases):
                batch = studies[number * args.studies : (number + 1) * args.studies]
                cpu_before = sum(cpu_seconds(w.pid) for w in workers)
                run = send_phase(client, batch, phase, args, dicom_port, acked, watcher)
                run["worker_cpu_s"] = sum(cpu_seconds(w.pid) for w in workers) - cpu_before
                measured.append(run)
        watcher.stop()
        node_rss = peak_rss_mib(node.pid)
        worker_rss = max(peak_rss_mib(w.pid) for w in workers)
        timings = _result_timings(api, auth)
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
        logs.close()
        if args.logs is not None:
            shutil.copyfile(work / "processes.log", args.logs)
        shutil.rmtree(work, ignore_errors=True)

    figures: dict[str, Any] = {
        "studies_per_phase": args.studies,
        "workers": args.workers,
        "quiet_period_s": args.quiet_period,
        "analysis": "automatic (no ROI)" if args.automatic else "reader ROI posted first",
        "database": "postgresql" if args.database_url else "sqlite",
        "broker": "redis" if args.broker_url else "filesystem",
        "cpus": os.cpu_count(),
        "load_average_at_end": round(os.getloadavg()[0], 2),
        "phases": [phase_figures(run, args.quiet_period) for run in measured],
        "median_step_s": timings,
        "node_peak_rss_mib": round(node_rss, 1),
        "worker_peak_rss_mib": round(worker_rss, 1),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    complete = all(len(run["flagged"]) == len(run["uids"]) for run in measured)
    return 0 if complete else 1


def send_phase(
    client: httpx.Client,
    batch: list[tuple[list[Path], dict[str, Any]]],
    phase: str,
    args: argparse.Namespace,
    dicom_port: int,
    acked: dict[str, float],
    watcher: ArrivalWatcher,
) -> dict[str, Any]:
    """Send one phase's studies as ``phase`` says and wait for every flag and SR."""
    uids = [roi["study_instance_uid"] for _, roi in batch]
    ingest_s: list[float] = []
    start = time.perf_counter()
    for index, (files, roi) in enumerate(batch):
        if index and phase == "spaced":
            previous = uids[index - 1]
            if args.interval is None:  # the system idle again: flag and SR of the previous
                watcher.wait_for([previous], timeout_s=600)
            else:
                next_at = start + index * args.interval
                time.sleep(max(0.0, next_at - time.perf_counter()))
        if not args.batch and not args.automatic:
            client.post("/annotations", json=roi).raise_for_status()
        begin = time.perf_counter()
        subprocess.run(
            ["/usr/bin/storescu", "-aec", "SPINE_TRIAGE", "127.0.0.1", str(dicom_port)]
            + [str(path) for path in files],
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
        for _, roi in batch:
            client.post("/annotations", json=roi).raise_for_status()
            acked[roi["study_instance_uid"]] = time.perf_counter() + args.quiet_period
    watcher.wait_for(uids, timeout_s=60 * 30)
    return {
        "phase": phase,
        "interval_s": args.interval if phase == "spaced" else None,
        "uids": uids,
        "start": start,
        "acked": {uid: acked[uid] for uid in uids},
        "flagged": {uid: watcher.oru[uid] for uid in uids if uid in watcher.oru},
        "sr": {uid: watcher.sr[uid] for uid in uids if uid in watcher.sr},
        "ingest_s": ingest_s,
    }


def phase_figures(run: dict[str, Any], quiet_period_s: float) -> dict[str, Any]:
    """A phase's figures: delays beyond the quiet period to the flag (the ORU at the RIS) and
    to the SR in the PACS, throughput from the first send to the last SR, CPU per study."""
    acked, flagged, sr = run["acked"], run["flagged"], run["sr"]
    to_flag = [flagged[uid] - acked[uid] - quiet_period_s for uid in flagged]
    to_sr = [sr[uid] - acked[uid] - quiet_period_s for uid in sr]
    end = max([*flagged.values(), *sr.values()], default=run["start"])
    done = min(len(flagged), len(sr))
    return {
        "arrival": run["phase"]
        + (f" every {run['interval_s']:g} s" if run["interval_s"] else "")
        + (
            " (each after the previous one's flag and SR)"
            if run["phase"] == "spaced" and not run["interval_s"]
            else ""
        ),
        "studies": len(run["uids"]),
        "flagged": len(flagged),
        "sr_stored": len(sr),
        **_spread("time_to_flag", to_flag),
        **_spread("time_to_sr", to_sr),
        "ingest_per_study_s": round(statistics.median(run["ingest_s"]), 2),
        "studies_per_hour": round(done / (end - run["start"]) * 3600, 1),
        "worker_cpu_s_per_study": round(run["worker_cpu_s"] / max(1, done), 2),
        # each study's time to flag, in the order the studies were sent
        "time_to_flag_by_arrival_s": [
            round(flagged[uid] - acked[uid] - quiet_period_s, 2)
            for uid in run["uids"]
            if uid in flagged
        ],
    }


def _spread(name: str, values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"{name}_p50_s": None, f"{name}_p95_s": None, f"{name}_max_s": None}
    return {
        f"{name}_p50_s": round(percentile(values, 0.5), 2),
        f"{name}_p95_s": round(percentile(values, 0.95), 2),
        f"{name}_max_s": round(max(values), 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) and its children so far."""
    total = 0.0
    for candidate in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{candidate}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


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
    """Polls the RIS listener and Orthanc every 50 ms: when did each study's flag arrive (its
    ORU received) and when was its SR stored."""

    def __init__(self, orthanc: Orthanc, ris: MllpListener, acked: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.orthanc, self.ris, self.acked = orthanc, ris, acked
        self.oru: dict[str, float] = {}
        self.sr: dict[str, float] = {}
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
                self._stop_event.wait(0.05)

    def wait_for(self, uids: list[str], *, timeout_s: float) -> bool:
        """Until every study of ``uids`` has its flag and its SR (False after the timeout)."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if all(uid in self.oru and uid in self.sr for uid in uids):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)


def _result_timings(api: str, headers: dict[str, str]) -> dict[str, float]:
    annotations = httpx.get(
        f"{api}/annotations", params={"limit": 1000}, headers=headers, timeout=30
    ).json()
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
