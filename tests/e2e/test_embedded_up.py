"""The README's run command as a newcomer uses it: ``spine-triage up --demo`` in an empty
folder starts node and worker in embedded mode, feeds synthetic studies through the real path,
and within minutes the worklist shows flagged and routine studies and the SRs sit in
var/results. It says how to sign in: the first start made the user admin, whose password is
in var/admin-password (0600); reads need a credential (the API token in var/api-token here).
Stopped with Ctrl-C, it shuts down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_up_demo_fills_the_worklist_and_the_results_folder(
    tmp_path: Path, demo_checkpoint: Path
) -> None:
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_TRIAGE_")}
    env.update(
        {
            "SPINE_TRIAGE_DICOM_PORT": str(free_port()),
            "SPINE_TRIAGE_HTTP_PORT": str(http_port),
            "SPINE_TRIAGE_QUIET_PERIOD_S": "1",
            "SPINE_TRIAGE_AUTO_ROI": "off",  # every demo study gets a reader ROI here
            # the demonstration model the first run would train, made once per test session
            "SPINE_TRIAGE_MODEL_CHECKPOINT": str(demo_checkpoint),
        }
    )
    log = (tmp_path / "up.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--demo", "--demo-studies", "4"],
        cwd=tmp_path,  # a fresh folder: everything lands in ./var
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        items: list[dict[str, object]] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError((tmp_path / "up.log").read_text()[-3000:])
            try:
                token = (tmp_path / "var" / "api-token").read_text().strip()
                body = httpx.get(
                    f"http://127.0.0.1:{http_port}/worklist",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=5,
                ).json()
                items = body["items"]
            except (httpx.HTTPError, OSError, KeyError):
                items = []
            # the results folder gets each study's SR and its review series
            results = [
                path
                for path in (tmp_path / "var" / "results").glob("*.dcm")
                if pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR"
            ]
            done = [i for i in items if i["state"] in ("flagged", "routine")]
            if len(done) == 4 and len(results) == 4:
                break
            time.sleep(1)
        else:
            raise AssertionError(
                f"worklist {items}\n--- log ---\n{(tmp_path / 'up.log').read_text()[-3000:]}"
            )
        states = [item["state"] for item in items]
        assert states == sorted(states, key=lambda s: s != "flagged")  # flagged first
        assert {"flagged", "routine"} <= set(states)
        output = (tmp_path / "up.log").read_text()
        assert f"worklist:  http://127.0.0.1:{http_port}/" in output
        assert (tmp_path / "var" / "spine-triage.db").exists()
        password_file = tmp_path / "var" / "admin-password"
        assert f"sign in:   user admin, password in {password_file}" in output
        assert password_file.stat().st_mode & 0o777 == 0o600
        anonymous = httpx.get(f"http://127.0.0.1:{http_port}/worklist", timeout=5)
        assert anonymous.status_code == 401
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as browser:
            signed = browser.post(
                "/login",
                data={"username": "admin", "password": password_file.read_text().strip()},
            )
            assert signed.status_code == 303
            assert len(browser.get("/worklist").json()["items"]) == 4
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
            log.close()
