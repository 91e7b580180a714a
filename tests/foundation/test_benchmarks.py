"""The ingest benchmark scripts still run end to end (a few instances, one run).

They are not timed tests: they only prove that the figures in benchmarks/README.md can be
measured again with the code as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support import require_binary, require_dcmtk

ROOT = Path(__file__).resolve().parents[2]


def _run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_bench_ingest_measures_storescp_the_bare_receivers_orthanc_and_the_node(
    tmp_path: Path,
) -> None:
    require_dcmtk("storescu")
    require_dcmtk("storescp")
    require_binary("Orthanc")
    out = tmp_path / "ingest.json"
    result = _run_benchmark(
        "bench_ingest.py",
        *("--instances", "4", "--runs", "1", "--json", str(out)),
        *("--compare", "dicom_poll_interval_ms=2"),  # a second node, one setting changed
    )
    figures = json.loads(out.read_text())
    assert figures["instances"] == 4
    receivers = (
        "storescp",
        "bare_nothing",
        "bare_write",
        "orthanc",
        "orthanc_nosync",
        "node",
        "node_dicom_poll_interval_ms_2",
    )
    for key in receivers:
        assert figures[f"{key}_s"] > 0, key
        assert figures[f"{key}_cpu_ms_per_inst"] >= 0, key  # the receiver's CPU, from /proc
    for key in receivers:  # every ratio is to Orthanc with SyncStorageArea on (and storescp)
        if key != "orthanc":
            assert figures[f"ratio_{key}_to_orthanc"] > 0, key
    assert "bare pynetdicom, handler: nothing" in result.stdout
    assert "Orthanc, SyncStorageArea on" in result.stdout
    assert "Orthanc, SyncStorageArea off" in result.stdout
    assert "node (sqlite, 1 listener(s))" in result.stdout
    assert "node (sqlite, 1 listener(s)), dicom_poll_interval_ms=2" in result.stdout


def test_bench_ingest_refuses_a_setting_the_node_does_not_have() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ingest.py"), "--compare", "no_such=1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "not NAME=VALUE with NAME a node setting" in result.stderr


def test_bench_store_path_reports_every_stage(tmp_path: Path) -> None:
    result = _run_benchmark("bench_store_path.py", "--instances", "3", "--root", str(tmp_path))
    stages = {
        line.split()[0]: float(line.split()[1])
        for line in result.stdout.splitlines()[1:]
        if line.strip()
    }
    assert set(stages) == {
        "start",
        "header",
        "digest",
        "place",
        "index",
        "commit",
        "durable",
        "total",
        "CPU",
    }
    assert stages["total"] > 0
