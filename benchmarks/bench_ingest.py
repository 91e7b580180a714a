"""Ingest benchmark: the node against Orthanc and DCMTK's storescp, side by side in one run.

Makes N synthetic CT instances (512×512 int16, ~0.5 MiB each), then alternately sends them
with DCMTK ``storescu`` (one association) to ``storescp``, to Orthanc and to the node (a fresh
node process each run: new SQLite database and storage, so every instance is really written,
fsynced and indexed), and prints instances/s and every receiver's ratio to Orthanc with
``SyncStorageArea`` on, the durable archive sites run (and to storescp), as medians.

Beside the wall time, each receiver's CPU seconds per instance: user + system time of the
receiving process and its descendants (listener processes, ``storescp --fork`` children) over
the send, read from ``/proc``. On a machine shared with other work the CPU figure is the stable
one: wall time waits on whatever else runs.

    python benchmarks/bench_ingest.py [--instances 300] [--runs 5] [--senders 1]
        [--listeners 1] [--database-url postgresql+psycopg2://...] [--set NAME=VALUE]
        [--compare NAME=VALUE]

``--senders 4`` splits the files over 4 concurrent ``storescu`` associations (then
``storescp --fork`` is the reference and ``--listeners`` the node's listener processes).
TCP_NODELAY=1 is set for the DCMTK tools (see shared PERFORMANCE.md). ``--compare NAME=VALUE``
adds a node with that one setting changed to every run, for a before/after in the same runs.

Each run also sends to two bare pynetdicom receivers (``bare_scp.py``, unless ``--no-bare``):
one whose handler does nothing and one that writes ``event.encoded_dataset()`` without fsync
or index. They bound what any node built on pynetdicom can reach on this machine.

Orthanc (``/usr/sbin/Orthanc``, unless ``--no-orthanc``) runs twice per run, each time a fresh
process with its own temporary configuration, storage and SQLite index: ``SyncStorageArea``
true (its default: each file fsynced, the index committed per instance) and false. It embeds
DCMTK, so it too runs with TCP_NODELAY=1 in its environment (Orthanc 1.10 has no setting for
its DICOM sockets; without it each instance stalls on a delayed ACK). Its thread pool
(``DicomThreadsCount`` 4) serves concurrent associations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicom_node.settings import Settings  # noqa: E402
from tests.dicom_factory import write_ct_series  # noqa: E402
from tests.services import Orthanc  # noqa: E402

DCMTK = Path("/usr/bin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def wait_listeners(port: int, count: int, timeout: float = 120) -> None:
    """Wait until ``count`` sockets listen on ``port`` (the node's listener processes share it
    with SO_REUSEPORT; each appears in ``/proc/net/tcp`` once it is bound and listening).

    Until then the processes that are up take every association, and the late ones' start-up
    (a Python interpreter importing the node) would be counted in the node's CPU.
    """
    suffix = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
        listening = sum(
            1 for line in lines if line.split()[1].endswith(suffix) and line.split()[3] == "0A"
        )
        if listening >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"fewer than {count} listeners on port {port}")


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its live descendants, with the time of the
    children they reaped, from ``/proc``."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # after the command: state(0) … utime(11) stime(12) cutime(13) cstime(14)
        total += sum(int(value) for value in fields[11:15]) / _CLOCK_TICKS
        children = {
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        }
    except (FileNotFoundError, ProcessLookupError):
        return total
    return total + sum(process_tree_cpu(child) for child in children)


Timing = tuple[float, float]
"""(wall seconds, receiver CPU seconds) of one send."""


def send(port: int, ae: str, chunks: list[list[Path]], receiver_pid: int | None = None) -> Timing:
    """Seconds to send every chunk, one storescu association per chunk, concurrently, and
    the CPU seconds the receiver (``receiver_pid`` and its descendants) used meanwhile.

    Dirty pages and pending discards of the previous run are flushed first, so neither
    receiver pays for the other's writes.
    """
    os.sync()
    cpu_before = process_tree_cpu(receiver_pid) if receiver_pid else 0.0
    start = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                str(DCMTK / "storescu"),
                "-aec",
                ae,
                "-aet",
                "BENCH",
                "127.0.0.1",
                str(port),
                *map(str, chunk),
            ],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    seconds = time.perf_counter() - start
    cpu = process_tree_cpu(receiver_pid) - cpu_before if receiver_pid else float("nan")
    return seconds, cpu


def run_storescp(chunks: list[list[Path]], fork: bool) -> Timing:
    port = free_port()
    args = [str(DCMTK / "storescp"), "-aet", "STORESCP", *(["--fork"] if fork else [])]
    return _time_receiver(
        lambda out: [*args, "-od", str(out), str(port)], port, "STORESCP", chunks, dcmtk_env()
    )


def run_bare(chunks: list[list[Path]], handler: str) -> Timing:
    """Seconds for a bare pynetdicom receiver (``bare_scp.py``) to take every chunk."""
    port = free_port()
    script = str(Path(__file__).with_name("bare_scp.py"))
    return _time_receiver(
        lambda out: (
            [sys.executable, script, str(port), handler]
            + (["--folder", str(out)] if handler == "write" else [])
        ),
        port,
        "BARE",
        chunks,
    )


def _time_receiver(
    command: Callable[[Path], list[str]],
    port: int,
    ae: str,
    chunks: list[list[Path]],
    env: dict[str, str] | None = None,
) -> Timing:
    """Start a reference receiver (``command`` of its output folder), time the sends to it,
    stop it and remove what it wrote."""
    out = Path(tempfile.mkdtemp(prefix="bench-receiver-"))
    server = subprocess.Popen(
        command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(port)
        return send(port, ae, chunks, server.pid)
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(out, ignore_errors=True)


def run_orthanc(chunks: list[list[Path]], sync_storage: bool) -> Timing:
    """Seconds for a fresh Orthanc (own config, storage and index) to take every chunk."""
    folder = Path(tempfile.mkdtemp(prefix="bench-orthanc-"))
    orthanc = Orthanc(
        folder,
        aet="ORTHANC",
        extra_config={"SyncStorageArea": sync_storage, "DicomThreadsCount": 4},
        environment=dcmtk_env(),
    )
    try:
        orthanc.start()
        wait_port(orthanc.dicom_port)
        assert orthanc.process is not None
        timing = send(orthanc.dicom_port, "ORTHANC", chunks, orthanc.process.pid)
        with orthanc.client() as client:
            stored = int(client.get("/statistics").json()["CountInstances"])
        if stored != sum(len(chunk) for chunk in chunks):
            raise RuntimeError(f"Orthanc stored {stored} of {sum(map(len, chunks))} instances")
        return timing
    finally:
        orthanc.stop()
        shutil.rmtree(folder, ignore_errors=True)


def run_node(
    chunks: list[list[Path]],
    listeners: int,
    database_url: str | None,
    overrides: dict[str, str] | None = None,
) -> Timing:
    port = free_port()
    var = Path(tempfile.mkdtemp(prefix="bench-node-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_TRIAGE_")}
    env.update(
        {
            "SPINE_TRIAGE_VAR_DIR": str(var),
            "SPINE_TRIAGE_DICOM_HOST": "127.0.0.1",
            "SPINE_TRIAGE_DICOM_PORT": str(port),
            "SPINE_TRIAGE_LISTENER_PROCESSES": str(listeners),
            "SPINE_TRIAGE_MIN_FREE_DISK_MB": "0",
        }
    )
    env.update({f"SPINE_TRIAGE_{k.upper()}": v for k, v in (overrides or {}).items()})
    created_db = None
    if database_url:
        created_db = _create_pg_database(database_url)
        env["SPINE_TRIAGE_DATABASE_URL"] = created_db
    cli = [sys.executable, "-m", "worker.cli", "--log-level", "WARNING"]
    subprocess.run(
        [*cli, "db", "upgrade"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL
    )
    node = subprocess.Popen(
        [*cli, "node", "--no-http"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        wait_listeners(port, listeners)
        time.sleep(0.5)  # the processes settle (start-up CPU stays out of the figure)
        return send(port, "SPINE_TRIAGE", chunks, node.pid)
    finally:
        node.terminate()
        node.wait(timeout=30)
        shutil.rmtree(var, ignore_errors=True)
        if created_db:
            _drop_pg_database(database_url or "", created_db)


def _create_pg_database(server_url: str) -> str:
    from sqlalchemy import create_engine, text

    name = f"bench_{uuid.uuid4().hex[:10]}"
    engine = create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{server_url}/{name}"


def _drop_pg_database(server_url: str, url: str) -> None:
    from sqlalchemy import create_engine, text

    name = url.rsplit("/", 1)[1]
    engine = create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def _ratio(reference: float, value: float) -> float:
    """``reference / value``; NaN when ``value`` is 0 (the clock ticks 10 ms: a short run)."""
    return reference / value if value > 0 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument("--listeners", type=int, default=1)
    parser.add_argument(
        "--database-url",
        help="PostgreSQL server URL without database name, "
        "e.g. postgresql+psycopg2://postgres@127.0.0.1:5432 (default: SQLite)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a node setting for the run, e.g. --set dicom_poll_interval_ms=1 (repeatable)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also time a node with this setting changed, in the same runs "
        "(e.g. --compare dicom_poll_interval_ms=0.2; repeatable: one node each)",
    )
    parser.add_argument(
        "--no-bare",
        action="store_true",
        help="skip the bare pynetdicom receivers (bare_scp.py) in each run",
    )
    parser.add_argument(
        "--no-orthanc",
        action="store_true",
        help="skip Orthanc (SyncStorageArea true and false) in each run",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    for item in (*args.set, *args.compare):  # the node ignores unknown settings: say so here
        if "=" not in item or item.split("=", 1)[0] not in Settings.model_fields:
            parser.error(f"{item!r} is not NAME=VALUE with NAME a node setting")
    overrides = dict(item.split("=", 1) for item in args.set)
    fork = args.senders > 1
    node_name = "node ({}, {} listener(s))".format(
        "postgresql" if args.database_url else "sqlite", args.listeners
    )
    # receiver key → (printed name, how to time it on the chunks); the order of every run
    receivers: dict[str, tuple[str, Callable[[list[list[Path]]], Timing]]] = {
        "storescp": (
            "storescp --fork" if fork else "storescp",
            partial(run_storescp, fork=fork),
        ),
    }
    if not args.no_bare:
        for handler in ("nothing", "write"):
            receivers[f"bare_{handler}"] = (
                f"bare pynetdicom, handler: {handler}",
                partial(run_bare, handler=handler),
            )
    if not args.no_orthanc:
        for key, sync in (("orthanc", True), ("orthanc_nosync", False)):
            receivers[key] = (
                f"Orthanc, SyncStorageArea {'on' if sync else 'off'}",
                partial(run_orthanc, sync_storage=sync),
            )
    receivers["node"] = (
        node_name,
        partial(
            run_node,
            listeners=args.listeners,
            database_url=args.database_url,
            overrides=overrides,
        ),
    )
    for item in args.compare:
        name, value = item.split("=", 1)
        receivers[f"node_{name}_{value}"] = (
            f"{node_name}, {name}={value}",
            partial(
                run_node,
                listeners=args.listeners,
                database_url=args.database_url,
                overrides={**overrides, name: value},
            ),
        )

    times: dict[str, list[float]] = {key: [] for key in receivers}
    cpus: dict[str, list[float]] = {key: [] for key in receivers}
    data = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        files = write_ct_series(data, args.instances, rows=512, columns=512)
        size = sum(p.stat().st_size for p in files)
        chunks = [files[i :: args.senders] for i in range(args.senders)]
        for run in range(args.runs):
            for key, (_, timed) in receivers.items():
                seconds, cpu = timed(chunks)
                times[key].append(seconds)
                cpus[key].append(cpu)
            text = ", ".join(
                f"{key} {times[key][-1]:.2f} s ({cpus[key][-1] / args.instances * 1e3:.1f} ms CPU)"
                for key in receivers
            )
            print(f"run {run + 1}: {text}", flush=True)
    finally:
        shutil.rmtree(data, ignore_errors=True)

    median = {key: statistics.median(values) for key, values in times.items()}
    cpu_ms = {key: statistics.median(values) / args.instances * 1e3 for key, values in cpus.items()}
    figures: dict[str, object] = {
        "instances": args.instances,
        "mib": round(size / 2**20, 1),
        "senders": args.senders,
        "listeners": args.listeners,
        "database": "postgresql" if args.database_url else "sqlite",
    }
    # a ratio is the reference's time / this receiver's time: above 1 means faster
    references = [key for key in ("orthanc", "storescp") if key in median]
    for key, seconds in median.items():
        figures[f"{key}_s"] = round(seconds, 3)
        figures[f"{key}_inst_per_s"] = round(args.instances / seconds, 1)
        figures[f"{key}_cpu_ms_per_inst"] = round(cpu_ms[key], 3)
        for reference in references:
            if key != reference:
                figures[f"ratio_{key}_to_{reference}"] = round(median[reference] / seconds, 3)
                figures[f"cpu_ratio_{key}_to_{reference}"] = round(
                    _ratio(cpu_ms[reference], cpu_ms[key]), 3
                )
    header = "".join(f"  to {reference:<9}" for reference in references)
    lines = [
        f"\n{args.instances} instances ({figures['mib']} MiB), {args.senders} sender(s), "
        f"median of {args.runs}; ratio = the reference's time / this one's "
        "(Orthanc: SyncStorageArea on); CPU: the receiver's CPU ms per instance and the "
        "reference's CPU / this one's:",
        f"  {'receiver':<40} {'time':>8}  {'inst/s':>7}{header}  {'CPU ms':>7}{header}",
    ]
    for key, (name, _) in receivers.items():
        seconds = median[key]
        ratios = "".join(f"  {median[reference] / seconds:>12.2f}" for reference in references)
        cpu_ratios = "".join(
            f"  {_ratio(cpu_ms[reference], cpu_ms[key]):>12.2f}" for reference in references
        )
        lines.append(
            f"  {name:<40} {seconds:6.2f} s  {args.instances / seconds:7.1f}{ratios}"
            f"  {cpu_ms[key]:7.2f}{cpu_ratios}"
        )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
