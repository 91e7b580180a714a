"""Fixtures of the triage flow: a checkpoint made here, synthetic studies, a running system."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from dicom_node.archive.migrate import upgrade
from dicom_node.archive.schema import (
    AnnotationState,
    Delivery,
    DeliveryState,
    RoiAnnotation,
    TriageResult,
)
from dicom_node.broker.app import TaskSender, make_celery
from dicom_node.dicom.scu import StorePeer, store_files
from dicom_node.node import Node, start_node
from dicom_node.settings import Settings
from dicom_node.web.app import HttpServer, start_http
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint file with seeded random weights (no download, no training)."""
    import torch
    from pydicom.uid import generate_uid

    from model.serving.checkpoint import save_checkpoint
    from model.serving.network import build_resnet50
    from model.serving.preprocess import PreprocessParams

    torch.manual_seed(0)
    network = build_resnet50("random")
    path = tmp_path_factory.mktemp("model") / "test-model.pt"
    save_checkpoint(
        path,
        network.state_dict(),
        {
            "name": "spine-triage-test",
            "version": "test-1",
            "device_uid": generate_uid(entropy_srcs=["spine-triage-test-model"]),
            "preprocessing": PreprocessParams().to_json(),
            "threshold": 0.5,
            "training": {"note": "random weights for tests"},
            "demonstration": False,
            "intended_use": "automated tests only",
        },
    )
    return path


@pytest.fixture(scope="session")
def synthetic_cases(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """Three small synthetic spine CT studies with their ROIs (made once per session)."""
    from model.synthetic.cases import make_cohort

    return make_cohort(tmp_path_factory.mktemp("cohort"), patients=3, seed=11)


def case_files(case: Any) -> list[Path]:
    return sorted(Path(case.series_dir).rglob("*.dcm"))


@dataclass
class System:
    """Node (DICOM + scheduler + HTTP) in this process, workers as real processes."""

    settings: Settings
    env: dict[str, str]
    node: Node
    http: HttpServer
    sender: TaskSender
    token: str
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    def send_study(self, files: list[Path]) -> None:
        peer = StorePeer(
            ae_title=self.settings.ae_title,
            host="127.0.0.1",
            port=self.node.dicom_address[1],
            calling_ae_title="TEST_SCU",
        )
        store_files(files, peer)

    def post_roi(self, roi: dict[str, Any]) -> int:
        answer = httpx.post(
            f"{self.api}/annotations",
            json=roi,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )
        assert answer.status_code in (200, 201), answer.text
        return int(answer.json()["id"])

    def start_worker(self, name: str = "w1") -> subprocess.Popen[bytes]:
        log = open(self.settings.var_dir / f"worker-{name}.log", "ab")  # noqa: SIM115
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.cli",
                "worker",
                "--hostname",
                f"{name}@test",
                "--concurrency",
                "1",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.workers.append(process)
        return process

    def kill_workers(self, sig: int = signal.SIGKILL) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(sig)
        for process in self.workers:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.workers.clear()

    def annotation_states(self) -> dict[int, AnnotationState]:
        with self.node.sessions() as session:
            rows = session.execute(select(RoiAnnotation.id, RoiAnnotation.state)).all()
            return {row.id: row.state for row in rows}

    def results_per_annotation(self) -> dict[int, int]:
        with self.node.sessions() as session:
            rows = session.execute(
                select(TriageResult.annotation_id, func.count(TriageResult.id)).group_by(
                    TriageResult.annotation_id
                )
            ).all()
            return {annotation_id: count for annotation_id, count in rows}

    def deliveries_delivered(self) -> int:
        with self.node.sessions() as session:
            return int(
                session.scalar(
                    select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.DELIVERED)
                )
                or 0
            )

    def wait_until(
        self, condition: Callable[[], bool], timeout: float = 120, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            for process in self.workers:
                if process.poll() is not None and process.returncode not in (0, -9, -15):
                    raise AssertionError(f"a worker exited with {process.returncode}")
            time.sleep(0.2)
        logs = "\n".join(
            p.read_text()[-3000:] for p in sorted(self.settings.var_dir.glob("worker-*.log"))
        )
        raise AssertionError(f"timed out waiting for {what}\n--- worker logs ---\n{logs}")

    def stop(self) -> None:
        self.kill_workers(signal.SIGTERM)
        self.http.stop()
        self.node.stop()
        self.sender.close()


@pytest.fixture
def system_factory(tmp_path: Path, checkpoint_path: Path) -> Iterator[Callable[..., System]]:
    systems: list[System] = []

    def start(database_url: str, broker_url: str = "", **overrides: Any) -> System:
        upgrade(database_url)
        var = tmp_path / f"var{len(systems)}"
        results = var / "results"
        values: dict[str, Any] = {
            "var_dir": str(var),
            "database_url": database_url,
            "broker_url": broker_url,
            "dicom_host": "127.0.0.1",
            "dicom_port": free_port(),
            "http_port": free_port(),
            "min_free_disk_mb": 0,
            "quiet_period_s": 1.0,
            "completion_check_interval_s": 0.2,
            "sweeper_interval_s": 1.0,
            "job_lease_s": 30.0,
            "model_checkpoint": str(checkpoint_path),
            "api_token": "test-token",
            "destinations": json.dumps(
                [{"name": "results", "kind": "folder", "path": str(results)}]
            ),
        }
        values.update({key: str(value) for key, value in overrides.items()})
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_TRIAGE_")}
        env.update({f"SPINE_TRIAGE_{key.upper()}": str(value) for key, value in values.items()})
        env["OMP_NUM_THREADS"] = "1"
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            **{
                key: (json.loads(value) if key == "destinations" else value)
                for key, value in values.items()
            },
        )
        sender = TaskSender(make_celery(settings, "test_node"))
        node = start_node(settings, send=sender)
        http = start_http(
            settings, node.sessions, sender, store_context=node.service.context, audit=node.audit
        )
        system = System(settings, env, node, http, sender, token="test-token")
        systems.append(system)
        return system

    yield start
    for system in systems:
        system.stop()
